#!/usr/bin/env bash
# On the GPU machine, one device call per group of steps (timeout 600; SGLang's site
# travels in two parts beside the tree with its bundled model: scripts/split_site.sh, then a first
# call carrying [".whl-sgl-part1", ".whl-hf"] and the next [".whl-sgl-part2"], back to back): SGLang
# with the tactic backend end to end, and the full load run. Each step has its own time limit,
# so one that fails or hangs leaves the others their time; logs and JSON land in $OUT (bring
# them home to benchmarks/results/). Steps, with their limits:
#   warm        300 s  FlashInfer's JIT cache, once per machine: its first compile (about
#                      2 minutes) would otherwise land in the first flashinfer engine's start and
#                      eat a throughput step's limit (never its timed rounds, which come after an
#                      untimed decode); a stamp beside the cache skips it while the machine lasts
#   serve       300 s  (a) serve --engine sglang answers the openai client; SIGTERM exits 0
#   logprobs    200 s  why cold and warm (radix-cache hit) answers' logprobs differ while two
#                      over the same cache state agree, streamed or not: sglang_logprobs.py
#   equality    240 s  (b) greedy equality at P = 0.999 with the triton backend, float32
#   gemma       580 s  issue 20 (3): tests/test_sglang_plugin_gemma.py on the GPU, its gpu test
#                      included (a tiny random Gemma 3 served by SGLang, tactic at P = 0.999 vs
#                      transformers over Triton and vs SGLang's flashinfer backend: 110 s
#                      with FlashInfer's cache warm, past 240 s cold, H100 2026-12-07; with the
#                      float16 half's FlashInfer runs, over 330 s: the FlashInfer engine's
#                      graph capture took 42 s, and the limit came as the third engine
#                      started, H100 2026-12-07 late night)
#   throughput  540 s  (c) flashinfer, fa3 and triton vs tactic (graphs) vs tactic-eager,
#                      Llama-3.1-8B dummy, $CONTEXTS (default 32768 65536 131072), $BACKENDS
#                      (default all; fa3 is recorded as unavailable where sgl-kernel's FA3
#                      library was not staged: STAGE_FA3=1 scripts/stage_sglang_wheels.sh),
#                      $TOKENS new tokens a round (default 64), $BATCHES (default 1 8);
#                      DUMMY=gemma3-270m: Gemma 3 270M's shape instead (random weights: flat
#                      attention on its three global layers; contexts up to 32768)
#   trained     540 s  (c) the same on the trained model $MODEL (default the repo's bundled
#                      one, else /tmp/run-code/model), where attention is really sparse:
#                      $CONTEXTS (default 32768 65536 131072), $BATCHES (default 1 8), $BACKENDS (default flashinfer
#                      fa3 triton tactic tactic-fa3: the tactic backend over FA3), 256 new
#                      tokens a round (64 understate batch 8:
#                      README), end to end and steady (streamed); about 310 s without fa3, of
#                      which an engine may take 95 s to start on a machine that just unpacked
#                      SGLang (fa3, where staged, adds an engine: up in 41-49 s on the H100);
#                      INFLATE="8 2": the model through benchmarks/inflate_model.py first (its
#                      KV heads x8, a reader copy before each layer: the same function with an
#                      attention-bound decode), results *_trained_inflated_kv8x2.*
#   profile     300 s  where a decode step's time goes: SGLang's torch profiler over 32 decode
#                      steps of the trained model at 128k, batch 8, triton and tactic (dense
#                      requests and P = 0.9), each trace summarised (trace_summary.py)
#   load        420 s  issue 7: every load scenario against the embedded engine on the GPU and
#                      against --engine sglang, SIGTERM drain
#   STEPS="warm serve equality trained" bash benchmarks/run_gpu_sglang.sh
#   STEPS=throughput bash benchmarks/run_gpu_sglang.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source benchmarks/gpu_runner_env.sh
model=${MODEL:-}
if [ -z "$model" ]; then
  for candidate in tactic_server/models/*/ /tmp/run-code/model; do
    [ -f "$candidate/config.json" ] && model=$candidate && break
  done
fi
warmed=$HOME/.cache/flashinfer/tactic_warm  # FlashInfer's cache folder (FLASHINFER_WORKSPACE_BASE)
for step in ${STEPS:-warm serve equality trained}; do
  echo "[run_gpu_sglang] $step"
  case $step in
    warm)
      if [ -f "$warmed" ]; then
        echo "flashinfer's JIT cache is already warm on this machine" >"$out/warm.log"
      else
        timeout 300 python3 benchmarks/sglang_gpu.py warm --out "$out/sglang_warm.json" \
          >"$out/warm.log" 2>&1 && mkdir -p "${warmed%/*}" && touch "$warmed"
      fi ;;
    serve)
      timeout 300 python3 -m pytest -q -p no:warnings tests/test_sglang_serve_gpu.py \
        >"$out/serve.log" 2>&1 ;;
    logprobs)
      timeout 200 python3 benchmarks/sglang_logprobs.py --dense-fallback "${FALLBACK:-off}" \
        --out "$out/sglang_logprobs.json" >"$out/logprobs.log" 2>&1 ;;
    equality)
      timeout 240 python3 benchmarks/sglang_gpu.py equality --dtype float32 \
        --out "$out/sglang_equality.json" >"$out/equality.log" 2>&1 ;;
    gemma)
      # the served test apart and unbuffered (-s): when SGLang's scheduler dies, sglang.Engine
      # kills its own process tree, pytest with it, before pytest prints anything (H100,
      # 2026-12-06); its log then still holds the scheduler's traceback
      timeout 120 python3 -m pytest -q -p no:warnings tests/test_sglang_plugin_gemma.py \
        -k "not serves" >"$out/gemma.log" 2>&1
      timeout 460 python3 -m pytest -q -s -p no:warnings tests/test_sglang_plugin_gemma.py \
        -k serves >>"$out/gemma.log" 2>&1 ;;
    throughput)
      # shellcheck disable=SC2086  # CONTEXTS is a list of words
      timeout 540 python3 benchmarks/sglang_gpu.py throughput --dummy "${DUMMY:-llama8b}" \
        --contexts ${CONTEXTS:-32768 65536 131072} --batches ${BATCHES:-1 8} --repeats 2 \
        --backends ${BACKENDS:-flashinfer fa3 triton tactic tactic-eager} --tokens ${TOKENS:-64} \
        --out "$out/sglang_throughput${DUMMY:+_$DUMMY}.json" >"$out/throughput.log" 2>&1 ;;
    trained)
      if [ -z "$model" ]; then echo "no trained model: set MODEL"; continue; fi
      served=$model suffix=${TAG:+_$TAG}  # TAG: a second run's files beside the first's
      if [ -n "${INFLATE:-}" ]; then  # INFLATE="8 2": KV heads x8, two layers per layer
        read -r kv_heads copies <<<"$INFLATE"
        served=/tmp/inflated-kv${kv_heads}x$copies suffix=_inflated_kv${kv_heads}x$copies$suffix
        python3 benchmarks/inflate_model.py "$model" "$served" --kv-heads "$kv_heads" \
          --layer-copies "$copies" >"$out/trained$suffix.log" 2>&1
      fi
      # shellcheck disable=SC2086
      timeout 540 python3 benchmarks/sglang_gpu.py throughput --model "$served" \
        --contexts ${CONTEXTS:-32768 65536 131072} \
        --backends ${BACKENDS:-flashinfer fa3 triton tactic tactic-fa3} --batches ${BATCHES:-1 8} \
        --repeats ${REPEATS:-3} \
        --tokens ${TOKENS:-256} \
        --out "$out/sglang_throughput_trained$suffix.json" >>"$out/trained$suffix.log" 2>&1
      grep -a "sglang_gpu" "$out/trained$suffix.log" | tail -20 ;;
    profile)
      if [ -z "$model" ]; then echo "no trained model: set MODEL"; continue; fi
      timeout 300 python3 benchmarks/sglang_gpu.py profile --model "$model" --context 131072 \
        --batch 8 --out "$out/sglang_profile.json" >"$out/profile.log" 2>&1 ;;
    load)
      timeout 420 python3 loadtests/full_run.py --engines embedded sglang --device cuda \
        ${model:+--model "$model"} --out "$out" >"$out/load.log" 2>&1 ;;
    *) echo "unknown step $step" >&2 ;;
  esac
  echo "[run_gpu_sglang] $step: exit $?"
  grep -a "sglang_gpu\|full_run\|passed\|failed\|Error" "$out/$step.log" 2>/dev/null | tail -20
done
