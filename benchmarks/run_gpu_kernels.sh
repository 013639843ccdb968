#!/usr/bin/env bash
# On the GPU machine (device call with carry [".whl"]): GPU tests, then the decode benchmark with
# the given arguments. Logs and the JSON land in $OUT.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/gpu_env.sh || exit 1
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
python3 -c "import torch, triton, flashinfer; print(torch.__version__, triton.__version__, flashinfer.__version__)"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # gpu-marked tests, and the kernel tests, which run on CUDA where it exists
  python3 -m pytest -q tests -m gpu 2>&1 | tee "$OUT/gpu_tests.log"
  python3 -m pytest -q tests/test_kernels_decode.py tests/test_kernels_selection.py 2>&1 \
    | tee -a "$OUT/gpu_tests.log"
fi
PYTHONUNBUFFERED=1 python3 benchmarks/decode_attention.py --output "$OUT/decode_attention.json" "$@" \
  2>&1 | tee "$OUT/decode_attention.log"
