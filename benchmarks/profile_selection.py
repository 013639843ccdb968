"""Where the time of one Tactic selection step goes: a torch.profiler table of the kernels of
select_rows and sparse_decode_balanced (the attention the server runs) at one shape (default 32k
context, batch 1), plus the same step timed with and without CUDA-graph replay.

    python benchmarks/profile_selection.py --context 32768 --batch 1
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton

sys.path.insert(0, "benchmarks")
from decode_attention import TARGET, build_pool, parse_launch, topic_context  # noqa: E402
from tactic_server.kernels.decode_attention import sparse_decode_balanced  # noqa: E402
from tactic_server.kernels.selection import select_rows  # noqa: E402

from tactic_server.tactic import TacticConfig  # noqa: E402
from tactic_server.tactic.config import config_from_spec  # noqa: E402


def selection_inputs(context: int, batch: int, config: TacticConfig) -> tuple:
    """select_rows' arguments before the config for `batch` requests of `context` tokens of
    the decode benchmark's topic workload (3% needed): q, keys, pool, req_to_segment,
    req_to_token, pool_indices, seq_lens, targets, max_seq_len; and the values."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    keys, values, q = topic_context(batch, context, 0.03, generator)
    req_to_token = torch.arange(batch * context, device="cuda", dtype=torch.int32).reshape(
        batch, -1
    )
    pool_indices = torch.arange(batch, device="cuda", dtype=torch.int32)
    seq_lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    targets = torch.full((batch,), TARGET, device="cuda")
    pool, req_to_segment, _ = build_pool(keys, batch, context, config)
    return (q, keys, pool, req_to_segment, req_to_token, pool_indices, seq_lens, targets,
            context), values  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--centroids", choices=["kv", "fp8"], default="kv",
                        help="TacticConfig.centroids")  # fmt: skip
    parser.add_argument("--variance", choices=["diagonal", "isotropic", "profile"],
                        default="diagonal", help="TacticConfig.variance")  # fmt: skip
    parser.add_argument("--config", default="", metavar="FIELD=VALUE,...",
                        help="further TacticConfig fields, e.g. 'cluster_size=8,"
                        "boundary_tokens=true,boundary_band=0.1' (the boundary band's step)")
    parser.add_argument("--launch", default="",
                        help="select_rows launch options: 'real_rows=0,score_max_registers=128' "
                             "('pdl=1': the attention launched dependently too)")
    args = parser.parse_args()
    options = parse_launch(args.launch)
    context, batch = args.context, args.batch
    try:
        config = config_from_spec(args.config, TacticConfig(centroids=args.centroids,
                                                            variance=args.variance))
    except ValueError as error:
        parser.error(f"--config: {error}")
    inputs, values = selection_inputs(context, batch, config)
    q, keys = inputs[:2]

    def step():
        selected = select_rows(*inputs, config, **options)
        return sparse_decode_balanced(q, keys, values, selected.indptr, selected.indices,
                                      pdl=bool(options.get("pdl")))  # fmt: skip

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as profile:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print(profile.key_averages().table(sort_by="cuda_time_total", row_limit=30))
    plain = triton.testing.do_bench(step, return_mode="median")
    graphed = triton.testing.do_bench_cudagraph(step, return_mode="median")
    print(f"step: plain launches {plain * 1e3:.1f} us, CUDA graph replay {graphed * 1e3:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
