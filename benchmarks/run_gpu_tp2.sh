#!/usr/bin/env bash
# On the two-GPU machine (kind nvidia-h200-x2, timeout 600; SGLang's
# site in two parts as in run_gpu_sglang.sh): the tactic
# backend at tensor parallelism 2 (issue 9). Steps, with their limits:
#   serve       180 s  serve --engine sglang --tp 2 answers the openai client; SIGTERM exits 0
#   equality    300 s  greedy tokens at P = 0.999 (and dense, P = 0.9) at tp 2 against tp 1 and
#                      against the triton backend, float32 tiny model, 32 tokens
#   throughput  540 s  triton and tactic (graphs) at tp 1 and tp 2, Llama-3.1-8B dummy, 64k and
#                      128k, batches 1 and 8
#   STEPS="serve equality" bash benchmarks/run_gpu_tp2.sh ; STEPS=throughput bash ...
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source benchmarks/gpu_runner_env.sh
for step in ${STEPS:-serve equality}; do
  echo "[run_gpu_tp2] $step"
  case $step in
    serve)
      TACTIC_TEST_TP=2 timeout 180 python3 -m pytest -q -p no:warnings \
        tests/test_sglang_serve_gpu.py >"$out/serve_tp2.log" 2>&1 ;;
    equality)
      timeout 300 python3 benchmarks/sglang_gpu.py equality --dtype float32 --tp 2 \
        --out "$out/sglang_tp2_equality.json" >"$out/equality_tp2.log" 2>&1 ;;
    throughput)
      for tp in 1 2; do
        timeout 270 python3 benchmarks/sglang_gpu.py throughput --backends triton tactic \
          --contexts 65536 131072 --batches 1 8 --repeats 2 --tp "$tp" \
          --out "$out/sglang_tp2_throughput_tp$tp.json" >"$out/throughput_tp$tp.log" 2>&1
      done ;;
    *) echo "unknown step $step" >&2 ;;
  esac
  echo "[run_gpu_tp2] $step: exit $?"
  grep -a "sglang_gpu\|passed\|failed\|Error" "$out"/*"$step"*.log 2>/dev/null | tail -20
done
