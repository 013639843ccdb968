#!/usr/bin/env bash
# On the GPU machine (device call with carry [".whl"]): the selection and decode kernel tests on
# CUDA, the profile of one selection step, and the decode benchmark with the given arguments
# (it replaces run_gpu_kernels.sh, which ran every gpu-marked test before the benchmark: the
# SGLang ones need the SGLang site, which a kernel run does not carry).
# Everything lands in $OUT.  NCU="131072:16": Nsight Compute sections of the selection kernels
# (NCU_LAUNCH: their launch options, one profile each; NCU_CENTROIDS: kv or fp8, the default).
# Usage: PROFILE="131072:1 131072:16" bash benchmarks/run_gpu_selection.sh \
#     --contexts 32768 131072 --batches 1 16 --fractions 0.01 0.03 0.1 0.3
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/gpu_env.sh >/dev/null 2>&1 || { echo "gpu_env failed"; exit 1; }
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # TESTS_K: a pytest -k expression, to run part of them where device time is short
  python3 -m pytest -q tests/test_kernels_selection.py tests/test_kernels_decode.py \
    ${TESTS_K:+-k "$TESTS_K"} >"$OUT/gpu_kernel_tests.log" 2>&1
  tail -3 "$OUT/gpu_kernel_tests.log"
fi
for shape in ${PROFILE:-}; do
  for centroids in ${PROFILE_CENTROIDS:-kv}; do  # e.g. PROFILE_CENTROIDS="kv fp8"
    variance=${PROFILE_VARIANCE:-diagonal}  # e.g. PROFILE_VARIANCE=profile
    # PROFILE_LAUNCH="default real_rows=0": select_rows' launch options
    for launch in ${PROFILE_LAUNCH:-default}; do
      [ "$launch" = default ] && launch=
      name=profile_selection_${shape%%:*}_b${shape##*:}_${centroids}_$variance
      # PROFILE_CONFIG="cluster_size=8,boundary_tokens=true,boundary_band=0.1": more fields
      config=${PROFILE_CONFIG:-}
      name=$name${launch:+_${launch//[=,]/_}}${config:+_${config//[=,.]/_}}.txt
      python3 benchmarks/profile_selection.py --context "${shape%%:*}" --batch "${shape##*:}" \
        --centroids "$centroids" --variance "$variance" --launch "$launch" --config "$config" \
        >"$OUT/$name" 2>&1
      echo "$name"; grep -E "_score_units_kernel|_exact_units_kernel|^step" "$OUT/$name"
    done
  done
done
# Nsight Compute on the selection kernels of one step (after two warm steps), per NCU shape and
# NCU_LAUNCH launch (e.g. NCU_LAUNCH="default score_stream=1"), with the DRAM bytes each moved
for shape in ${NCU:-}; do
  for launch in ${NCU_LAUNCH:-default}; do
    [ "$launch" = default ] && launch=
    name=ncu_selection_${shape%%:*}_b${shape##*:}${launch:+_${launch//[=,]/_}}.txt
    ncu --clock-control none -k 'regex:_score_units_kernel|_exact_units_kernel|_mark_kernel|_write_rows_kernel|_exact_list_kernel' \
      --launch-skip 10 --launch-count 5 --section SpeedOfLight --section WarpStateStats \
      --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis \
      --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct \
      python3 benchmarks/profile_selection.py --context "${shape%%:*}" --batch "${shape##*:}" \
      --centroids "${NCU_CENTROIDS:-fp8}" --launch "$launch" >"$OUT/$name" 2>&1
    echo "$name"
    grep -E "^  _|Duration|DRAM Throughput|dram__bytes|lts__t_sector_hit|Registers Per|Achieved Occ" \
      "$OUT/$name" | head -48
  done
done
if [ $# -gt 0 ]; then
  PYTHONUNBUFFERED=1 python3 benchmarks/decode_attention.py --output "$OUT/decode_attention.json" \
    "$@" >"$OUT/decode_attention.log" 2>&1
  tail -30 "$OUT/decode_attention.log"
fi
