#!/usr/bin/env bash
# Gemma 3 270M on the GPU machine (issue 20 (4): accuracy on real attention and RULER tasks on
# the GPU; it has no PyPI, so the model travels as its GGUF). Staged here first:
#   bash scripts/stage_hf_site.sh        # the converter's packages (transformers, gguf, accelerate)
#   bash scripts/stage_gemma_gguf.sh     # the GGUF with its terms, about 240 MB
#   python scripts/plan_device_calls.py --archives hf gemma --split   # ~11 calls of ~25 MB
# then the planned calls back to back (the machine keeps /tmp only while warm), each
# `export OUT; source scripts/gpu_env.sh` (it keeps the parts and unpacks the GGUF once all are
# there); the last part's call, or the next, runs the stages:
#   STAGE=pull     bash benchmarks/run_gpu_gemma.sh   # models pull --gguf, tests/test_gemma3_pulled.py
#   STAGE=accuracy bash benchmarks/run_gpu_gemma.sh   # benchmarks/accuracy.py, LENGTHS x VARIANTS
# Environment: LENGTHS (default "4096 8192 16384 32768"), TRIALS (10), TASKS (the five the CPU
# runs used), VARIANTS (";"-separated engine configs, "" the defaults; default: the defaults and
# 8-token clusters with the 0.1-nat boundary band), LIMIT (seconds a run may take, 540).
# Every run writes accuracy_gemma3_<length>_<variant>.{json,md,log} and its plots, packed at the
# end into $OUT/gemma_accuracy.tar.gz (a call brings back at most 8 files).
# A rehearsal anywhere: SKIP_GPU_ENV=1 GGUF=<downloaded .gguf> TACTIC_SERVER_CACHE=<a folder>
# LENGTHS=1024 TRIALS=1 DEVICE=cpu.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source benchmarks/gpu_runner_env.sh
gguf=${GGUF:-${TACTIC_SITE:-/tmp/site}/gemma-3-270m-gguf/gemma-3-270m-q4_k_m.gguf}
model=$("$python" -c "from tactic_server.models.pull import model_dir; print(model_dir('gemma-3-270m'))")
case ${STAGE:-pull} in
  pull)
    "$python" -m tactic_server.cli models pull gemma-3-270m --gguf "$gguf" 2>&1 \
      | grep -v "^sha256\|it/s\]" | tee "$out/gemma_pull.log"
    [ "${PIPESTATUS[0]}" = 0 ] || exit 1
    timeout 400 "$python" -m pytest -q -p no:warnings tests/test_gemma3_pulled.py \
      >"$out/gemma_pulled_tests.log" 2>&1
    status=$?
    tail -3 "$out/gemma_pulled_tests.log"
    exit $status ;;
  accuracy)
    [ -f "$model/pull.json" ] || { echo "gemma-3-270m is not pulled: STAGE=pull first" >&2; exit 1; }
    IFS=';' read -r -a variants <<<"${VARIANTS-;cluster_size=8,boundary_tokens=true,boundary_band=0.1}"
    [ "${#variants[@]}" -gt 0 ] || variants=("")
    status=0
    runs=$(mktemp -d)
    for length in ${LENGTHS:-4096 8192 16384 32768}; do
      for variant in "${variants[@]}"; do
        name=accuracy_gemma3_${length}_$( [ -n "$variant" ] && echo "$variant" | tr ',=' '__' || echo default)
        args=()
        [ -n "$variant" ] && args=(--engine-variant "$variant" --tactic-variant "$variant")
        echo "[run_gpu_gemma] $name"
        # shellcheck disable=SC2086  # TASKS is a list of words
        timeout "${LIMIT:-540}" "$python" benchmarks/accuracy.py --model "$model" \
          --lengths "$length" --trials "${TRIALS:-10}" --targets 0.9 \
          --tasks ${TASKS:-niah_single niah_multikey niah_multivalue niah_multiquery frequent_words} \
          --device "${DEVICE:-cuda}" "${args[@]}" --out "$runs/$name" >"$runs/$name.log" 2>&1
        code=$?
        [ "$code" = 0 ] || { status=$code; echo "[run_gpu_gemma] $name: exit $code"; }
        grep -A3 "^Goals" "$runs/$name.md" 2>/dev/null
      done
    done
    tar czf "$out/gemma_accuracy.tar.gz" -C "$runs" . && rm -rf "$runs"
    exit $status ;;
  *) echo "STAGE must be pull or accuracy" >&2; exit 2 ;;
esac
