"""Plan the device calls that bring archives too large for one call (SGLang's packed site, FA3's
library) to the GPU machine beside the working tree: each call carries the tree plus at most
64 MiB in all, so the archives' bytes are laid end to end and cut where a call is full. Prints
each call's carry list, and with --split cuts the archives so (scripts/split_site.sh with the
computed SIZES_MB; scripts/gpu_env.sh unpacks each archive once its parts have all come).

The tree is counted as the device tool counts it: tracked and untracked-not-ignored files, in
4 KiB blocks. A result file added to the tree after the split shrinks every call's room: plan
again (and split again) just before the calls.

    python scripts/plan_device_calls.py            # the plan, from the archives staged here
    python scripts/plan_device_calls.py --split    # and cut them so
    python scripts/plan_device_calls.py --archives hf gemma --split   # Gemma 3's GGUF
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CALL_KIB = 64 * 1024  # what one device call carries, tree included
BLOCK = 4096
PART_OVERHEAD_KIB = 8  # a part folder's manifest and the part's last block
# name: (archive, part folders' prefix, the name its parts carry). The end-to-end runs take
# SGLang's site first, so that the calls after it can work while FA3's parts still come; the
# Gemma 3 runs of the embedded engine take the transformers site (the converter's packages)
# and Gemma's GGUF (scripts/stage_hf_site.sh, scripts/stage_gemma_gguf.sh)
ARCHIVES = {
    "sglang": (".whl-sgl/site.tar.xz", ".whl-sgl-part", "sglang-site.tar.xz"),
    "fa3": (".whl-fa3/flash_ops.tar.xz", ".whl-fa3-part", "fa3-flash-ops.tar.xz"),
    "hf": (".whl-hf/site.tar.xz", ".whl-hf-part", "hf-site.tar.xz"),
    "gemma": (".whl-gemma/gemma-gguf.tar.xz", ".whl-gemma-part", "gemma-gguf.tar.xz"),
}


@dataclass(frozen=True)
class Piece:
    archive: int  # index into the archives planned
    part: int  # 1-based part number of that archive
    size: int  # bytes


def tree_kib(root: Path = ROOT) -> int:
    """KiB the device tool counts for the working tree (4 KiB blocks a file)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root, check=True, capture_output=True,
    ).stdout.decode().split("\0")  # fmt: skip
    blocks = 0
    for name in filter(None, listed):
        path = root / name
        if path.is_file() and not path.is_symlink():
            blocks += -(-path.stat().st_size // BLOCK)
    return blocks * BLOCK // 1024


def plan(sizes: list[int], room_kib: int) -> list[list[Piece]]:
    """The archives' bytes (sizes, in order) laid end to end over calls of room_kib each, a
    part folder costing PART_OVERHEAD_KIB besides its bytes: the calls, each a list of pieces."""
    if room_kib <= PART_OVERHEAD_KIB:
        raise ValueError(f"no room beside the tree ({room_kib} KiB a call)")
    calls: list[list[Piece]] = [[]]
    left = room_kib * 1024
    for archive, size in enumerate(sizes):
        part, remaining = 0, size
        while remaining > 0:
            usable = left - PART_OVERHEAD_KIB * 1024
            if usable < 1024 * 1024:  # under a MiB left: not worth a part of its own
                calls.append([])
                left = room_kib * 1024
                continue
            take = min(remaining, usable)
            part += 1
            calls[-1].append(Piece(archive, part, take))
            left -= take + PART_OVERHEAD_KIB * 1024
            remaining -= take
    return [call for call in calls if call]


def sizes_mb(pieces: list[Piece], archive: int) -> list[str]:
    """split_site.sh's SIZES_MB for one archive: every part but the last, in megabytes (10^6
    bytes, to the byte); empty where the archive travels whole."""
    parts = sorted((p for p in pieces if p.archive == archive), key=lambda p: p.part)
    return [f"{p.size / 1e6:.6f}" for p in parts[:-1]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", action="store_true", help="cut the archives as planned")
    parser.add_argument("--margin-kib", type=int, default=512,
                        help="KiB left free in every call (results the tree may gain)")
    parser.add_argument("--archives", nargs="+", choices=list(ARCHIVES),
                        help="what travels, in this order (default: those of sglang and fa3 "
                        "that are staged, the end-to-end runs; hf gemma: Gemma 3 in the "
                        "embedded engine)")  # fmt: skip
    parser.add_argument("--without-fa3", action="store_true", help="SGLang's site alone")
    args = parser.parse_args()
    names = args.archives or [n for n in ("sglang", "fa3") if (ROOT / ARCHIVES[n][0]).is_file()]
    names = [n for n in names if not (args.without_fa3 and n == "fa3")]
    if not names:
        print("no staged archive: run scripts/stage_sglang_wheels.sh (STAGE_FA3=1 for FA3) "
              "first", file=sys.stderr)  # fmt: skip
        return 1
    missing = [ARCHIVES[n][0] for n in names if not (ROOT / ARCHIVES[n][0]).is_file()]
    if missing:
        print(f"not staged: {', '.join(missing)} (scripts/stage_sglang_wheels.sh, STAGE_FA3=1 "
              "for FA3; scripts/stage_hf_site.sh; scripts/stage_gemma_gguf.sh)",
              file=sys.stderr)  # fmt: skip
        return 1
    archives = [ARCHIVES[n] for n in names]
    tree = tree_kib()
    room = CALL_KIB - tree - args.margin_kib
    sizes = [os.path.getsize(ROOT / a[0]) for a in archives]
    try:
        calls = plan(sizes, room)
    except ValueError as error:
        print(f"plan_device_calls: {error}; the tree is {tree} KiB", file=sys.stderr)
        return 1
    every = [piece for call in calls for piece in call]
    print(f"tree {tree} KiB; {room} KiB a call for parts; "
          f"{sum(sizes) / 1e6:.1f} MB of archives in {len(calls)} calls")  # fmt: skip
    whole = set()
    for index, (path, folder, name) in enumerate(archives):
        parts = sizes_mb(every, index)
        if not parts:  # one part: its own folder travels, site.tar.xz in it (gpu_env.sh unpacks a
            # carried site.tar.xz; FA3's library, larger than a call, always comes in parts)
            if not path.endswith("site.tar.xz"):
                print(f"plan_device_calls: {path} fits one call but travels only in parts: "
                      f"PARTS=2 bash scripts/split_site.sh {path} {folder} {name}",
                      file=sys.stderr)  # fmt: skip
                return 1
            whole.add(index)
            continue
        command = (f'SIZES_MB="{" ".join(parts)}" bash scripts/split_site.sh {path} {folder} '
                   f"{name}")  # fmt: skip
        print(command)
        if args.split:
            environment = dict(os.environ, SIZES_MB=" ".join(parts))
            subprocess.run(["bash", "scripts/split_site.sh", path, folder, name], cwd=ROOT,
                           env=environment, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    for number, call in enumerate(calls, 1):
        carry = [str(Path(archives[p.archive][0]).parent) if p.archive in whole
                 else f"{archives[p.archive][1]}{p.part}" for p in call]  # fmt: skip
        kib = sum(-(-p.size // 1024) + PART_OVERHEAD_KIB for p in call)
        print(f"call {number}: carry {carry}  ({kib} KiB beside the tree)")
    fewer = next((margin for margin in range(args.margin_kib - 64, -1, -64)
                  if len(plan(sizes, CALL_KIB - tree - margin)) < len(calls)), None)  # fmt: skip
    if fewer is not None:
        print(f"(--margin-kib {fewer} takes one call less, if the tree does not grow)")
    if not args.split:
        print("(add --split to cut the archives so)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
