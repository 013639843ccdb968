#!/usr/bin/env bash
# Splits a packed site (default .whl-sgl/site.tar.xz, 57 MiB) into two carried folders,
# .whl-sgl-part1/ and .whl-sgl-part2/, for when it no longer fits beside the tree in the 64 MiB a
# device call carries (the bundled model takes 26 MB of the tree). Carry part1 in one call and
# part2 in the next, issued at once (the machine keeps /tmp only while warm); scripts/gpu_env.sh
# keeps the parts and unpacks the site once both are there, checking its sha256. Later calls on
# the warm machine carry neither. Part 1 is PART1_MIB (default 23.5) so that it travels with
# .whl-hf (10 MiB: the embedded engine's and the server's packages) and the tree; part 2 is the
# rest (34 MiB of the 57).
#   bash scripts/split_site.sh [ARCHIVE]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
archive=${1:-.whl-sgl/site.tar.xz}
[ -f "$archive" ] || { echo "no $archive: run scripts/stage_sglang_wheels.sh first" >&2; exit 1; }
name=sglang-site.tar.xz
digest=$(sha256sum "$archive" | cut -d' ' -f1)
size=$(stat -c %s "$archive")
half=$(python3 -c "print(min($size - 1, int(${PART1_MIB:-23.5} * 2**20)))")
rm -rf .whl-sgl-part1 .whl-sgl-part2
mkdir -p .whl-sgl-part1 .whl-sgl-part2
head -c "$half" "$archive" >.whl-sgl-part1/$name.part1
tail -c +$((half + 1)) "$archive" >.whl-sgl-part2/$name.part2
for folder in .whl-sgl-part1 .whl-sgl-part2; do
  printf '%s %s\n%s\n%s\n' "$name" "$digest" "$name.part1" "$name.part2" >$folder/parts.manifest
done
ls -l .whl-sgl-part1 .whl-sgl-part2
