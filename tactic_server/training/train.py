"""Train a small long-context Llama: byte-level BPE tokenizer trained on the corpus, then AdamW
with warm-up and cosine decay on packed sequences of source files and synthetic retrieval tasks.
Seeded (batch s is drawn from seed and s alone, so a resumed run reads what the uninterrupted
one would have) and resumable (a checkpoint every --checkpoint-every steps and when the time
budget runs out). The result is a Hugging Face checkpoint (bf16 safetensors in shards, tokenizer,
generation config, model card) that `tactic-server serve --model` loads.

  python -m tactic_server.training.train --out runs/tactic-code --steps 3000 --max-minutes 9
  python -m tactic_server.training.train --out runs/tactic-code --steps 3000 --resume
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tactic_server.training.data import TASKS, SourceFiles, find_sources, read_text, task
from tactic_server.training.tokenizer import EOS_TOKEN, train_tokenizer, write_tokenizer

CHARS_PER_TOKEN = 3.5  # what the 8k BPE averages on Python source (sizes the synthetic tasks)
# of the synthetic documents; passkey retrieval at the training length is the model's bar
TASK_WEIGHTS = {"passkey": 2, "multikey": 1, "variables": 1}


@dataclass
class TrainConfig:
    out: str
    roots: tuple[str, ...] = field(default_factory=lambda: (sysconfig.get_paths()["purelib"],))
    seed: int = 0
    steps: int = 3000
    max_minutes: float | None = None  # of this run; a checkpoint, then the run stops
    # when given, the steps are planned to take this many minutes in all (runs together) from
    # the step time measured during warm-up, whose learning rates do not depend on the total;
    # `steps` then caps the plan
    plan_minutes: float | None = None
    # when given, every step counts as this many seconds for the budget and the plan instead of
    # the wall clock's reading: a rehearsal (or a test) then plans and stops at the same steps on
    # any machine, however loaded
    simulated_step_seconds: float | None = None
    seq_len: int = 16384
    batch: int = 4
    lr: float = 1.5e-3
    warmup: int = 100
    weight_decay: float = 0.1
    task_share: float = 0.25  # of the documents
    vocab_size: int = 8192
    tokenizer_bytes: int = 20_000_000  # of training files the tokenizer learns from
    layers: int = 4
    hidden: int = 512
    heads: int = 4
    kv_heads: int = 1
    head_dim: int = 128
    intermediate: int = 1024
    rope_theta: float = 500_000.0
    max_position_embeddings: int = 32768
    checkpoint_every: int = 200
    log_every: int = 10
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


def model_config(config: TrainConfig, vocab_size: int, bos: int, eos: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=config.hidden, intermediate_size=config.intermediate,
        num_hidden_layers=config.layers, num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, rope_theta=config.rope_theta,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos,
        attention_bias=False, mlp_bias=False,
    )  # fmt: skip


class Batches:
    """Packed [batch, seq_len + 1] token sequences; documents start with BOS and end with EOS.
    Batch s depends only on (seed, s). A row's documents are drawn as text first and tokenized
    together by `encode_batch` (in Rust, without the GIL, so a prefetch thread overlaps it with
    the training step)."""

    def __init__(self, config: TrainConfig, sources: SourceFiles, tokenizer) -> None:
        self.config = config
        self.files = sources.train
        self.tokenizer = tokenizer
        self.eos = tokenizer.token_to_id(EOS_TOKEN)

    def document(self, rng: random.Random) -> str:
        if rng.random() < self.config.task_share or not self.files:
            tokens = rng.randint(self.config.seq_len // 16, self.config.seq_len - 64)
            background = self.source_texts(rng) if self.files else None
            kind = rng.choices(TASKS, weights=[TASK_WEIGHTS[t] for t in TASKS])[0]
            prompt, answer = task(kind, rng, int(tokens * CHARS_PER_TOKEN), background)
            return prompt + answer
        return read_text(rng.choice(self.files)) or ""

    def source_texts(self, rng: random.Random):
        """Random training files as background text, endlessly."""
        while True:
            yield read_text(rng.choice(self.files)) or ""

    def row(self, rng: random.Random) -> list[int]:
        wanted = self.config.seq_len + 1
        texts, characters = [], 0
        while characters < wanted * CHARS_PER_TOKEN * 1.2:  # usually enough in one go
            texts.append(self.document(rng))
            characters += len(texts[-1])
        row: list[int] = []
        while True:
            for encoding in self.tokenizer.encode_batch(texts):
                row += encoding.ids + [self.eos]  # the post-processor adds BOS
            if len(row) >= wanted:
                return row[:wanted]
            texts = [self.document(rng)]

    def __call__(self, step: int) -> torch.Tensor:
        rng = random.Random(self.config.seed * 1_000_003 + step)
        return torch.tensor([self.row(rng) for _ in range(self.config.batch)])


class Prefetched:
    """Batches computed `depth` steps ahead on a background thread."""

    def __init__(self, batches: Batches, first: int, last: int, depth: int = 3) -> None:
        self.batches, self.last, self.depth = batches, last, depth
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches")
        self.pending = {step: self.pool.submit(batches, step)
                        for step in range(first, min(last, first + depth))}  # fmt: skip

    def __call__(self, step: int) -> torch.Tensor:
        future = self.pending.pop(step, None) or self.pool.submit(self.batches, step)
        ahead = step + self.depth
        if ahead < self.last and ahead not in self.pending:
            self.pending[ahead] = self.pool.submit(self.batches, ahead)
        return future.result()

    def close(self) -> None:
        for future in self.pending.values():
            future.cancel()
        self.pool.shutdown(wait=True)


class StepClock:
    """The seconds that the time budget and the step plan count: the wall clock's, or
    `per_step` seconds for every finished step (TrainConfig.simulated_step_seconds)."""

    def __init__(self, per_step: float | None = None) -> None:
        self.per_step, self.simulated = per_step, 0.0

    def now(self) -> float:
        return time.monotonic() if self.per_step is None else self.simulated

    def step_done(self) -> None:
        if self.per_step is not None:
            self.simulated += self.per_step


def learning_rate(config: TrainConfig, step: int) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def prepare(config: TrainConfig, log) -> tuple[SourceFiles, object]:
    """The corpus split and the tokenizer (trained once, then read back on resume)."""
    import tokenizers

    out = Path(config.out)
    sources = find_sources(list(config.roots))
    log(f"[train] corpus: {sources.summary()}")
    tokenizer_file = out / "model" / "tokenizer.json"
    if tokenizer_file.is_file():
        return sources, tokenizers.Tokenizer.from_file(str(tokenizer_file))
    texts, size = [], 0
    for path in random.Random(config.seed).sample(list(sources.train), len(sources.train)):
        if (text := read_text(path)) is not None:
            texts.append(text)
            size += len(text)
            if size >= config.tokenizer_bytes:
                break
    log(f"[train] tokenizer: byte-level BPE of {config.vocab_size} from {size:,} characters")
    tokenizer = train_tokenizer(texts, config.vocab_size)
    (out / "model").mkdir(parents=True, exist_ok=True)
    write_tokenizer(out / "model", tokenizer, config.max_position_embeddings)
    return sources, tokenizer


def train(config: TrainConfig, resume: bool = False, log=print) -> dict:
    from transformers import LlamaForCausalLM

    torch.manual_seed(config.seed)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    sources, tokenizer = prepare(config, log)
    bos, eos = tokenizer.token_to_id("<|begin_of_text|>"), tokenizer.token_to_id(EOS_TOKEN)
    model = LlamaForCausalLM(model_config(config, tokenizer.get_vocab_size(), bos, eos))
    model.to(config.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95),
                                  weight_decay=config.weight_decay,
                                  fused=config.device == "cuda")  # fmt: skip
    state = {"step": 0, "tokens_seen": 0, "losses": [], "minutes": 0.0}
    checkpoint = out / "checkpoint.pt"
    if resume and checkpoint.is_file():
        saved = torch.load(checkpoint, map_location=config.device, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        log(f"[train] resumed at step {state['step']} ({state['tokens_seen']:,} tokens seen)")
    if "planned_steps" in state:
        config = dataclasses.replace(config, steps=state["planned_steps"])
    batches = Prefetched(Batches(config, sources, tokenizer), state["step"], config.steps)
    parameters = sum(p.numel() for p in model.parameters())
    log(f"[train] {parameters / 1e6:.1f}M parameters, {config.batch} x {config.seq_len} tokens "
        f"a step, steps {state['step']}..{config.steps} on {config.device}")  # fmt: skip
    clock, autocast = StepClock(config.simulated_step_seconds), config.device == "cuda"
    began = clock.now()
    try:
        config = run_steps(config, model, optimizer, batches, state, checkpoint, autocast, clock,
                           log)  # fmt: skip
    finally:
        batches.close()
    state["minutes"] += (clock.now() - began) / 60
    state["steps"] = config.steps
    save_checkpoint(checkpoint, model, optimizer, state, 0.0)
    export(config, model, tokenizer, sources, state, parameters)
    return state


def run_steps(config: TrainConfig, model, optimizer, batches, state: dict, checkpoint: Path,
              autocast: bool, clock: StepClock, log) -> TrainConfig:  # fmt: skip
    """Steps until config.steps or the time budget (a checkpoint then, and every
    checkpoint_every steps). Returns the config with the planned steps (plan_minutes)."""
    began, first_tokens = clock.now(), state["tokens_seen"]
    timed_from, plan_at = None, min(config.warmup, 40)
    while state["step"] < config.steps:
        if config.plan_minutes is not None and "planned_steps" not in state:
            if state["step"] == plan_at // 4:  # after the first steps' one-off costs
                timed_from = (clock.now(), state["step"])
            elif state["step"] == plan_at and timed_from is not None:
                seconds = (clock.now() - timed_from[0]) / (state["step"] - timed_from[1])
                spent = state["minutes"] * 60 + clock.now() - began
                left = max(0, int((config.plan_minutes * 60 - spent) / seconds))
                state["planned_steps"] = min(config.steps, state["step"] + left)
                config = dataclasses.replace(config, steps=state["planned_steps"])
                log(f"[train] {seconds:.3f} s a step: {config.steps} steps fill "
                    f"{config.plan_minutes} min")  # fmt: skip
        tokens = batches(state["step"]).to(config.device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, state["step"])
        loss = next_token_loss(model, tokens, autocast)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        state["step"] += 1
        state["tokens_seen"] += tokens[:, :-1].numel()
        state["losses"].append(round(loss.item(), 4))
        clock.step_done()
        elapsed = (clock.now() - began) / 60
        if state["step"] % config.log_every == 0 or state["step"] == config.steps:
            recent = state["losses"][-config.log_every :]
            rate = (state["tokens_seen"] - first_tokens) / (elapsed * 60 + 1e-9)
            log(f"[train] step {state['step']}/{config.steps} loss {sum(recent) / len(recent):.3f}"
                f" lr {learning_rate(config, state['step'] - 1):.2e} {elapsed:.1f} min "
                f"{rate:,.0f} tok/s")  # fmt: skip
        out_of_time = config.max_minutes is not None and elapsed >= config.max_minutes
        if state["step"] % config.checkpoint_every == 0 or out_of_time:
            save_checkpoint(checkpoint, model, optimizer, state, elapsed)
        if out_of_time:
            log(f"[train] time budget of {config.max_minutes} min reached at step {state['step']}")
            break
    return config


def next_token_loss(model, tokens: torch.Tensor, autocast: bool) -> torch.Tensor:
    """Mean cross-entropy of tokens[:, 1:] given tokens[:, :-1] (logits in float32)."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=tokens[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())


