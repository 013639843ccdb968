"""The real Gemma 3 270M, as `tactic-server models pull gemma-3-270m` converted it: the embedded
engine's greedy tokens equal transformers' on a short prompt and, dense and with Tactic at
P = 0.999, on a pass-key prompt longer than the 512-token window; `serve` without --model
serves it (text completions; chat is refused: it has no chat template). Runs only where the
model was pulled (CI never downloads it)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import httpx
import pytest
import torch

from loadtests.inprocess import free_port, wait_for
from tactic_server.engine.config import EngineConfig
from tactic_server.engine.engine import Engine
from tactic_server.engine.types import GenerationRequest, SamplingParams, TacticParams
from tactic_server.models.pull import model_dir, pulled_model_dir
from tactic_server.tactic.config import TacticConfig

transformers = pytest.importorskip("transformers")
MODEL = pulled_model_dir("gemma-3-270m")
pytestmark = pytest.mark.skipif(
    MODEL is None, reason=f"gemma-3-270m is not pulled into {model_dir('gemma-3-270m')} "
    "(`tactic-server models pull gemma-3-270m`)",
)  # fmt: skip

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
LINES = "".join(f"Line {i}: the grass is green and the sky is blue.\n" for i in range(60))
NEEDLE = "# The pass key is 58213. Remember it.\n"
PASS_KEY = NEEDLE + LINES + "# What is the pass key? The pass key is"


@pytest.fixture(scope="module")
def engine():
    config = EngineConfig(model_dir=str(MODEL), max_model_len=4096, max_batch=2,
                          tactic=TacticConfig(segment_size=256))  # fmt: skip
    return Engine.from_config(config)


@pytest.fixture(scope="module")
def reference():
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    model.generation_config.eos_token_id = None

    def greedy(prompt):
        output = model.generate(torch.tensor([prompt]), max_new_tokens=GREEDY.max_tokens,
                                do_sample=False)  # fmt: skip
        return output[0, len(prompt) :].tolist()

    return greedy


def generate(engine, prompt, tactic):
    async def collect():
        request = GenerationRequest("r", tuple(prompt), GREEDY, tactic)
        outputs = [output async for output in engine.generate(request)]
        return [t for output in outputs for t in output.token_ids], outputs[-1].tactic

    return asyncio.run(collect())


def test_short_prompt_equals_transformers(engine, reference):
    prompt = engine.tokenizer.encode("The capital of France is", add_special_tokens=True)
    assert prompt[0] == 2 and len(prompt) == 6  # <bos>, then one piece a word
    tokens, _ = generate(engine, prompt, TacticParams(False))
    assert tokens == reference(prompt)
    assert engine.tokenizer.decode(tokens).startswith(" the capital of the country of France.")


def test_pass_key_beyond_the_window_equals_transformers_dense_and_at_p_near_one(engine, reference):
    prompt = engine.tokenizer.encode(PASS_KEY, add_special_tokens=True)
    assert len(prompt) > 900  # beyond the sliding window of 512, over three segments
    expected = reference(prompt)
    assert engine.tokenizer.decode(expected).startswith(" 58213")
    dense, _ = generate(engine, prompt, TacticParams(False))
    assert dense == expected
    tokens, usage = generate(engine, prompt, TacticParams(True, 0.999))
    assert tokens == expected
    assert 0 < usage.selected_ratio < 0.95 and usage.estimated_mass >= 0.999 - 1e-4


def test_serve_without_model_serves_the_pulled_gemma(tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "tactic_server.cli", "serve", "--port", str(port),
             "--max-model-len", "4096"], stderr=sink, env=os.environ,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/ready", process)
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "gemma-3-270m"
        body = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        assert reply["choices"][0]["text"].startswith(" the capital of the country of France")
        # a base model: the GGUF has no chat template, and chat says so
        chat = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
        reply = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60)
        assert reply.status_code == 400 and "no chat template" in reply.json()["error"]["message"]
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert "no --model: serving the pulled gemma-3-270m" in log.read_text()
