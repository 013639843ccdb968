"""Decode attention on one GPU, side by side in one run, Llama-3.1-8B layer shape (32 query heads,
8 KV heads, head_dim 128, bf16): torch SDPA, FlashInfer and our Triton kernel dense; Tactic
selection and attention (ours and FlashInfer's); and the cost of clustering a prefilled context
against an estimated prefill. Prints a table and writes
benchmarks/results/decode_attention_<device>.json.

    python benchmarks/decode_attention.py                  # the full sweep
    python benchmarks/decode_attention.py --contexts 8192 --batches 1 --fractions 0.03  # smoke

Timing: CUDA-event medians of CUDA-graph replays (a server replays its decode step as a graph),
with a 256 MB buffer cleared before every replay, so no input sits in L2. Bytes are what each
method must move at least (K/V rows and index lists read, metadata read); bandwidth fractions are
against a device-to-device copy measured in the same run (bytes read plus written).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import triton
from tactic_server.kernels.cluster_pool import ClusterPool, centroid_dtype
from tactic_server.kernels.decode_attention import (
    dense_rows,
    sparse_decode,
    sparse_decode_balanced,
)
from tactic_server.kernels.kmeans import segment_kmeans
from tactic_server.kernels.selection import select_rows

from tactic_server.decode import cost
from tactic_server.tactic import TacticConfig, build_cluster_index
from tactic_server.tactic.clustering import stored_variance_dims
from tactic_server.tactic.config import config_from_spec

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, NUM_LAYERS = 32, 8, 128, 32
DTYPE = torch.bfloat16
TARGET = 0.9
KV_ROW_BYTES = HEAD_DIM * 2  # one bf16 K or V row of one head
INDEX_BYTES = 4
LLAMA_8B_LINEAR_PARAMS = 7.5e9  # weights touched per token (incl. the LM head), for prefill FLOPs
LLAMA_8B_HIDDEN = 4096


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


_FLUSH = None


def bench_ms(fn, repeats: int = 100, label: str = "") -> float:
    """Median milliseconds of fn, captured once in a CUDA graph and replayed (as a server's decode
    step runs), with L2 flushed before every replay so no input is served from cache. Falls back
    to timing plain launches if fn cannot be captured (noted in FALLBACKS)."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    except RuntimeError as error:
        FALLBACKS.append(f"{label or fn.__name__}: {str(error).splitlines()[0]}")
        graph, run = None, fn
    for _ in range(5):
        run()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends, strict=True):
        _FLUSH.zero_()
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    del graph
    return statistics.median(
        start.elapsed_time(end) for start, end in zip(starts, ends, strict=True)
    )


FALLBACKS: list[str] = []


def copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy, counting bytes read plus written."""
    source = torch.empty(1 << 30, dtype=torch.int16, device="cuda").random_()
    target = torch.empty_like(source)
    # one large launch: plain events time it well (a graph replay of a copy ran 20% slower)
    seconds = triton.testing.do_bench(lambda: target.copy_(source), return_mode="median") / 1e3
    return 2 * source.numel() * source.element_size() / seconds


def matmul_rate() -> float:
    """FLOP/s of an 8192^3 bf16 matrix product on random data."""
    a = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    b = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    return 2 * 8192**3 / (triton.testing.do_bench(lambda: a @ b, return_mode="median") / 1e3)


def prefill_flops(context: int) -> float:
    """Llama-3.1-8B prefill of one sequence: weights (2 FLOPs per parameter and token) plus causal
    attention (QK and PV, 2 FLOPs per multiply-add, half the square)."""
    attention = 2 * 2 * NUM_LAYERS * LLAMA_8B_HIDDEN * context * context / 2
    return 2 * LLAMA_8B_LINEAR_PARAMS * context + attention


def topic_context(batch: int, context: int, fraction: float, generator: torch.Generator):
    """Keys [batch * context, H_kv, d] of documents (runs of 16-256 positions) about topics, and
    queries [batch, H_q, d] that ask about topics covering about `fraction` of the positions, so
    the oracle needs about that share of tokens for P = 0.9. Values are random."""
    num_topics, asked = (round(1 / fraction), 1) if fraction <= 0.1 else (10, round(fraction * 10))
    device = generator.device  # the GPU here; benchmarks/hierarchy_study.py builds it on the CPU
    topics = torch.randn(NUM_KV_HEADS, num_topics, HEAD_DIM, device=device, generator=generator)
    topics = torch.nn.functional.normalize(topics, dim=-1) * math.sqrt(HEAD_DIM)
    total = batch * context
    lengths = torch.randint(16, 257, (total // 16 + 1,), device=device, generator=generator)
    document = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)[
        :total
    ]
    document_topic = torch.randint(num_topics, (NUM_KV_HEADS, lengths.numel()), device=device,
                                   generator=generator)  # fmt: skip
    position_topic = document_topic[:, document]  # [H_kv, total]
    keys = torch.empty(total, NUM_KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    for head in range(NUM_KV_HEADS):
        noise = 0.5 * torch.randn(total, HEAD_DIM, device=device, generator=generator)
        keys[:, head] = (topics[head, position_topic[head]] + noise).to(DTYPE)
    values = torch.randn(total, NUM_KV_HEADS, HEAD_DIM, device=device, generator=generator)
    chosen = torch.stack(
        [
            torch.randperm(num_topics, device=device, generator=generator)[:asked]
            for _ in range(batch)
        ]
    )  # [batch, asked]
    direction = topics[:, chosen].sum(dim=2).transpose(0, 1)  # [batch, H_kv, d]
    direction = torch.nn.functional.normalize(direction, dim=-1)
    group = NUM_Q_HEADS // NUM_KV_HEADS
    jitter = 0.05 * torch.randn(batch, NUM_KV_HEADS, group, HEAD_DIM, device=device,
                                generator=generator)  # fmt: skip
    sharpness = 14.0 / math.sqrt(asked)
    queries = torch.nn.functional.normalize(direction[:, :, None, :] + jitter, dim=-1) * sharpness
    return keys, values.to(DTYPE), queries.reshape(batch, NUM_Q_HEADS, HEAD_DIM).to(DTYPE)


def first_request_rows(selected) -> list[torch.Tensor]:
    """The first request's selected positions per KV head (its rows come first in the CSR)."""
    return [selected.indices[selected.indptr[h] : selected.indptr[h + 1]].long() // NUM_KV_HEADS
            for h in range(NUM_KV_HEADS)]  # fmt: skip


def oracle_and_recall(query, keys, rows):
    """For one request: the oracle's needed share at P = TARGET (mean over KV heads of the union
    over the group) and the smallest recall over query heads of the selected rows."""
    grouped_keys = keys.float().repeat_interleave(NUM_Q_HEADS // NUM_KV_HEADS, dim=1)
    scores = torch.einsum("hd,nhd->hn", query.float(), grouped_keys)
    probabilities = torch.softmax(scores / math.sqrt(HEAD_DIM), dim=-1)
    ranked, order = probabilities.sort(dim=-1, descending=True)
    needed = (ranked.cumsum(-1) < TARGET).sum(-1) + 1
    group = NUM_Q_HEADS // NUM_KV_HEADS
    needed_union, recalls = [], []
    for kv_head in range(NUM_KV_HEADS):
        heads = range(kv_head * group, (kv_head + 1) * group)
        union = torch.cat([order[h, : needed[h]] for h in heads]).unique()
        needed_union.append(union.numel() / keys.shape[0])
        kept = torch.zeros(keys.shape[0], dtype=torch.bool, device=keys.device)
        kept[rows[kv_head]] = True
        recalls.extend(probabilities[h, kept].sum().item() for h in heads)
    return sum(needed_union) / NUM_KV_HEADS, min(recalls)


def parse_launch(spec: str) -> dict[str, int]:
    """select_rows launch options from "name=value,name=value" ("default" or "": none)."""
    if spec in ("", "default"):
        return {}
    return {name: int(value) for name, value in (item.split("=") for item in spec.split(","))}


def build_pool(keys, batch, context, config):
    """Cluster every request's keys and store them in a ClusterPool; returns the pool, the
    requests' segment tables and the seconds spent clustering (all requests, one layer)."""
    size = config.segment_size
    clusters = size // config.cluster_size
    segments = context // size
    per_cluster, per_segment = stored_variance_dims(config, HEAD_DIM)
    pool = ClusterPool.allocate(
        num_segment_slots=max(1, batch * segments), num_kv_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM, segment_size=size, clusters_per_segment=clusters, dtype=DTYPE,
        device="cuda", variance_dims=per_cluster, profile_dims=per_segment,
        centroids_dtype=centroid_dtype(config, DTYPE, "cuda"),
    )  # fmt: skip
    req_to_segment = torch.zeros(batch, segments + 1, dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    started = time.perf_counter()
    for request in range(batch):
        slots = torch.arange(request * context, (request + 1) * context, device="cuda")
        index = build_cluster_index(keys[slots], config, kmeans=segment_kmeans)
        segment_slots = torch.arange(request * segments, (request + 1) * segments, device="cuda")
        pool.write_segments(index, slots, segment_slots)
        req_to_segment[request, :segments] = segment_slots.int()
    torch.cuda.synchronize()
    return pool, req_to_segment, time.perf_counter() - started


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output.float() - reference).norm() / reference.norm()).item()


