#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and serves the OpenAI-compatible API on
# http://127.0.0.1:8000. Without --model it serves the bundled default model. Extra arguments go
# to `tactic-server serve`, e.g. `./scripts/serve.sh --model /path/to/llama --port 9000`
# (`--engine sglang` also installs the [sglang] extra).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
case " $* " in
  *" --engine sglang "* | *" --engine=sglang "*) bash scripts/setup.sh --sglang ;;
  *) bash scripts/setup.sh ;;
esac
exec .venv/bin/tactic-server serve "$@"