def save_checkpoint(path: Path, model, optimizer, state: dict, minutes: float) -> None:
    """Written beside and renamed, so an interrupted save never leaves half a checkpoint."""
    partial = path.with_suffix(".partial")
    saved = dict(state, minutes=state["minutes"] + minutes)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "state": saved}, partial)  # fmt: skip
    partial.replace(path)


def export(config: TrainConfig, model, tokenizer, sources: SourceFiles, state: dict,
           parameters: int) -> Path:  # fmt: skip
    """bf16 safetensors in shards of at most 15 MB, the generation config and a model card."""
    model_dir = Path(config.out) / "model"
    model.to(torch.bfloat16).save_pretrained(model_dir, safe_serialization=True,
                                             max_shard_size="15MB")  # fmt: skip
    (model_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id},
        indent=1))  # fmt: skip
    recent = state["losses"][-50:]
    card = {
        "architecture": "LlamaForCausalLM", "parameters": parameters,
        "shape": {k: getattr(config, k) for k in ("layers", "hidden", "heads", "kv_heads",
                                                   "head_dim", "intermediate", "vocab_size")},
        "training": {"seq_len": config.seq_len, "batch": config.batch, "steps": state["step"],
                     "planned_steps": state.get("steps"),
                     "tokens_seen": state["tokens_seen"], "minutes": round(state["minutes"], 2),
                     "final_loss": sum(recent) / len(recent) if recent else None,
                     "lr": config.lr, "task_share": config.task_share, "tasks": TASK_WEIGHTS,
                     "seed": config.seed},
        "data": sources.summary(),
    }  # fmt: skip
    (model_dir / "training.json").write_text(json.dumps(card, indent=1))
    (model_dir / "README.md").write_text(model_card(card))
    model.to(torch.float32)
    return model_dir


