"""Sweep the dense decode launch parameters (split, block, warps, stages) at 128k, batch 1 and
16, and print the five fastest with their share of a 3,020 GB/s copy.

    python benchmarks/tune_dense_decode.py
"""

import itertools
import sys
from functools import partial

import torch

sys.path.insert(0, "benchmarks")
from decode_attention import KV_ROW_BYTES, NUM_KV_HEADS, bench_ms, topic_context  # noqa: E402
from tactic_server.kernels.decode_attention import dense_rows, sparse_decode  # noqa: E402

COPY_BYTES_PER_S = 3.02e12
generator = torch.Generator(device="cuda").manual_seed(0)
for context, batch in ((131072, 1), (131072, 16)):
    keys, values, q = topic_context(batch, context, 0.03, generator)
    req_to_token = torch.arange(batch * context, device="cuda", dtype=torch.int32)
    seq_lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    indptr, indices = dense_rows(req_to_token.reshape(batch, context),
                                 torch.arange(batch, device="cuda"), seq_lens, NUM_KV_HEADS,
                                 context)  # fmt: skip
    kv_bytes = batch * context * NUM_KV_HEADS * 2 * KV_ROW_BYTES
    timings = []
    for split, block_n, warps, stages in itertools.product(
        (1024, 2048, 4096), (32, 64, 128), (4, 8), (2, 3, 4)
    ):
        run = partial(sparse_decode, q, keys, values, indptr, indices, context, split, block_n,
                      warps, stages)  # fmt: skip
        timings.append((bench_ms(run, repeats=30), split, block_n, warps, stages))
    for ms, *launch in sorted(timings)[:5]:
        share = kv_bytes / (ms / 1e3) / COPY_BYTES_PER_S
        print(
            f"{context} x {batch}, split/block/warps/stages {launch}: {ms * 1e3:.1f} us {share:.0%}"
        )
