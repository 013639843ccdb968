"""scripts/plan_device_calls.py: archives laid over device calls beside the tree, each call
within its room, every byte carried once, and the tree counted in 4 KiB blocks as the device
tool counts it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from plan_device_calls import PART_OVERHEAD_KIB, plan, sizes_mb, tree_kib  # noqa: E402

MB = 10**6


@pytest.mark.parametrize("sizes,room_kib", [
    ([60_100_000, 72_423_880], 25_560),  # SGLang's site and FA3's library, 2026-12-07
    ([60_100_000], 26_596),
    ([5 * MB, 3 * MB], 26_596),  # both in one call
    ([26_000 * 1024, 1], 26_008),  # a call filled to the KiB, then a byte
])  # fmt: skip
def test_every_byte_travels_once_within_each_calls_room(sizes, room_kib):
    calls = plan(sizes, room_kib)
    for call in calls:
        assert sum(p.size + PART_OVERHEAD_KIB * 1024 for p in call) <= room_kib * 1024
    pieces = [p for call in calls for p in call]
    for archive, size in enumerate(sizes):
        parts = [p for p in pieces if p.archive == archive]
        assert [p.part for p in parts] == list(range(1, len(parts) + 1))  # in order
        assert sum(p.size for p in parts) == size
    # no call but the last is left with a MiB or more that the next one's first piece took
    total = sum(sizes) + PART_OVERHEAD_KIB * 1024 * len(pieces)
    assert len(calls) <= -(-total // (room_kib * 1024 - 1024 * 1024)) + 1


def test_split_sizes_name_all_parts_but_the_last_to_the_byte():
    calls = plan([60_100_000, 72_423_880], 25_560)
    pieces = [p for call in calls for p in call]
    site = [p for p in pieces if p.archive == 0]
    assert sizes_mb(pieces, 0) == [f"{p.size / 1e6:.6f}" for p in site[:-1]]
    assert [int(float(x) * 1e6) for x in sizes_mb(pieces, 0)] == [p.size for p in site[:-1]]
    (whole,) = plan([5 * MB], 26_596)
    assert sizes_mb(whole, 0) == []  # one part: the archive travels whole


def test_no_room_beside_the_tree_is_an_error():
    with pytest.raises(ValueError, match="no room"):
        plan([MB], PART_OVERHEAD_KIB)


def test_the_tree_is_counted_in_blocks_with_untracked_files_but_not_ignored_ones(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / ".gitignore").write_text("ignored/\n")  # 8 bytes: a block
    (tmp_path / "tracked.txt").write_bytes(b"x" * 5000)  # two blocks
    (tmp_path / "untracked.bin").write_bytes(b"y")  # a block
    (tmp_path / "ignored").mkdir()
    (tmp_path / "ignored" / "big.bin").write_bytes(b"z" * 100_000)
    git("add", "tracked.txt", ".gitignore")
    assert tree_kib(tmp_path) == 4 * 4
