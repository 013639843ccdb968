#!/usr/bin/env bash
# Creates .venv (Python >= 3.11) and installs the project with its dev extra. Idempotent: when
# .venv already holds this pyproject.toml's install with these extras (a stamp records it), it
# returns at once without pip. Run by scripts/test.sh and scripts/serve.sh; run it alone to get
# an environment to work in.
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
stamp=.venv/.tactic-setup
installed() { # the extras of the install the stamp records, if pyproject.toml is the same
  [ -f "$stamp" ] && [ -x .venv/bin/tactic-server ] || return 1
  local digest extras_done
  read -r digest extras_done <"$stamp"
  [ "$digest" = "$(sha256sum pyproject.toml | cut -d' ' -f1)" ] && echo "$extras_done"
}
case "$(installed || true)" in
  "$extras" | dev,sglang)  # the sglang install holds the dev one too
    echo "[setup] .venv is current (tactic-server[$(installed)]): nothing to install"
    exit 0 ;;
esac
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
printf '%s %s\n' "$(sha256sum pyproject.toml | cut -d' ' -f1)" "$extras" >"$stamp"
