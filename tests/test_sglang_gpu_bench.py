"""benchmarks/sglang_gpu.py's steady decode rate: counted from the moment the batch's last
request has its first token to the last token of all, so request setup and prefill (which
vary) stay out, and a batch whose requests start apart is not credited with their lead. And
which backends a run measures: fa3 only where its library loads on an sm80-sm90 GPU, else
recorded as unavailable with the reason while the others run."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the script imports its neighbours
    try:
        spec = importlib.util.spec_from_file_location("sglang_gpu", ROOT / "benchmarks" /
                                                      "sglang_gpu.py")  # fmt: skip
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_one_request_counts_its_tokens_after_the_first(bench):
    # an empty first chunk, then a slow prefill (token 1 at 5.0 s), then 10 tokens a second
    stamps = [[(0.1, 0), (5.0, 1)] + [(5.0 + 0.1 * i, 1 + i) for i in range(1, 11)]]
    assert bench.steady_rate(stamps) == pytest.approx(10.0)


def test_a_batch_is_timed_while_all_of_its_requests_decode(bench):
    # request a starts 1 s early and makes 10 tokens alone; from 2.0 s both make 20 a second
    early = [(1.0, 1)] + [(1.0 + 0.1 * i, 1 + i) for i in range(1, 31)]  # to 4.0 s, 31 tokens
    late = [(2.0, 1)] + [(2.0 + 0.1 * i, 1 + i) for i in range(1, 21)]  # to 4.0 s, 21 tokens
    # in [2.0, 4.0]: early went 11 -> 31, late 1 -> 21
    assert bench.steady_rate([early, late]) == pytest.approx(40 / 2.0)


def test_fa3_without_its_library_is_unavailable_and_the_others_run(bench, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # sgl_kernel as staged
    backends, unavailable = bench.runnable(["flashinfer", "fa3", "triton", "tactic"], (9, 0))
    assert backends == ["flashinfer", "triton", "tactic"]
    assert list(unavailable) == ["fa3"]
    assert "not staged" in unavailable["fa3"] and "1022 MiB" in unavailable["fa3"]
    assert "STAGE_FA3=1" in unavailable["fa3"]


def test_fa3_is_unavailable_off_sm80_to_sm90_without_looking_for_its_library(bench,
                                                                             monkeypatch):
    looked = []
    monkeypatch.setattr(importlib.util, "find_spec", looked.append)
    assert "this GPU is sm100" in bench.fa3_unavailable((10, 0))
    assert looked == []


def test_a_staged_fa3_library_that_does_not_load_says_why(bench, monkeypatch):
    def broken(name):
        raise OSError("libcuda.so.1: cannot open shared object file")

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(importlib, "import_module", broken)
    why = bench.fa3_unavailable((9, 0))
    assert "does not load" in why and "libcuda.so.1" in why


def test_fa3_is_measured_where_its_library_loads(bench, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(importlib, "import_module", lambda name: None)
    assert bench.runnable(["fa3", "triton"], (9, 0)) == (["fa3", "triton"], {})
    assert bench.runnable(["triton", "tactic"], (7, 5)) == (["triton", "tactic"], {})


def test_the_dummy_gemma3_has_the_shape_of_gemma_3_270m(bench, tmp_path):
    """--dummy gemma3-270m serves Gemma 3 270M's shape with random weights (no checkpoint on the
    GPU machine): 18 layers, globals at 5 / 11 / 17, a 512-token window, 4 query heads on one KV
    head of 256; equal, field by field, to the pulled checkpoint's config where one is here."""
    transformers = pytest.importorskip("transformers")
    args = argparse.Namespace(model=None, dummy="gemma3-270m")
    model_dir, name, extra = bench.benchmark_model(args, 32768)
    assert extra == {"load_format": "dummy"} and "Gemma 3 270M" in name
    config = transformers.AutoConfig.from_pretrained(model_dir)
    assert config.model_type == "gemma3_text" and config.architectures == ["Gemma3ForCausalLM"]
    assert [i for i, kind in enumerate(config.layer_types) if kind == "full_attention"] == \
        [5, 11, 17]  # fmt: skip
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim,
            config.sliding_window, config.query_pre_attn_scalar) == (4, 1, 256, 512, 256)
    pulled = Path.home() / ".cache" / "tactic-server" / "models" / "gemma-3-270m" / "config.json"
    if pulled.exists():
        real = json.loads(pulled.read_text())
        ours = json.loads((model_dir / "config.json").read_text())
        for field in bench.GEMMA3_270M:
            if field != "rms_norm_eps":  # the checkpoint's is 1e-6 as float32 reads it back
                assert ours[field] == real[field], field
