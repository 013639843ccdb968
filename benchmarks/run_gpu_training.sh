#!/usr/bin/env bash
# On the GPU machine (carry [".whl-hf"], timeout 600), in three device calls issued back to back
# (the run folder $RUN, default /tmp/run-code, lives only while the machine stays warm):
#   STAGE=train    bash benchmarks/run_gpu_training.sh   # tokenizer, then 8.5 min of training
#   STAGE=resume   bash benchmarks/run_gpu_training.sh   # the rest of the planned steps
#   STAGE=accuracy bash benchmarks/run_gpu_training.sh   # benchmarks/accuracy.py on the model
# The steps are planned from the measured step time to fill PLAN minutes over the two training
# calls (default 16, of the 17 they allow). Every call leaves in $OUT (at most 8 files of 16 MiB
# come back) the model as it stands, a tar in 15 MiB parts (`cat model.tar.part-* | tar x` at
# home), and its log; the accuracy call adds accuracy.json/.md and the two plots.
# A rehearsal anywhere (CI does one on the CPU): SKIP_GPU_ENV=1 and TRAIN_ARGS / ACCURACY_ARGS
# with a tiny shape, appended to the commands (`--simulated-step-seconds S` in TRAIN_ARGS makes
# the plan and the budgets count S seconds a step, not the clock: the same steps on any machine).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source benchmarks/gpu_runner_env.sh
run=${RUN:-/tmp/run-code}
stage=${STAGE:-train}
case $stage in
  train|resume)
    resume=()
    [ "$stage" = resume ] && resume=(--resume)
    # shellcheck disable=SC2086  # TRAIN_ARGS is a list of words
    timeout 575 "$python" -m tactic_server.training.train --out "$run" --steps 100000 \
      --plan-minutes "${PLAN:-16}" --max-minutes "${MINUTES:-8.5}" "${resume[@]}" \
      ${TRAIN_ARGS:-} 2>&1 | tee "$out/train_$stage.log" \
      | awk '!/^\[train\] step / || ++n % 20 == 0'  # every 20th progress line
    status=${PIPESTATUS[0]}
    [ -d "$run/model" ] && tar cf - -C "$run" model | split -b 15m - "$out/model.tar.part-"
    exit "$status" ;;
  accuracy)
    # shellcheck disable=SC2086
    timeout 570 "$python" benchmarks/accuracy.py --model "$run/model" --out "$out/accuracy" \
      ${ACCURACY_ARGS:-} 2>&1 | tee "$out/accuracy.log" | grep -v "^Loading weights"
    exit "${PIPESTATUS[0]}" ;;
  *) echo "STAGE must be train, resume or accuracy" >&2; exit 2 ;;
esac
