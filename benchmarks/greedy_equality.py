"""Greedy tokens of Tactic at P = 0.999 against dense in the embedded engine, per dtype: the model
and prompts of `benchmarks/sglang_gpu.py equality` (a tiny Llama with peaked attention, random
prompts of several clustered segments), so that a difference seen there can be split into what
rounding does (bf16) and what selection does (float32).

  python benchmarks/greedy_equality.py --dtypes float32 bfloat16 --out results.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

import torch

from tactic_server.engine.config import EngineConfig
from tactic_server.engine.engine import Engine
from tactic_server.engine.types import GenerationRequest, SamplingParams, TacticParams
from tactic_server.testing.tiny_model import PEAKED_LLAMA, make_tiny_model


def first_difference(left: list[int], right: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(left, right, strict=False)) if a != b),
                min(len(left), len(right)))  # fmt: skip


async def greedy(engine: Engine, ids: list[int], tactic: TacticParams, tokens: int) -> list[int]:
    sampling = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    produced: list[int] = []
    request = GenerationRequest(f"r{len(ids)}-{tactic}", tuple(ids), sampling, tactic)
    async for output in engine.generate(request):
        produced += output.token_ids
    return produced


def compare(model_dir: Path, dtype: str, prompts: list[list[int]], target: float,
            tokens: int, device: str) -> dict:  # fmt: skip
    engine = Engine.from_config(EngineConfig(model_dir=str(model_dir), dtype=dtype, device=device,
                                             max_model_len=8192))  # fmt: skip

    async def run() -> dict:
        dense = [await greedy(engine, p, TacticParams(enabled=False), tokens) for p in prompts]
        tactic = [await greedy(engine, p, TacticParams(True, target), tokens) for p in prompts]
        await engine.shutdown()
        agree = [first_difference(a, b) for a, b in zip(dense, tactic, strict=True)]
        return {"dtype": dtype, "target": target, "tokens_equal_before_first_difference": agree,
                "equal": sum(a == tokens for a in agree), "prompts": len(prompts)}  # fmt: skip

    return asyncio.run(run())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1500, 2600, 3100, 4200])
    parser.add_argument("--target", type=float, default=0.999)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    model_dir = make_tiny_model(
        Path(tempfile.mkdtemp()) / "tiny", "llama", seed=0, dtype="bfloat16",
        max_position_embeddings=16384, **PEAKED_LLAMA,
    )  # fmt: skip
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = [torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(i)).tolist()
               for i, n in enumerate(args.lengths)]  # fmt: skip
    rows = []
    for dtype in args.dtypes:
        rows.append(compare(model_dir, dtype, prompts, args.target, args.tokens, args.device))
        row = rows[-1]
        agree = row["tokens_equal_before_first_difference"]
        print(f"{dtype}: P = {args.target} equal to dense for {row['equal']} of {len(prompts)} "
              f"prompts; first differences {agree}")  # fmt: skip
    if args.out:
        record = {"command": " ".join(sys.argv), "device": args.device,
                  "lengths": args.lengths, "rows": rows}  # fmt: skip
        Path(args.out).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