def time_flashinfer(flashinfer, q, keys, values, indptr, indices, label):
    """Plan FlashInfer on these rows (host work, timed with a host clock), then time its run;
    returns (run ms, plan ms, output)."""
    started = time.perf_counter()
    flashinfer.plan(indptr, indices, NUM_KV_HEADS, NUM_Q_HEADS // NUM_KV_HEADS, HEAD_DIM, DTYPE)
    plan_ms = (time.perf_counter() - started) * 1e3
    run_ms = bench_ms(lambda: flashinfer.run(q, keys, values), label=label)
    return run_ms, plan_ms, flashinfer.run(q, keys, values)


def best_split(run, splits):
    """Time run(split_tokens) for each split; return (best ms, its split)."""
    timings = {split: bench_ms(lambda split=split: run(split)) for split in splits}
    split = min(timings, key=timings.get)
    return timings[split], split


def measure(context, batch, fraction, flashinfer, copy_bytes_per_s, config, seed,
            launch_options=({},), cost_model=None, variants=None):
    """One cell. variants: name -> TacticConfig, each timed beside the main config on the
    same keys and queries (its own pool): select, attend, selected share, recall."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    keys, values, q = topic_context(batch, context, fraction, generator)
    rows = batch * NUM_KV_HEADS
    req_to_token = torch.arange(batch * context, device="cuda", dtype=torch.int32).reshape(
        batch, context
    )
    pool_indices = torch.arange(batch, device="cuda", dtype=torch.int32)
    seq_lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    targets = torch.full((batch,), TARGET, device="cuda")
    pool, req_to_segment, _ = build_pool(keys, batch, context, config)
    record = {"context": context, "batch": batch, "target": TARGET}
    # what scoring reads of a cluster in this pool: its centroid, spread values and offset, and
    # its share of its segment's variance profile ("profile" variances)
    cluster_bytes = sum(t.shape[-1] * t.element_size() for t in (pool.centroids, pool.variances))
    cluster_bytes += 4 + pool.profiles.shape[-1] * pool.profiles.element_size() / (
        pool.clusters_per_segment)  # fmt: skip

    # dense: SDPA over contiguous [batch, H_kv, context, d], ours and FlashInfer over full rows
    sdpa_k = keys.view(batch, context, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
    sdpa_v = values.view(batch, context, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
    q4 = q[:, :, None, :]

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(q4, sdpa_k, sdpa_v, enable_gqa=True)

    record["sdpa_ms"] = bench_ms(sdpa)
    reference = sdpa()[:, :, 0].float()
    sdpa_k = sdpa_v = None  # free the contiguous copies before the next allocations
    dense_indptr, dense_indices = dense_rows(
        req_to_token, pool_indices, seq_lens, NUM_KV_HEADS, context
    )
    record["dense_ms"], record["dense_split_tokens"] = best_split(
        lambda split: sparse_decode(q, keys, values, dense_indptr, dense_indices, context, split),
        (None, 256, 1024, 4096),
    )
    ours_dense = sparse_decode(q, keys, values, dense_indptr, dense_indices, context,
                               record["dense_split_tokens"])  # fmt: skip
    record["dense_vs_sdpa_error"] = relative_error(ours_dense, reference)
    if flashinfer is not None:
        record["flashinfer_dense_ms"], _, fi_dense = time_flashinfer(
            flashinfer, q, keys, values, dense_indptr, dense_indices, "flashinfer dense"
        )
        record["flashinfer_dense_vs_sdpa_error"] = relative_error(fi_dense, reference)
    dense_indices = None

    # Tactic: device selection (each of the launch options; the fastest is the cell's), then
    # attention over the selected rows
    def select(options=None):
        return select_rows(
            q, keys, pool, req_to_segment, req_to_token, pool_indices, seq_lens, targets, context,
            config, **(options or {}),
        )

    record["select_ms_by_launch"] = {}
    for options in launch_options:
        label = ",".join(f"{name}={value}" for name, value in options.items()) or "default"
        record["select_ms_by_launch"][label] = bench_ms(lambda options=options: select(options))
    fastest = min(record["select_ms_by_launch"], key=record["select_ms_by_launch"].get)
    record["select_launch"] = fastest
    record["select_ms"] = record["select_ms_by_launch"][fastest]
    selected = select()
    indptr = selected.indptr
    # the cell's attention is what the server runs, the balanced schedule (the batch's tokens
    # shared evenly among programs); sparse_decode's default chunks (256 tokens) and its
    # fastest chunk length (or chunks shared out by each row's length: None) beside it
    record["attend_schedule"] = "balanced"
    record["attend_ms"] = bench_ms(
        lambda: sparse_decode_balanced(q, keys, values, indptr, selected.indices)
    )
    if any(options.get("pdl") for options in launch_options):  # dependent launches timed too
        record["attend_pdl_ms"] = bench_ms(
            lambda: sparse_decode_balanced(q, keys, values, indptr, selected.indices, pdl=True)
        )
    record["attend_chunked_ms"] = bench_ms(
        lambda: sparse_decode(q, keys, values, indptr, selected.indices, context)
    )
    record["attend_best_ms"], record["attend_best_split"] = best_split(
        lambda split: sparse_decode(q, keys, values, indptr, selected.indices, context, split),
        (None, 128, 256, 512),
    )
    tactic_out = sparse_decode_balanced(q, keys, values, indptr, selected.indices).float()
    record["chunked_vs_balanced_error"] = relative_error(
        sparse_decode(q, keys, values, indptr, selected.indices, context).float(), tactic_out
    )
    nnz = int(indptr[-1])
    record["selected_fraction"] = nnz / (rows * context)
    first_rows = first_request_rows(selected)
    record["needed_fraction"], record["min_recall"] = oracle_and_recall(
        q[0], keys[:context], first_rows
    )
    record["overshoot"] = (
        sum(r.numel() for r in first_rows) / NUM_KV_HEADS / context / record["needed_fraction"]
    )
    record["tactic_vs_dense_error"] = relative_error(tactic_out, reference)
    if flashinfer is not None:
        record["flashinfer_attend_ms"], record["flashinfer_plan_host_ms"], fi_tactic = (
            time_flashinfer(
                flashinfer, q, keys, values, indptr, selected.indices, "flashinfer tactic"
            )
        )
        record["flashinfer_vs_ours_tactic_error"] = relative_error(fi_tactic, tactic_out)
    record["tactic_ms"] = record["select_ms"] + record["attend_ms"]
    record["speedup_vs_sdpa"] = record["sdpa_ms"] / record["tactic_ms"]
    # every claim is against the fastest dense baseline of the same run
    dense_times = {name: record[f"{name}_ms"] for name in ("sdpa", "flashinfer_dense", "dense")
                   if f"{name}_ms" in record}  # fmt: skip
    record["fastest_dense"] = min(dense_times, key=dense_times.get)
    record["fastest_dense_ms"] = dense_times[record["fastest_dense"]]
    record["speedup_vs_fastest_dense"] = record["fastest_dense_ms"] / record["tactic_ms"]
    record["select_share"] = record["select_ms"] / record["tactic_ms"]
    for name, variant in (variants or {}).items():
        variant_pool, variant_segments, _ = build_pool(keys, batch, context, variant)
        pool = req_to_segment = None  # the main pool's memory back first

        def select_variant(variant=variant, pool=variant_pool, segments=variant_segments):
            return select_rows(q, keys, pool, segments, req_to_token, pool_indices, seq_lens,
                               targets, context, variant)  # fmt: skip

        select_ms = bench_ms(select_variant)
        chosen = select_variant()
        attend_ms = bench_ms(
            lambda chosen=chosen: sparse_decode_balanced(q, keys, values, chosen.indptr,
                                                         chosen.indices)
        )  # fmt: skip
        _, min_recall = oracle_and_recall(q[0], keys[:context], first_request_rows(chosen))
        record[f"variant_{name}"] = {
            "select_ms": select_ms, "attend_ms": attend_ms, "tactic_ms": select_ms + attend_ms,
            "selected_fraction": int(chosen.indptr[-1]) / (rows * context),
            "min_recall": min_recall,
            "speedup_vs_fastest_dense": record["fastest_dense_ms"] / (select_ms + attend_ms),
        }  # fmt: skip
        variant_pool = variant_segments = chosen = None
    # the dense fallback: what the engine's cost model picks for this cell (its dense path is
    # our dense kernel), against the fastest dense baseline
    if cost_model is not None:
        kv_bytes = rows * context * 2 * KV_ROW_BYTES
        pays = cost_model.pays([context] * batch, [record["selected_fraction"]] * batch,
                               NUM_KV_HEADS * 2 * KV_ROW_BYTES)  # fmt: skip
        record["auto_path"] = "tactic" if pays else "dense"
        record["auto_ms"] = record["tactic_ms"] if pays else record["dense_ms"]
        record["auto_vs_fastest_dense"] = record["fastest_dense_ms"] / record["auto_ms"]
        selected_bytes = kv_bytes * record["selected_fraction"]
        record["auto_predicted_ms"] = {
            "dense": cost_model.dense_ms(kv_bytes),
            "tactic": cost_model.tactic_ms(batch, kv_bytes, selected_bytes),
        }

    # bytes each must move at least
    dense_bytes = rows * context * (2 * KV_ROW_BYTES)
    clusters = (context // config.segment_size) * (config.segment_size // config.cluster_size)
    tail = context % config.segment_size
    select_bytes = (
        rows
        * (
            clusters * cluster_bytes
            + tail * KV_ROW_BYTES  # tail keys, scored exactly
            + config.exact_fraction * context * (KV_ROW_BYTES + INDEX_BYTES)  # the exact top
        )
        + nnz * 2 * INDEX_BYTES
    )  # member slots read, indices written
    attend_bytes = nnz * (2 * KV_ROW_BYTES + INDEX_BYTES)
    seconds = lambda ms: ms / 1e3  # noqa: E731
    record.update(
        dense_bytes=dense_bytes,
        select_bytes=int(select_bytes),
        attend_bytes=attend_bytes,
        dense_bw_fraction=dense_bytes / seconds(record["dense_ms"]) / copy_bytes_per_s,
        sdpa_bw_fraction=dense_bytes / seconds(record["sdpa_ms"]) / copy_bytes_per_s,
        tactic_bw_fraction=(select_bytes + attend_bytes)
        / seconds(record["tactic_ms"])
        / copy_bytes_per_s,
        attend_bw_fraction=attend_bytes / seconds(record["attend_ms"]) / copy_bytes_per_s,
        roofline_speedup=dense_bytes / (select_bytes + attend_bytes),
        tactic_vs_roofline=record["tactic_ms"]
        / (1e3 * (select_bytes + attend_bytes) / copy_bytes_per_s),
        needed_fraction_asked=fraction,
    )
    return record


def clustering_record(context, config, flops_per_s, generator):
    """Time to cluster one prefilled context for all layers and KV heads, against the prefill."""
    keys, _, _ = topic_context(1, context, 0.03, generator)
    build_cluster_index(keys, config, kmeans=segment_kmeans)  # compile
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(NUM_LAYERS):
        build_cluster_index(keys, config, kmeans=segment_kmeans)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    prefill_seconds = prefill_flops(context) / flops_per_s
    return {
        "kind": "clustering",
        "context": context,
        "layers": NUM_LAYERS,
        "kv_heads": NUM_KV_HEADS,
        "clustering_s": seconds,
        "estimated_prefill_s": prefill_seconds,
        "clustering_share_of_prefill": seconds / prefill_seconds,
    }


COLUMNS = [
    ("ctx", "context", "{:>7}"), ("B", "batch", "{:>3}"), ("need", "needed_fraction", "{:>6.2%}"),
    ("sel", "selected_fraction", "{:>6.2%}"), ("rec", "min_recall", "{:>5.3f}"),
    ("sdpa", "sdpa_ms", "{:>8.3f}"), ("fi-dense", "flashinfer_dense_ms", "{:>8.3f}"),
    ("dense", "dense_ms", "{:>8.3f}"), ("select", "select_ms", "{:>7.3f}"),
    ("attend", "attend_ms", "{:>7.3f}"), ("fi-att", "flashinfer_attend_ms", "{:>7.3f}"),
    ("tactic", "tactic_ms", "{:>7.3f}"), ("x sdpa", "speedup_vs_sdpa", "{:>6.2f}"),
    ("x best", "speedup_vs_fastest_dense", "{:>6.2f}"), ("sel sh", "select_share", "{:>6.0%}"),
    ("roof x", "roofline_speedup", "{:>6.1f}"), ("dense bw", "dense_bw_fraction", "{:>6.1%}"),
    ("tac bw", "tactic_bw_fraction", "{:>6.1%}"), ("auto", "auto_path", "{:>6}"),
    ("x auto", "auto_vs_fastest_dense", "{:>6.2f}"),
]  # fmt: skip


def variant_table(records) -> str:
    """Each variant beside its cell's main config: select and total ms, speedup over the
    fastest dense baseline, selected share, smallest recall."""
    lines = []
    for record in records:
        for key, variant in record.items():
            if not key.startswith("variant_"):
                continue
            lines.append(
                f"{record['context']:>7} {record['batch']:>3} {record['needed_fraction']:>6.2%} "
                f"{key[8:]:>14}: select {variant['select_ms']:.3f} (main "
                f"{record['select_ms']:.3f}), tactic {variant['tactic_ms']:.3f} (main "
                f"{record['tactic_ms']:.3f}), x best {variant['speedup_vs_fastest_dense']:.2f} "
                f"(main {record['speedup_vs_fastest_dense']:.2f}), sel "
                f"{variant['selected_fraction']:.2%}, rec {variant['min_recall']:.3f}"
            )  # fmt: skip
    return "\n".join(lines)


def table(records):
    lines = [" ".join(f"{title:>8}" for title, _, _ in COLUMNS)]
    for record in records:
        if record.get("kind") == "clustering":
            continue
        cells = []
        for _, key, fmt in COLUMNS:
            value = record.get(key)
            cells.append(f"{'-':>8}" if value is None else f"{fmt.format(value):>8}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072, 262144])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3])
    parser.add_argument("--clustering-contexts", type=int, nargs="*", default=[32768, 131072])
    parser.add_argument("--no-flashinfer", action="store_true")
    parser.add_argument("--exact-fraction", type=float, nargs="+", default=None,
                        help="TacticConfig.exact_fraction (default: the config's); each further "
                        "one is timed beside it, as --centroids")  # fmt: skip
    parser.add_argument("--variance", choices=["diagonal", "isotropic", "profile"], nargs="+",
                        default=None, help="TacticConfig.variance (default: the config's); each "
                        "further one is timed beside it, as --centroids")  # fmt: skip
    parser.add_argument("--centroids", choices=["kv", "fp8"], nargs="+", default=["kv"],
                        help="TacticConfig.centroids: the first is the cell's; each further one "
                        "is timed beside it on the same inputs (variant_<name> in the JSON)")
    parser.add_argument("--variant", action="append", default=[], metavar="FIELD=VALUE,...",
                        help="a TacticConfig spec over the cell's config (e.g. 'cluster_size=8,"
                        "boundary_tokens=true,boundary_band=0.1'), timed beside it on the same "
                        "inputs as --centroids' further ones; repeatable")  # fmt: skip
    parser.add_argument("--output", default=None, help="JSON path (default: by device name)")
    parser.add_argument("--launch-options", default="default",
                        help="select_rows launch options to time in each cell, the fastest taken: "
                        "'default', or ';'-separated name=value,name=value sets (e.g. "
                        "'units_per_program=64;units_per_program=256,score_units_per_program=128')")
    args = parser.parse_args()
    launch_options = [parse_launch(spec) for spec in args.launch_options.split(";")]
    config = TacticConfig()
    if args.exact_fraction is not None:
        config = dataclasses.replace(config, exact_fraction=args.exact_fraction[0])
    if args.variance is not None:
        config = dataclasses.replace(config, variance=args.variance[0])
    config = dataclasses.replace(config, centroids=args.centroids[0])
    variants = {f"centroids_{name}": dataclasses.replace(config, centroids=name)
                for name in args.centroids[1:]}  # fmt: skip
    variants |= {f"variance_{name}": dataclasses.replace(config, variance=name)
                 for name in (args.variance or [])[1:]}  # fmt: skip
    variants |= {f"exact_fraction_{value:g}": dataclasses.replace(config, exact_fraction=value)
                 for value in (args.exact_fraction or [])[1:]}  # fmt: skip
    try:
        variants |= {spec: config_from_spec(spec, base=config) for spec in args.variant}
    except ValueError as error:
        parser.error(f"--variant: {error}")
    cost_model = cost.for_device("cuda")
    device_name = torch.cuda.get_device_name()
    log(f"{device_name}; torch {torch.__version__}, triton {triton.__version__}")
    copy_bytes_per_s = copy_bandwidth()
    flops_per_s = matmul_rate()
    log(f"copy {copy_bytes_per_s / 1e9:.0f} GB/s, bf16 matmul {flops_per_s / 1e12:.0f} TFLOP/s")
    flashinfer = None
    if not args.no_flashinfer:
        try:
            from tactic_server.kernels.flashinfer_decode import FlashInferSparseDecode

            flashinfer = FlashInferSparseDecode("cuda")
        except ImportError as error:
            log(f"FlashInfer not available ({error}); its columns stay empty")
    records = []
    total_free = torch.cuda.mem_get_info()[0]
    for context in args.contexts:
        for batch in args.batches:
            # K and V, SDPA's contiguous copies, index lists: about 4.5x the cache
            needed = 4.5 * batch * context * NUM_KV_HEADS * 2 * KV_ROW_BYTES
            if needed > 0.85 * total_free:
                log(f"skip context {context} batch {batch}: needs about {needed / 2**30:.0f} GiB")
                continue
            for fraction in args.fractions:
                started = time.perf_counter()
                record = measure(context, batch, fraction, flashinfer, copy_bytes_per_s, config,
                                 seed=len(records), launch_options=launch_options,
                                 cost_model=cost_model, variants=variants)  # fmt: skip
                records.append(record)
                log(f"context {context} batch {batch} fraction {fraction}: "
                    f"{time.perf_counter() - started:.1f} s")  # fmt: skip
                torch.cuda.empty_cache()
    generator = torch.Generator(device="cuda").manual_seed(1234)
    for context in args.clustering_contexts:
        records.append(clustering_record(context, config, flops_per_s, generator))
        log(f"clustering {context}: {records[-1]}")

    print(table(records))
    print(variant_table(records))
    report = {
        "date": datetime.date.today().isoformat(),
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_bandwidth_gb_s": copy_bytes_per_s / 1e9,
        "bf16_matmul_tflop_s": flops_per_s / 1e12,
        "command": "python benchmarks/decode_attention.py " + " ".join(sys.argv[1:]),
        "config": config.__dict__,
        "records": records,
        "timed_without_graph": FALLBACKS,
    }
    slug = device_name.lower().replace("nvidia ", "").replace(" ", "_")
    output = Path(args.output or f"benchmarks/results/decode_attention_{slug}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
