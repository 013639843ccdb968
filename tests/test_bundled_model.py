"""The bundled model, tactic-code-13m: the shape and sizes the project promised (head_dim 128, four
query heads per KV head, at least 16k of training context, at most 30 MB in bf16 shards of at
most 15 MB, a model card), served by default, and able to retrieve a pass key from a few
thousand tokens of Python's standard library source, dense and with Tactic."""

from __future__ import annotations

import asyncio
import email
import json
import random
from pathlib import Path

import pytest

from tactic_server.engine.config import EngineConfig
from tactic_server.engine.engine import Engine
from tactic_server.engine.types import GenerationRequest, SamplingParams, TacticParams
from tactic_server.models import bundled_model_dir
from tactic_server.tactic.config import TacticConfig
from tactic_server.training.data import source_texts, task

MODEL = bundled_model_dir()
pytestmark = pytest.mark.skipif(MODEL is None, reason="the bundled weights are not installed")


def test_the_bundled_model_is_what_the_project_promised():
    config = json.loads((MODEL / "config.json").read_text())
    assert config["head_dim"] == 128
    assert config["num_attention_heads"] == 4 * config["num_key_value_heads"]
    shards = sorted(MODEL.glob("*.safetensors"))
    assert shards and all(shard.stat().st_size <= 15 * 10**6 for shard in shards)
    assert sum(shard.stat().st_size for shard in shards) <= 30 * 10**6
    card = json.loads((MODEL / "training.json").read_text())
    assert card["training"]["seq_len"] >= 16384
    assert card["training"]["steps"] == card["training"]["planned_steps"]
    assert "passkey" in (MODEL / "README.md").read_text()


def test_serve_defaults_to_it():
    engine = Engine.from_config(EngineConfig(max_model_len=1024))
    assert engine.model_name == "tactic-code-13m"
    asyncio.run(engine.shutdown())


def test_it_retrieves_a_pass_key_dense_and_with_tactic():
    engine = Engine.from_config(EngineConfig(max_batch=6, kv_slots=6 * 3200,
                                             tactic=TacticConfig(segment_size=512)))  # fmt: skip
    # background: Python's own json, email and asyncio sources, which no change of ours alters
    files = tuple(sorted(path for package in (json, email, asyncio)
                         for path in Path(package.__file__).parent.rglob("*.py")))  # fmt: skip
    background = source_texts(files, random.Random(0))
    rng = random.Random(1)
    cases = [task("passkey", rng, 9000, background) for _ in range(3)]

    async def answers(tactic: TacticParams) -> list[str]:
        async def one(number, prompt):
            ids = tuple(engine.tokenizer.encode(prompt, add_special_tokens=True))
            request = GenerationRequest(f"{tactic}-{number}", ids,
                                        SamplingParams(max_tokens=6, temperature=0.0), tactic)
            return "".join([output.text async for output in engine.generate(request)])

        return await asyncio.gather(*(one(n, prompt) for n, (prompt, _) in enumerate(cases)))

    for tactic in (TacticParams(enabled=False), TacticParams(True, 0.9)):
        got = asyncio.run(answers(tactic))
        right = sum(text.strip().startswith(key.strip()) for text, (_, key) in
                    zip(got, cases, strict=True))  # fmt: skip
        assert right >= 2, (tactic, got, [key for _, key in cases])
    assert engine.stats().kv_slots_in_use == 0
    asyncio.run(engine.shutdown())
