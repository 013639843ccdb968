"""The GPU machine's staging, rehearsed in a scratch copy of the repo: a packed site split in two
by scripts/split_site.sh travels one part per call, and scripts/gpu_env.sh unpacks it once both
parts have come (checking the whole archive's sha256), then finds it in place on later calls
that carry nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def source_gpu_env(root: Path, site: Path) -> subprocess.CompletedProcess:
    # the interpreter of this test first on PATH: it imports tactic_server.kernels already,
    # so gpu_env.sh does not install the project
    env = dict(os.environ, TACTIC_SITE=str(site),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # fmt: skip
    return subprocess.run(
        ["bash", "-c", "set -u; source scripts/gpu_env.sh && python3 -c 'import staged; "
         "print(staged.VALUE)'"],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_a_site_split_in_two_is_unpacked_when_both_parts_came(tmp_path):
    root, site = tmp_path / "repo", tmp_path / "site"
    (root / "scripts").mkdir(parents=True)
    for script in ("gpu_env.sh", "split_site.sh"):
        shutil.copy(ROOT / "scripts" / script, root / "scripts" / script)
    package = tmp_path / "packed" / "staged"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("VALUE = 'from the parts'\n" + "# padding\n" * 5000)
    (root / ".whl-sgl").mkdir()
    with tarfile.open(root / ".whl-sgl" / "site.tar.xz", "w:xz") as archive:
        archive.add(package, arcname="staged")
    subprocess.run(["bash", "scripts/split_site.sh"], cwd=root, check=True, capture_output=True)
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
