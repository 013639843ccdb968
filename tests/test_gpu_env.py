"""The GPU machine's staging, rehearsed in a scratch copy of the repo: a packed site split in two
by scripts/split_site.sh travels one part per call, and scripts/gpu_env.sh unpacks it once both
parts have come (checking the whole archive's sha256), then finds it in place on later calls
that carry nothing; a second archive in parts of its own (as sgl-kernel's FA3 library travels,
scripts/stage_sglang_wheels.sh with STAGE_FA3=1) is unpacked into the same site when all of its
parts have come, whichever calls brought them."""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def source_gpu_env(root: Path, site: Path, code: str = "import staged; print(staged.VALUE)"
                   ) -> subprocess.CompletedProcess:  # fmt: skip
    # the interpreter of this test first on PATH: it imports tactic_server.kernels already,
    # so gpu_env.sh does not install the project
    env = dict(os.environ, TACTIC_SITE=str(site),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # fmt: skip
    return subprocess.run(
        ["bash", "-c", f"set -u; source scripts/gpu_env.sh && python3 -c '{code}'"],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def scratch_repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for script in ("gpu_env.sh", "split_site.sh"):
        shutil.copy(ROOT / "scripts" / script, root / "scripts" / script)
    return root


def pack(archive: Path, files: dict[str, str]) -> None:
    """An xz tar of `files` (path in the site -> text), as the staging scripts pack a site."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:xz") as packed:
        for name, text in files.items():
            data = text.encode()
            member = tarfile.TarInfo(name)
            member.size = len(data)
            packed.addfile(member, io.BytesIO(data))


def padding(lines: int) -> str:
    """Text that xz cannot shrink to nothing, so that each part holds some of it."""
    rng = random.Random(lines)
    return "".join(f"# {rng.getrandbits(64):x}\n" for _ in range(lines))


def split(root: Path, *args: str, parts: int = 2) -> None:
    subprocess.run(["bash", "scripts/split_site.sh", *args], cwd=root, check=True,
                   capture_output=True, env=dict(os.environ, PARTS=str(parts)))  # fmt: skip


def test_a_site_split_in_two_is_unpacked_when_both_parts_came(tmp_path):
    root, site = scratch_repo(tmp_path), tmp_path / "site"
    pack(root / ".whl-sgl" / "site.tar.xz",
         {"staged/__init__.py": "VALUE = 'from the parts'\n" + "# padding\n" * 5000})
    split(root)
    shutil.rmtree(root / ".whl-sgl")  # the whole archive does not travel
    later = tmp_path / "part2"
    shutil.move(root / ".whl-sgl-part2", later)

    first = source_gpu_env(root, site)  # the call that carries part 1
    assert "1 part(s) of sglang-site.tar.xz still to come" in first.stdout
    assert first.returncode != 0 and not (site / "staged").exists()

    shutil.rmtree(root / ".whl-sgl-part1")
    shutil.move(later, root / ".whl-sgl-part2")
    second = source_gpu_env(root, site)  # the next call, with part 2
    assert second.returncode == 0, second.stdout + second.stderr
    assert "unpacking sglang-site.tar.xz from its parts" in second.stdout
    assert second.stdout.strip().endswith("from the parts")

    shutil.rmtree(root / ".whl-sgl-part2")
    third = source_gpu_env(root, site)  # a later call carrying nothing
    assert third.returncode == 0 and third.stdout.strip() == "from the parts"


def test_a_second_archive_in_parts_is_unpacked_into_the_site_when_its_parts_came(tmp_path):
    root, site = scratch_repo(tmp_path), tmp_path / "site"
    pack(root / ".whl-sgl" / "site.tar.xz",
         {"staged/__init__.py": "VALUE = 'the site'\n" + padding(2000)})
    split(root)
    # as FA3 travels: one more file of a package of the site, in three parts of its own
    pack(root / ".whl-fa3" / "flash_ops.tar.xz",
         {"staged/flash_ops.py": "VALUE = 'the library'\n" + padding(6000)})
    split(root, ".whl-fa3/flash_ops.tar.xz", ".whl-fa3-part", "fa3-flash-ops.tar.xz", parts=3)
    shutil.rmtree(root / ".whl-sgl")
    shutil.rmtree(root / ".whl-fa3")
    waiting = tmp_path / "waiting"
    waiting.mkdir()
    for folder in root.glob(".whl-*-part*"):
        shutil.move(folder, waiting / folder.name)

    def call(*folders: str, code: str = "import staged; print(staged.VALUE)"):
        for folder in root.glob(".whl-*-part*"):  # what the previous call carried is gone
            shutil.rmtree(folder)
        for folder in folders:
            shutil.move(waiting / folder, root / folder)
        return source_gpu_env(root, site, code)

    both = "import staged, staged.flash_ops; print(staged.VALUE, staged.flash_ops.VALUE)"
    first = call(".whl-sgl-part1", ".whl-fa3-part1")
    assert "1 part(s) of sglang-site.tar.xz still to come" in first.stdout
    assert "2 part(s) of fa3-flash-ops.tar.xz still to come" in first.stdout
    second = call(".whl-sgl-part2", ".whl-fa3-part2", code=both)
    assert "unpacking sglang-site.tar.xz from its parts" in second.stdout
    assert "1 part(s) of fa3-flash-ops.tar.xz still to come" in second.stdout
    # the site is in place, the library not yet
    assert second.returncode != 0 and "No module named 'staged.flash_ops'" in second.stderr
    third = call(".whl-fa3-part3", code=both)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "unpacking fa3-flash-ops.tar.xz from its parts" in third.stdout
    assert "sglang-site.tar.xz" not in third.stdout  # unpacked once
    assert third.stdout.strip().endswith("the site the library")
    assert not list((tmp_path / "site.parts").iterdir())  # the parts do not stay on the disk
    assert call(code=both).stdout.strip() == "the site the library"
