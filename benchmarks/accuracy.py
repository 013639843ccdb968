"""Accuracy of Tactic on a real model: retrieval (passkey, multi-key) at several context lengths
through the embedded engine, dense against Tactic at each target; perplexity of held-out source
files (dense); and, from the model's own queries and keys on long prompts, per (layer, head) the
recall, selected ratio and overshoot of Tactic (segment-local and whole-context clustering),
Quest and top-k at Tactic's mean budget at P = 0.9, and the oracle. Writes JSON, a markdown
table and, with matplotlib, a heatmap of the selected ratio per layer and KV head and an
accuracy-against-budget plot.

  python benchmarks/accuracy.py --model DIR --lengths 4096 8192 16384 32768 --trials 20 \\
      --out benchmarks/results/accuracy_<device>
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from tactic_server.engine.config import EngineConfig
from tactic_server.engine.engine import Engine
from tactic_server.engine.types import GenerationRequest, SamplingParams, TacticParams
from tactic_server.tactic.config import WHOLE_CONTEXT, TacticConfig
from tactic_server.tactic.evaluation import EvaluationSetup, evaluate_workloads
from tactic_server.tactic.workloads import Workload
from tactic_server.training.data import find_sources, read_text, source_texts, task
from tactic_server.training.train import CHARS_PER_TOKEN

RETRIEVAL_TASKS = ("passkey", "multikey")


def log(message: str) -> None:
    print(f"[accuracy {time.strftime('%H:%M:%S')}] {message}", flush=True)


def sized_task(kind, rng, tokens: int, tokenizer, background) -> tuple[list[int], str]:
    """A task whose prompt is within 3% under `tokens` tokens (one resize from a first try)."""
    characters = int(tokens * CHARS_PER_TOKEN)
    for _ in range(4):
        prompt, answer = task(kind, rng, characters, background)
        ids = tokenizer.encode(prompt, add_special_tokens=True)
        if 0.97 * tokens <= len(ids) <= tokens:
            break
        characters = int(characters * 0.985 * tokens / len(ids))
    return ids[:tokens], answer


async def answer(engine: Engine, ids: list[int], target: float | None, tokens: int) -> str:
    tactic = TacticParams(enabled=False) if target is None else TacticParams(True, target)
    sampling = SamplingParams(max_tokens=tokens, temperature=0.0)
    request = GenerationRequest(f"r{random.random()}", tuple(ids), sampling, tactic)
    text = ""
    async for output in engine.generate(request):
        text += output.text
    return text


def retrieval(engine: Engine, lengths, trials: int, targets, background, seed: int) -> list[dict]:
    rows = []
    for kind in RETRIEVAL_TASKS:
        for length in lengths:
            rng = random.Random(seed + length)
            cases = [sized_task(kind, rng, length, engine.tokenizer, background)
                     for _ in range(trials)]  # fmt: skip
            for target in (None, *targets):
                right = 0
                for ids, expected in cases:
                    got = asyncio.run(answer(engine, ids, target, 8))
                    right += got.strip().startswith(expected.strip().strip('"'))
                rows.append({"task": kind, "context": length,
                             "method": "dense" if target is None else f"tactic_{target}",
                             "accuracy": right / trials, "trials": trials})  # fmt: skip
                log(f"{kind} {length}: {rows[-1]['method']} {right}/{trials}")
    return rows


def capture_workloads(model_dir: str, prompts: list[list[int]], device: str):
    """(layer name, Workload) for each layer and prompt: the post-RoPE query of the prompt's
    last position and the keys and values of all positions, as the model computes them
    (Hugging Face transformers with an attention function that records its inputs)."""
    from transformers import AttentionInterface, LlamaForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    captured = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        captured.append((module.layer_idx, query[0, :, -1].float().cpu(),
                         key[0].transpose(0, 1).float().cpu(),
                         value[0].transpose(0, 1).float().cpu()))  # fmt: skip
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("tactic_recording", recording)
    model = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="tactic_recording",
                                             dtype=torch.float32).to(device).eval()  # fmt: skip
    for number, ids in enumerate(prompts):
        captured.clear()
        with torch.no_grad():
            model(input_ids=torch.tensor([ids], device=device), use_cache=False)
        for layer, query, keys, values in captured:
            yield f"layer {layer}", Workload(f"layer {layer} prompt {number}", query, keys, values)


def perplexity(model_dir: str, files, device: str, tokenizer, length: int, budget: int) -> dict:
    """Dense next-token perplexity over held-out files cut into windows of `length` tokens."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    stream = []
    for path in files:
        if (text := read_text(path)) is not None:
            stream += tokenizer.encode(text, add_special_tokens=True)
        if len(stream) >= budget:
            break
    windows = [stream[i : i + length] for i in range(0, len(stream) - length + 1, length)]
    total, count = 0.0, 0
    for window in windows:
        ids = torch.tensor([window], device=device)
        with torch.no_grad():
            logits = model(input_ids=ids[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="sum")
        total, count = total + loss.item(), count + ids.shape[1] - 1
    return {"tokens": count, "windows": len(windows),
            "perplexity": math.exp(total / count) if count else None}  # fmt: skip


def plots(result: dict, prefix: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plots")
        return
    heads = [r for r in result["per_head"] if r["method"] == "tactic_segment"
             and r["target"] == 0.9]  # fmt: skip
    layers = sorted({int(r["group"].split()[1]) for r in heads})
    kv_heads = sorted({r["kv_head"] for r in heads})
    grid = [[statistics.mean(r["selected_ratio"] for r in heads
                             if r["group"] == f"layer {layer}" and r["kv_head"] == kv)
             for kv in kv_heads] for layer in layers]  # fmt: skip
    figure, axis = plt.subplots(figsize=(1.2 + 0.5 * len(kv_heads), 1 + 0.4 * len(layers)))
    image = axis.imshow(grid, cmap="viridis", aspect="auto", vmin=0, vmax=1)
    axis.set_xlabel("KV head")
    axis.set_ylabel("layer")
    axis.set_title("Tactic selected ratio at P = 0.9")
    figure.colorbar(image)
    figure.savefig(f"{prefix}_heatmap.png", dpi=100, bbox_inches="tight")
    figure, axis = plt.subplots(figsize=(6, 4))
    for method in ("tactic_segment", "tactic_whole", "quest", "topk", "oracle"):
        by_target = {}  # target -> the layers' records: one point per target, layers averaged
        for r in result["attention"]:
            if r["method"] == method:
                by_target.setdefault(r["target"], []).append(r)
        points = sorted((statistics.mean(r["selected_ratio"] for r in rows),
                         statistics.mean(r["mean_recall"] for r in rows))
                        for rows in by_target.values())  # fmt: skip
        axis.plot(*zip(*points, strict=True), "o-", label=method)
    axis.set_xlabel("selected ratio (budget)")
    axis.set_ylabel("mean recall")
    axis.legend()
    figure.savefig(f"{prefix}_budget.png", dpi=100, bbox_inches="tight")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.75, 0.9, 0.95])
    parser.add_argument("--attention-prompts", type=int, default=2,
                        help="prompts whose queries and keys feed the per-head analysis")
    parser.add_argument("--attention-length", type=int, default=8192)
    parser.add_argument("--roots", nargs="+", help="corpus roots (their held-out files)")
    parser.add_argument("--perplexity-tokens", type=int, default=200_000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="writes OUT.json, OUT.md (and plots)")
    args = parser.parse_args(argv)
    engine = Engine.from_config(EngineConfig(model_dir=args.model, device=args.device,
                                             max_model_len=max(args.lengths) + 16))  # fmt: skip
    sources = find_sources(args.roots) if args.roots else None
    held_out = sources.held_out if sources and sources.held_out else ()
    background = source_texts(held_out, random.Random(args.seed)) if held_out else None
    result = {"model": args.model, "device": args.device, "command": " ".join(sys.argv)}
    result["retrieval"] = retrieval(engine, args.lengths, args.trials, args.targets, background,
                                    args.seed)  # fmt: skip
    rng = random.Random(args.seed)
    prompts = [sized_task("passkey", rng, args.attention_length, engine.tokenizer, background)[0]
               for _ in range(args.attention_prompts)]  # fmt: skip
    setup = EvaluationSetup(targets=tuple(args.targets),
                            tactic_variants={"tactic_segment": TacticConfig(),
                                             "tactic_whole": WHOLE_CONTEXT})  # fmt: skip
    per_head: list[dict] = []
    result["attention"] = evaluate_workloads(
        capture_workloads(args.model, prompts, args.device), setup, log, per_head)
    result["per_head"] = per_head
    if held_out:
        window = min(4096, max(args.lengths))
        result["perplexity"] = perplexity(args.model, held_out, args.device, engine.tokenizer,
                                          window, args.perplexity_tokens)  # fmt: skip
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=1))
    Path(f"{args.out}.md").write_text(markdown(result))
    plots(result, args.out)
    log(f"wrote {args.out}.json, .md")
    return 0


def markdown(result: dict) -> str:
    lines = ["| task | context | method | accuracy |", "|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['context']:,} | {r['method']} | {r['accuracy']:.0%} |"
              for r in result["retrieval"]]  # fmt: skip
    lines += ["", "| layer | P | method | recall | heads >= P-0.01 | selected | overshoot |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['workload']} | {r['target']:.2f} | {r['method']} | {r['mean_recall']:.3f} | "
              f"{r['share_meeting_target']:.1%} | {r['selected_ratio']:.2%} | "
              f"{r['overshoot']:.2f}x |" for r in result["attention"]]  # fmt: skip
    if "perplexity" in result:
        lines += ["", f"Held-out perplexity (dense): {result['perplexity']['perplexity']:.2f} "
                  f"over {result['perplexity']['tokens']:,} tokens"]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
