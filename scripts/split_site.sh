#!/usr/bin/env bash
# Splits a packed archive (default .whl-sgl/site.tar.xz, 57 MiB) into PARTS (default 2) carried
# folders, FOLDER1/ ... FOLDERN/ (default .whl-sgl-part1/ ...), for when it no longer fits beside
# the tree in the 64 MiB a device call carries (the bundled model takes 26 MB of the tree). Carry
# one part a call, the calls issued at once (the machine keeps /tmp only while warm);
# scripts/gpu_env.sh keeps the parts and unpacks the archive into the site once all are there,
# checking its sha256 (each folder holds NAME.manifest: NAME and the sha256, then the parts).
# Later calls on the warm machine carry none. With two parts, part 1 is PART1_MIB (default 23.5)
# so that it travels with .whl-hf (10 MiB: the embedded engine's and the server's packages) and
# the tree, part 2 the rest (34 MiB of the 57); with more, the parts are equal, and only a tree
# of more than 30 MiB needs more than two (then .whl-hf goes with part 1 still). sgl-kernel's
# FA3 library travels the same way (scripts/stage_sglang_wheels.sh with STAGE_FA3=1).
# SIZES_MB="9.4 10.7 30.5" sets the parts' sizes instead (megabytes, 10^6 bytes; one more part
# takes the rest), to fill what other carried folders leave of a call's 64 MiB: e.g. FA3's parts
# beside SGLang's three, so that both travel in five calls instead of six.
#   bash scripts/split_site.sh [ARCHIVE [FOLDER [NAME]]]        PARTS=3 bash scripts/split_site.sh
#   SIZES_MB="9.4 10.7 30.5" bash scripts/split_site.sh .whl-fa3/flash_ops.tar.xz .whl-fa3-part fa3-flash-ops.tar.xz
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
archive=${1:-.whl-sgl/site.tar.xz}
folder=${2:-.whl-sgl-part}
name=${3:-sglang-site.tar.xz}
[ -f "$archive" ] || { echo "no $archive: run scripts/stage_sglang_wheels.sh first" >&2; exit 1; }
parts=${PARTS:-2}
digest=$(sha256sum "$archive" | cut -d' ' -f1)
size=$(stat -c %s "$archive")
if [ -n "${SIZES_MB:-}" ]; then
  # shellcheck disable=SC2206  # a list of numbers
  lengths=($(python3 -c "import sys; s = [int(float(x) * 1e6) for x in sys.argv[2:]]
assert sum(s) < int(sys.argv[1]), f'SIZES_MB add up to the whole archive ({sys.argv[1]} bytes)'
print(*s, int(sys.argv[1]) - sum(s))" "$size" $SIZES_MB)) || exit 1
  parts=${#lengths[@]}
else
  [ "$parts" -ge 2 ] || { echo "PARTS must be at least 2" >&2; exit 1; }
  if [ "$parts" -eq 2 ]; then
    first=$(python3 -c "print(min($size - 1, int(${PART1_MIB:-23.5} * 2**20)))")
  else
    first=$(( (size + parts - 1) / parts ))
  fi
  rest=$(( (size - first + parts - 2) / (parts - 1) ))
  lengths=("$first")
  for _ in $(seq 2 "$parts"); do lengths+=("$rest"); done
fi
rm -rf "$folder"[0-9]*
offset=0
names=()
for i in $(seq 1 "$parts"); do
  length=${lengths[$((i - 1))]}
  mkdir -p "$folder$i"
  dd if="$archive" of="$folder$i/$name.part$i" bs=1M iflag=skip_bytes,count_bytes \
    skip="$offset" count="$length" status=none
  offset=$((offset + length))
  names+=("$name.part$i")
done
for i in $(seq 1 "$parts"); do
  { printf '%s %s\n' "$name" "$digest"; printf '%s\n' "${names[@]}"; } >"$folder$i/$name.manifest"
done
ls -l "$folder"[0-9]*
