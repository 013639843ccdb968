"""Decode throughput of the embedded engine, dense vs Tactic, at long contexts on one GPU (or the
CPU with small numbers): a model of the given shape with random weights, `batch` requests with
random prompts of `context` tokens, `decode_tokens` new tokens each; throughput counts the tokens
decoded after every request's first token. Random weights give flat attention, so Tactic cannot
be sparse here: this measures what its selection costs, not what sparsity saves.

    python benchmarks/engine_throughput.py --contexts 16384 32768 65536 --batch 2
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from tactic_server.engine.config import EngineConfig
from tactic_server.engine.engine import Engine
from tactic_server.engine.tiny_model import make_tiny_model
from tactic_server.engine.types import GenerationRequest, SamplingParams, TacticParams

SHAPES = {
    # a small long-context model: head_dim 128 and 4 query heads per KV head, like Llama-3.1-8B
    "small": dict(num_layers=4, hidden_size=512, num_heads=4, num_kv_heads=1, head_dim=128,
                  intermediate_size=1536),
}  # fmt: skip


async def one_round(engine: Engine, batch: int, context: int, decode_tokens: int, tactic):
    """Seconds from the last request's first token to the last token, and tokens decoded then."""
    generator = torch.Generator().manual_seed(context)
    sampling = SamplingParams(max_tokens=decode_tokens, temperature=0.0, ignore_eos=True)
    first_token, last_token, ratios = [], [], []

    async def run(index: int) -> None:
        prompt = tuple(torch.randint(5, 500, (context,), generator=generator).tolist())
        request = GenerationRequest(f"r{index}", prompt, sampling, tactic)
        async for output in engine.generate(request):
            now = time.perf_counter()
            if output.completion_tokens == 1:
                first_token.append(now)
            if output.finish_reason is not None:
                last_token.append(now)
                if output.tactic is not None:
                    ratios.append(output.tactic.selected_ratio)

    await asyncio.gather(*(run(i) for i in range(batch)))
    seconds = max(last_token) - max(first_token)
    return seconds, batch * (decode_tokens - 1), ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[16384, 32768, 65536])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    model_dir = make_tiny_model(Path(tempfile.mkdtemp()), "llama", dtype=dtype,
                                max_position_embeddings=max(args.contexts) + 1024,
                                **SHAPES[args.shape])  # fmt: skip
    records = []
    for context in args.contexts:
        config = EngineConfig(model_dir=str(model_dir), device=args.device, dtype=dtype,
                              max_model_len=context + args.decode_tokens + 8,
                              max_batch=args.batch, prefill_chunk=4096)  # fmt: skip
        engine = Engine.from_config(config)
        # warm-up: the first kernels of a process pay for initialisation and compilation
        for tactic in (TacticParams(enabled=False), TacticParams(enabled=True)):
            asyncio.run(one_round(engine, args.batch, 2048, 4, tactic))
        for name, tactic in (("dense", TacticParams(enabled=False)),
                             ("tactic", TacticParams(enabled=True, target=0.9))):  # fmt: skip
            seconds, tokens, ratios = asyncio.run(
                one_round(engine, args.batch, context, args.decode_tokens, tactic)
            )
            record = dict(shape=args.shape, context=context, batch=args.batch, attention=name,
                          decode_tokens_per_s=tokens / seconds,
                          selected_ratio=sum(ratios) / len(ratios) if ratios else None)  # fmt: skip
            records.append(record)
            print(json.dumps(record), flush=True)
        asyncio.run(engine.shutdown())
        del engine
        if args.device == "cuda":
            torch.cuda.empty_cache()
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = {"date": datetime.date.today().isoformat(), "device": device,
              "command": "python benchmarks/engine_throughput.py " + " ".join(sys.argv[1:]),
              "note": "random weights: attention is flat; Tactic runs the torch reference path",
              "records": records}  # fmt: skip
    slug = device.lower().replace("nvidia ", "").replace(" ", "_")
    output = Path(args.output or f"benchmarks/results/engine_throughput_{slug}.json")
    output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
