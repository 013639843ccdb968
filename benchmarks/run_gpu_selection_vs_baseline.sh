#!/usr/bin/env bash
# On the GPU machine: the decode benchmark with this tree's selection kernels and then with a
# baseline, same machine, same run, so a kernel change is judged against what it replaces. The
# baseline is either a copy of kernels/selection.py (git-ignored .baseline/selection.py, carried:
# e.g. `git show <commit>:kernels/selection.py > .baseline/selection.py`), swapped in for its
# run, or, where the change reaches beyond that file (the cluster pool's format, say), a whole
# tree of the baseline commit without the bundled model (.baseline/tree, which wins when both
# are there): `mkdir -p .baseline/tree && git archive <commit> kernels tactic_server benchmarks |
# tar x -C .baseline/tree --exclude='*.safetensors' --exclude='benchmarks/results'`; its own
# benchmarks/decode_attention.py then runs over its own packages. Several trees,
# .baseline/tree-NAME, run one after another (a bisection in one call: selection_base-NAME.*). LAUNCH: the new kernels' launch options
# (decode_attention.py --launch-options), NEW_ARGS: more arguments for the new run alone (ones
# the baseline's decode_attention.py may not know); the baseline runs with its defaults. The rest of the
# arguments go to decode_attention.py for both (FlashInfer left out: selection is what changes).
# Results: $OUT/selection_new.{json,log}, $OUT/selection_base.{json,log}.
#     LAUNCH="default;score_replicas=1" bash benchmarks/run_gpu_selection_vs_baseline.sh \
#         --contexts 131072 --batches 1 16 --fractions 0.03
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/gpu_env.sh >/dev/null 2>&1 || { echo "gpu_env failed"; exit 1; }
[ -f .baseline/selection.py ] || compgen -G ".baseline/tree*/" >/dev/null ||
  { echo "no .baseline/selection.py or .baseline/tree* (carry it)"; exit 1; }
common=(--no-flashinfer --clustering-contexts "$@")
# shellcheck disable=SC2086  # NEW_ARGS: words for the new run only (e.g. --centroids kv fp8)
PYTHONUNBUFFERED=1 python3 benchmarks/decode_attention.py --output "$OUT/selection_new.json" \
  --launch-options "${LAUNCH:-default}" ${NEW_ARGS:-} "${common[@]}" >"$OUT/selection_new.log" 2>&1
tail -8 "$OUT/selection_new.log"
trees=(.baseline/tree .baseline/tree-*)
if compgen -G ".baseline/tree*/" >/dev/null; then
  for tree in "${trees[@]}"; do
    [ -d "$tree" ] || continue
    name=selection_base${tree#.baseline/tree}
    # its packages first on the path (the editable install's finder comes after it); the
    # package maps kernels/ to tactic_server.kernels only when installed, so a link does it here
    (cd "$tree" && ln -sfn ../kernels tactic_server/kernels &&
      PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 python3 \
        benchmarks/decode_attention.py --output "$OUT/$name.json" "${common[@]}" \
        >"$OUT/$name.log" 2>&1)
    echo "$name"; tail -8 "$OUT/$name.log"  # the table: every cell, as for the new run
  done
else
  cp kernels/selection.py /tmp/selection_new.py
  cp .baseline/selection.py kernels/selection.py
  PYTHONUNBUFFERED=1 python3 benchmarks/decode_attention.py --output "$OUT/selection_base.json" \
    "${common[@]}" >"$OUT/selection_base.log" 2>&1
  cp /tmp/selection_new.py kernels/selection.py  # the tree as it came, for later steps
  tail -8 "$OUT/selection_base.log"
fi