def model_card(card: dict) -> str:
    training, data = card["training"], card["data"]
    loss = training["final_loss"]
    return (
        "# Tactic Server's long-context code model\n\n"
        f"A {card['parameters'] / 1e6:.1f}M-parameter Llama ({card['shape']}) trained from "
        f"scratch by `python -m tactic_server.training.train`.\n\n"
        f"- Data: Python source under {', '.join(data['roots'])}: {data['train_files']:,} files "
        f"({data['train_bytes']:,} bytes) for training, {data['held_out_files']:,} held out "
        f"({data['held_out_bytes']:,} bytes); {training['task_share']:.0%} of the documents are "
        f"synthetic tasks ({', '.join(f'{k} x{w}' for k, w in training['tasks'].items())}).\n"
        f"- Training: {training['steps']} steps of {training['batch']} x {training['seq_len']} "
        f"tokens, {training['tokens_seen']:,} tokens seen in {training['minutes']} min, final "
        f"loss {'n/a' if loss is None else f'{loss:.3f}'}.\n"
        "- Evaluation: `benchmarks/accuracy.py` (see the project README).\n"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = TrainConfig(out="")
    parser.add_argument("--out", required=True, help="run folder: checkpoint.pt and model/")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--roots", nargs="+", default=list(defaults.roots),
                        help="directories whose *.py files are the corpus")  # fmt: skip
    for item in dataclasses.fields(TrainConfig):
        if item.name in ("out", "roots"):
            continue
        value = getattr(defaults, item.name)
        kind = float if value is None else type(value)  # the optional fields are floats
        parser.add_argument(f"--{item.name.replace('_', '-')}", type=kind, default=value)
    args = vars(parser.parse_args(argv))
    resume = args.pop("resume")
    config = TrainConfig(**{**args, "roots": tuple(args["roots"])})
    state = train(config, resume=resume)
    model = Path(config.out) / "model"
    if state["step"] >= state["steps"]:
        print(f"[train] done: all {state['steps']} steps, {state['tokens_seen']:,} tokens, "
              f"model in {model}")  # fmt: skip
    else:
        print(f"[train] paused at step {state['step']} of {state['steps']} (model so far in "
              f"{model}); continue with --resume")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
