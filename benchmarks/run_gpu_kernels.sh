#!/usr/bin/env bash
# On the GPU machine (device call with carry [".whl"]): GPU tests, then the decode benchmark with
# the given arguments. Logs and the JSON land in $OUT.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/gpu_env.sh || exit 1
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
python3 -c "import torch, triton, flashinfer; print(torch.__version__, triton.__version__, flashinfer.__version__)"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log"
fi
PYTHONUNBUFFERED=1 python3 benchmarks/decode_attention.py --output "$OUT/decode_attention.json" "$@" \
  2>&1 | tee "$OUT/decode_attention.log"
