#!/usr/bin/env bash
# On the GPU machine, one device call (carry [".whl-sgl"], timeout 600): SGLang with the tactic
# backend end to end. Each step has its own time limit, so one that fails or hangs leaves the
# others their time; logs and JSON land in $OUT (bring them home to benchmarks/results/).
#   STEPS="serve equality throughput" bash benchmarks/run_gpu_sglang.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/gpu_env.sh || exit 1
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for step in ${STEPS:-serve equality throughput}; do
  echo "[run_gpu_sglang] $step"
  case $step in
    serve)  # (a) serve --engine sglang answers the openai client; SIGTERM exits 0
      timeout 150 python3 -m pytest -q -p no:warnings tests/test_sglang_serve_gpu.py \
        >"$out/serve.log" 2>&1 ;;
    equality)  # (b) greedy equality at P = 0.999 with the triton backend, float32
      timeout 240 python3 benchmarks/sglang_gpu.py equality --dtype float32 \
        --out "$out/sglang_equality.json" >"$out/equality.log" 2>&1 ;;
    throughput)  # (c) dense (triton backend) vs tactic, Llama-3.1-8B config, dummy weights
      timeout 420 python3 benchmarks/sglang_gpu.py throughput --backends tactic triton \
        --contexts ${CONTEXTS:-32768 65536 131072} --batches 1 8 --repeats 2 \
        --out "$out/sglang_throughput.json" >"$out/throughput.log" 2>&1 ;;
    *) echo "unknown step $step" >&2 ;;
  esac
  echo "[run_gpu_sglang] $step: exit $?"
  grep -a "sglang_gpu\|passed\|failed\|Error" "$out/$step.log" 2>/dev/null | tail -20
done
