#!/usr/bin/env bash
# Creates .venv (Python >= 3.11) and installs the project with its dev extra. Idempotent: a second
# run only checks. Sourced by scripts/test.sh; run it alone to get an environment to work in.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $("$python" --version)"
  "$python" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch (CPU build 2.13.0 where this machine has it)"
  .venv/bin/python -m pip install --quiet "torch==2.13.0" || .venv/bin/python -m pip install --quiet "torch>=2.4"
fi
echo "[setup] installing tactic-server[dev]"
.venv/bin/python -m pip install --quiet -e ".[dev]"
