#!/usr/bin/env bash
# On the GPU machine: the decode benchmark with this tree's selection kernels and then with a
# baseline copy of kernels/selection.py (git-ignored .baseline/selection.py, carried: e.g.
# `git show <commit>:kernels/selection.py > .baseline/selection.py`), same machine, same run, so
# a kernel change is judged against what it replaces. LAUNCH: the new kernels' launch options
# (decode_attention.py --launch-options); the baseline runs with its defaults. The rest of the
# arguments go to decode_attention.py for both (FlashInfer left out: selection is what changes).
# Results: $OUT/selection_new.{json,log}, $OUT/selection_base.{json,log}.
#     LAUNCH="default;score_replicas=1" bash benchmarks/run_gpu_selection_vs_baseline.sh \
#         --contexts 131072 --batches 1 16 --fractions 0.03
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/gpu_env.sh >/dev/null 2>&1 || { echo "gpu_env failed"; exit 1; }
[ -f .baseline/selection.py ] || { echo "no .baseline/selection.py (carry it)"; exit 1; }
common=(--no-flashinfer --clustering-contexts "$@")
PYTHONUNBUFFERED=1 python3 benchmarks/decode_attention.py --output "$OUT/selection_new.json" \
  --launch-options "${LAUNCH:-default}" "${common[@]}" >"$OUT/selection_new.log" 2>&1
tail -8 "$OUT/selection_new.log"
cp kernels/selection.py /tmp/selection_new.py
cp .baseline/selection.py kernels/selection.py
PYTHONUNBUFFERED=1 python3 benchmarks/decode_attention.py --output "$OUT/selection_base.json" \
  "${common[@]}" >"$OUT/selection_base.log" 2>&1
tail -8 "$OUT/selection_base.log"
cp /tmp/selection_new.py kernels/selection.py  # the tree as it came, for later steps
