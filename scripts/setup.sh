#!/usr/bin/env bash
# Creates .venv (Python >= 3.11) and installs the project with its dev extra. Idempotent: a second
# run only checks. Sourced by scripts/test.sh; run it alone to get an environment to work in.
#   --sglang   also the [sglang] extra (SGLang 0.5.12.post1, which pins torch 2.11.0), on Linux
#              x86_64: what `serve --engine sglang` and the plugin's tests need. scripts/test.sh
#              passes it; elsewhere the plugin's tests are skipped.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python3}
extras=dev
if [ "${1:-}" = --sglang ]; then
  if [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ]; then
    extras=dev,sglang
  else
    echo "[setup] SGLang has no wheels for $(uname -s)-$(uname -m): installing without it"
  fi
fi
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $("$python" --version)"
  "$python" -m venv .venv
fi
if [ "$extras" = dev ] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch (CPU build 2.13.0 where this machine has it)"
  .venv/bin/python -m pip install --quiet "torch==2.13.0" || .venv/bin/python -m pip install --quiet "torch>=2.4"
fi
echo "[setup] installing tactic-server[$extras]"
.venv/bin/python -m pip install --quiet -e ".[$extras]"
