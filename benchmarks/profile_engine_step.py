"""Where an engine decode step's time goes: torch.profiler over one round of the throughput
benchmark (prefill, then decode), printed as tables of CPU and CUDA time per operator.

    python benchmarks/profile_engine_step.py --shape llama8b --context 16384 --attention tactic
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch
from engine_throughput import SHAPES, one_round, random_engine

from tactic_server.engine.config import EngineConfig
from tactic_server.engine.engine import Engine
from tactic_server.engine.types import TacticParams
from tactic_server.testing.tiny_model import make_tiny_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=24)
    parser.add_argument("--attention", choices=["dense", "tactic"], default="tactic")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    max_len = args.context + args.decode_tokens + 8
    config = EngineConfig(device="cuda", dtype="bfloat16", max_model_len=max_len,
                          max_batch=args.batch, kv_slots=args.batch * max_len,
                          prefill_chunk=4096)  # fmt: skip
    if args.shape == "small":
        model_dir = make_tiny_model(Path(tempfile.mkdtemp()), "llama", dtype="bfloat16",
                                    max_position_embeddings=max_len, **SHAPES["small"])  # fmt: skip
        engine = Engine.from_config(dataclasses.replace(config, model_dir=str(model_dir)))
    else:
        engine = random_engine(args.shape, config, max_len)
    tactic = TacticParams(enabled=args.attention == "tactic", target=0.9)
    asyncio.run(one_round(engine, args.batch, 2048, 4, tactic))  # compile the kernels first
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        seconds, _, _, _ = asyncio.run(
            one_round(engine, args.batch, args.context, args.decode_tokens, tactic)
        )
    print(f"{args.shape} {args.attention} context {args.context} batch {args.batch}: "
          f"{1e3 * seconds / (args.decode_tokens - 1):.1f} ms per decode step")  # fmt: skip
    averages = profile.key_averages()
    for key in ("self_cpu_time_total", "self_device_time_total"):
        print(f"\n# by {key}")
        print(averages.table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
    asyncio.run(engine.shutdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
