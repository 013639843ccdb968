"""The evaluation baselines inside the embedded engine (oracle, Quest, top-k in place of Tactic's
selection, for benchmarks/accuracy.py): at a full budget they equal dense decoding, at a partial
one they read the share they were given, and the kernel backend hands them to the torch path."""

import asyncio
import dataclasses

import pytest
import torch

from tactic_server.engine.config import EngineConfig
from tactic_server.engine.engine import Engine
from tactic_server.engine.types import GenerationRequest, SamplingParams, TacticParams
from tactic_server.tactic.config import TacticConfig
from tactic_server.testing.tiny_model import make_tiny_model

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("peaked"), "llama", seed=5,
                           sparse_attention=True)  # fmt: skip


def engine_for(model_dir, **overrides) -> Engine:
    config = EngineConfig(model_dir=str(model_dir), max_model_len=1024, max_batch=4,
                          tactic=TacticConfig(segment_size=64))  # fmt: skip
    return Engine.from_config(dataclasses.replace(config, **overrides))


def prompt(length: int, seed: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(5, 400, (length,), generator=generator).tolist())


def generate(engine: Engine, requests):
    async def one(request):
        outputs = [output async for output in engine.generate(request)]
        return [t for o in outputs for t in o.token_ids], outputs[-1].tactic

    async def every():
        return await asyncio.gather(*(one(r) for r in requests))

    return asyncio.run(every())


FULL = {
    "oracle": TacticParams(True, 1.0, method="oracle"),
    "quest": TacticParams(True, 0.9, method="quest", budget=1.0),
    "topk": TacticParams(True, 0.9, method="topk", budget=1.0),
}


def test_baselines_at_a_full_budget_decode_like_dense(model_dir):
    engine = engine_for(model_dir)
    ids = prompt(300, seed=2)
    requests = [GenerationRequest("dense", ids, GREEDY, TacticParams(enabled=False))]
    requests += [GenerationRequest(name, ids, GREEDY, tactic) for name, tactic in FULL.items()]
    (dense, _), *baselines = generate(engine, requests)
    for name, (tokens, usage) in zip(FULL, baselines, strict=True):
        assert tokens == dense, name
        assert usage.selected_ratio == pytest.approx(1.0), name
    assert engine.stats().kv_slots_in_use == 0


def test_baselines_read_the_share_they_are_given(model_dir):
    engine = engine_for(model_dir)
    ids = prompt(400, seed=3)
    requests = [
        GenerationRequest("topk", ids, GREEDY, TacticParams(True, 0.9, "topk", budget=0.25)),
        GenerationRequest("quest", ids, GREEDY, TacticParams(True, 0.9, "quest", budget=0.25)),
        GenerationRequest("oracle", ids, GREEDY, TacticParams(True, 0.9, "oracle")),
    ]
    (_, topk), (_, quest), (_, oracle) = generate(engine, requests)
    # top-k reads round(0.25 L) of L tokens; Quest whole pages of 16 plus the partial last page
    assert topk.selected_ratio == pytest.approx(0.25, abs=1 / 400)
    assert 0.25 - 16 / 400 <= quest.selected_ratio <= 0.25 + 32 / 400
    assert 0 < oracle.selected_ratio < 1 and oracle.estimated_mass >= 0.9 - 1e-6


def test_the_kernel_backend_runs_baselines_in_torch(model_dir):
    requests = [GenerationRequest("k", prompt(150, seed=4), GREEDY,
                                  TacticParams(True, 0.9, "topk", budget=0.3))]  # fmt: skip
    results = {}
    for backend in ("torch", "triton"):
        device = "cuda" if torch.cuda.is_available() and backend == "triton" else "cpu"
        engine = engine_for(model_dir, attention_backend=backend, device=device)
        results[backend] = generate(engine, requests)[0]
    assert results["triton"][0] == results["torch"][0]
    assert results["triton"][1].selected_ratio == pytest.approx(results["torch"][1].selected_ratio)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(method="random"), "method must be one of"),
        (dict(method="quest"), "take a budget"),
        (dict(budget=0.5), "take a budget"),
        (dict(method="topk", budget=1.5), r"budget must be in \(0, 1\]"),
    ],
)
def test_bad_baseline_parameters_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        TacticParams(**changes)
