"""The training script on the CPU at a tiny scale: the loss goes down, an interrupted run resumed
from its checkpoint reads the same batches and reaches the same losses as an uninterrupted one,
the exported checkpoint loads in the embedded engine and answers, and the synthetic tasks put
their answer in the context."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from tactic_server.engine.config import EngineConfig  # noqa: E402
from tactic_server.engine.engine import Engine  # noqa: E402
from tactic_server.engine.types import GenerationRequest, SamplingParams  # noqa: E402
from tactic_server.tactic.config import TacticConfig  # noqa: E402
from tactic_server.training.data import TASKS, task  # noqa: E402
from tactic_server.training.train import Batches, Prefetched, TrainConfig, prepare, train  # noqa: E402

CORPUS = str(Path(__file__).resolve().parent.parent / "tactic_server")


def tiny(out: Path, **changes) -> TrainConfig:
    settings = dict(out=str(out), roots=(CORPUS,), steps=24, seq_len=256, batch=4, layers=2,
                    hidden=128, heads=2, kv_heads=1, head_dim=64, intermediate=256,
                    vocab_size=600, warmup=4, lr=3e-3, checkpoint_every=8, log_every=100,
                    max_position_embeddings=1024, device="cpu")  # fmt: skip
    return TrainConfig(**(settings | changes))


def test_loss_decreases_and_the_model_serves(tmp_path):
    state = train(tiny(tmp_path / "run"), log=lambda line: None)
    losses = state["losses"]
    assert len(losses) == 24 and state["tokens_seen"] == 24 * 4 * 256
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5
    model_dir = tmp_path / "run" / "model"
    assert "final loss" in (model_dir / "README.md").read_text()
    engine = Engine.from_config(EngineConfig(model_dir=str(model_dir), max_model_len=1024,
                                             tactic=TacticConfig(segment_size=64)))  # fmt: skip

    async def complete() -> int:
        request = GenerationRequest("r", tuple(engine.tokenizer.encode("def main(", True)),
                                    SamplingParams(max_tokens=8, temperature=0.0,
                                                   ignore_eos=True))  # fmt: skip
        produced = 0
        async for output in engine.generate(request):
            produced = output.completion_tokens
        await engine.shutdown()
        return produced

    assert asyncio.run(complete()) == 8


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path):
    whole = train(tiny(tmp_path / "whole"), log=lambda line: None)
    cut = train(tiny(tmp_path / "cut", max_minutes=0.0), log=lambda line: None)
    assert cut["step"] == 1  # the time budget ran out after the first step
    resumed = train(tiny(tmp_path / "cut"), resume=True, log=lambda line: None)
    assert resumed["step"] == 24
    assert resumed["losses"] == pytest.approx(whole["losses"], abs=1e-3)


@pytest.mark.parametrize("kind", TASKS)
def test_tasks_hide_their_answer_in_a_long_context(kind):
    prompt, answer = task(kind, random.Random(3), 20_000)
    assert 15_000 < len(prompt) < 25_000
    value = answer.strip().strip('"')
    assert value.isdigit() and value in prompt[: len(prompt) - 10]


def test_prefetched_batches_are_the_batches_of_their_steps(tmp_path):
    config = tiny(tmp_path / "run", seq_len=512)
    sources, tokenizer = prepare(config, log=lambda line: None)
    batches = Batches(config, sources, tokenizer)
    ahead = Prefetched(batches, first=5, last=12, depth=3)
    try:
        got = [ahead(step) for step in range(5, 12)]
    finally:
        ahead.close()
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    for step, tokens in zip(range(5, 12), got, strict=True):
        assert tokens.shape == (config.batch, config.seq_len + 1)
        assert (tokens[:, 0] == bos).all()
        assert tokens.equal(batches(step))
    assert not got[0].equal(got[1])


def test_planned_steps_fill_the_minutes_and_survive_a_resume(tmp_path):
    # a step counts as 0.125 s whatever the machine: warm-up times steps 2..8 (0.75 s), so the
    # 3 s of the plan leave (3 - 1.0) / 0.125 = 16 steps after step 8, and this run's own 1.2 s
    # stop it after step 10 (1.25 s)
    config = tiny(tmp_path / "run", steps=10_000, warmup=8, plan_minutes=0.05,
                  simulated_step_seconds=0.125)  # fmt: skip
    lines = []
    first = train(dataclasses.replace(config, max_minutes=0.02), log=lines.append)
    assert first["planned_steps"] == first["steps"] == 24
    assert any("0.125 s a step: 24 steps fill 0.05 min" in line for line in lines)
    assert first["step"] == 10  # this run's own budget stopped it first
    resumed = train(config, resume=True, log=lambda line: None)
    assert resumed["step"] == resumed["steps"] == 24
    assert len(resumed["losses"]) == 24


def test_the_gpu_training_runner_rehearsed_on_the_cpu(tmp_path):
    """benchmarks/run_gpu_training.sh, its three stages at a tiny shape: the model comes back
    as tar parts that unpack into a servable checkpoint, and the accuracy report is complete.
    A step counts as 0.25 s (so the verdict does not hang on this machine's speed): the plan of
    4.8 s leaves 11 steps after the 8 of warm-up (2 s), 19 in all; the first call's 2.4 s stop
    it at step 10, the first resume does the other 9 and the second finds nothing left."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, SKIP_GPU_ENV="1", PYTHON=sys.executable, RUN=str(tmp_path / "run"),
               OUT=str(tmp_path / "out"), PLAN="0.08", MINUTES="0.04",
               TRAIN_ARGS="--seq-len 256 --batch 2 --layers 2 --hidden 64 --heads 2 --kv-heads 1 "
                          "--head-dim 32 --intermediate 128 --vocab-size 500 --warmup 8 "
                          "--simulated-step-seconds 0.25 "
                          f"--roots {root / 'tactic_server'} {root / 'tests'} "
                          "--max-position-embeddings 2048",
               ACCURACY_ARGS="--lengths 512 --trials 1 --attention-prompts 1 --device cpu "
                             "--attention-steps 1 --attention-length 1100 "
                             "--perplexity-tokens 1000")  # fmt: skip
    script = root / "benchmarks" / "run_gpu_training.sh"
    logs = {}
    for stage in ("train", "resume", "resume", "accuracy"):
        done = subprocess.run(["bash", str(script)], env=dict(env, STAGE=stage), cwd=root,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        logs.setdefault(stage, []).append(done.stdout)
    assert "paused at step 10 of 19" in logs["train"][0]
    assert "done: all 19 steps" in logs["resume"][0] and "done: all 19 steps" in logs["resume"][1]
    parts = sorted((tmp_path / "out").glob("model.tar.part-*"))
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as archive:
        archive.extractall(tmp_path / "home", filter="data")
    card = json.loads((tmp_path / "home" / "model" / "training.json").read_text())
    assert card["training"]["steps"] == card["training"]["planned_steps"] == 19
    report = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert report["complete"] and {r["context"] for r in report["retrieval"]} == {512}
