#!/usr/bin/env bash
# On the GPU machine: one 9-minute training run of the project's model (a second call with
# RESUME=1 continues it, while the machine is warm or with the run folder carried back), then,
# when the run is complete, the accuracy evaluation. Run folder: $RUN (default /tmp/run-code).
# $OUT gets at most 8 files of 16 MiB: the model as a tar in 15 MiB parts (`cat model.tar.part-*
# | tar x` at home), the logs, and accuracy.json/.md with its two plots.
#   STEPS=3000 bash benchmarks/run_gpu_training.sh        RESUME=1 bash benchmarks/run_gpu_training.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/gpu_env.sh || exit 1
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}
run=${RUN:-/tmp/run-code}
mkdir -p "$out"
resume=()
[ "${RESUME:-0}" = 1 ] && resume=(--resume)
timeout 580 python3 -m tactic_server.training.train --out "$run" --steps "${STEPS:-3000}" \
  --max-minutes "${MINUTES:-8.5}" "${resume[@]}" 2>&1 | tee "$out/train.log"
if grep -q "done: step ${STEPS:-3000}," "$out/train.log"; then
  tar cf - -C "$run" model | split -b 15m - "$out/model.tar.part-"
  timeout 600 python3 benchmarks/accuracy.py --model "$run/model" --out "$out/accuracy" \
    2>&1 | tee "$out/accuracy.log"
fi
