#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh --sglang: the SGLang plugin is tested against real SGLang) and
# runs the linter and the CPU test suite.
# Extra arguments go to pytest, e.g. `./scripts/test.sh -k selection`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh --sglang
echo "[test] ruff"
.venv/bin/ruff check .
echo "[test] pytest"
.venv/bin/python -m pytest -q "$@"
