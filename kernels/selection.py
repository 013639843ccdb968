"""Tactic selection on the device for a batch of requests: score every unit (cluster or tail
position), score the top units exactly, walk units by mass per token until each query head's
target is reached, and write one CSR row of flat KV rows per (request, KV head).

It computes the same function as tactic_server.tactic.selection.plan_tactic (the reference), with
no host synchronisation: buffers are sized from host-side bounds, counts stay on the device.
Units of a request: clusters of its full segments in (segment, cluster) order, then its tail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tactic_server.tactic.config import TacticConfig

from .cluster_pool import ClusterPool


@triton.jit
def _score_units_kernel(
    q_ptr,
    k_ptr,
    centroids_ptr,
    spreads_ptr,
    offsets_ptr,
    req_to_segment_ptr,
    req_to_token_ptr,
    req_pool_ptr,
    seq_lens_ptr,
    log_mass_ptr,
    unit_size_ptr,
    stride_q_batch,
    stride_q_head,
    stride_req_segment,
    stride_req_token,
    num_kv_heads,
    max_units,
    scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SEGMENT: tl.constexpr,
    CLUSTERS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_U: tl.constexpr,
):
    """Program (row, unit block): log of each unit's mass for each query head of the row, the
    log-normal estimate n exp(q.mu/sqrt(d) + |q|^2 var/(2d)) for clusters and the exact score
    for tail positions (-inf for padding), and each unit's size."""
    row = tl.program_id(0)
    request = row // num_kv_heads
    kv_head = row % num_kv_heads
    pool_index = tl.load(req_pool_ptr + request).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + request)
    num_cluster_units = (seq_len // SEGMENT) * CLUSTERS
    tail_start = (seq_len // SEGMENT) * SEGMENT

    units = tl.program_id(1) * BLOCK_U + tl.arange(0, BLOCK_U)
    in_range = units < max_units
    is_cluster = units < num_cluster_units
    is_tail = (units >= num_cluster_units) & (units < num_cluster_units + seq_len - tail_start)
    segment_slot = tl.load(
        req_to_segment_ptr + pool_index * stride_req_segment + units // CLUSTERS,
        mask=is_cluster,
        other=0,
    ).to(tl.int64)
    cluster_row = (segment_slot * num_kv_heads + kv_head) * CLUSTERS + units % CLUSTERS
    kv_slot = tl.load(
        req_to_token_ptr + pool_index * stride_req_token + tail_start + units - num_cluster_units,
        mask=is_tail,
        other=0,
    ).to(tl.int64)

    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    centroid = tl.load(
        centroids_ptr + cluster_row[:, None] * HEAD_DIM + dims[None, :],
        mask=is_cluster[:, None] & dim_mask[None, :],
        other=0.0,
    )
    key = tl.load(
        k_ptr + (kv_slot * num_kv_heads + kv_head)[:, None] * HEAD_DIM + dims[None, :],
        mask=is_tail[:, None] & dim_mask[None, :],
        other=0.0,
    )
    vectors = tl.where(is_cluster[:, None], centroid.to(tl.float32), key.to(tl.float32))

    heads = tl.arange(0, BLOCK_H)
    head_mask = heads < GROUP
    q = tl.load(
        q_ptr
        + request * stride_q_batch
        + (kv_head * GROUP + heads)[:, None] * stride_q_head
        + dims[None, :],
        mask=head_mask[:, None] & dim_mask[None, :],
        other=0.0,
    ).to(tl.float32)
    scores = tl.dot(q, tl.trans(vectors)) * scale  # [BLOCK_H, BLOCK_U]
    query_norm_sq = tl.sum(q * q, axis=1)

    segment_offsets = offsets_ptr + (segment_slot * num_kv_heads + kv_head) * (CLUSTERS + 1)
    local = units % CLUSTERS
    cluster_size = tl.load(segment_offsets + local + 1, mask=is_cluster, other=0) - tl.load(
        segment_offsets + local, mask=is_cluster, other=0
    )
    size = tl.where(is_cluster, cluster_size, tl.where(is_tail, 1, 0))
    spread = tl.load(spreads_ptr + cluster_row, mask=is_cluster, other=0.0)
    log_mass = (
        tl.log(tl.maximum(size, 1).to(tl.float32))[None, :]
        + scores
        + query_norm_sq[:, None] * spread[None, :] * (scale * scale) * 0.5
    )
    log_mass = tl.where((size > 0)[None, :], log_mass, float("-inf"))
    out = (row * GROUP + heads)[:, None] * max_units + units[None, :]
    tl.store(log_mass_ptr + out, log_mass, mask=head_mask[:, None] & in_range[None, :])
    tl.store(unit_size_ptr + row * max_units + units, size, mask=in_range)


@triton.jit
def _exact_units_kernel(
    q_ptr,
    k_ptr,
    member_slots_ptr,
    offsets_ptr,
    req_to_segment_ptr,
    req_pool_ptr,
    seq_lens_ptr,
    exact_ptr,
    log_mass_ptr,
    stride_q_batch,
    stride_q_head,
    stride_req_segment,
    num_kv_heads,
    max_units,
    scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SEGMENT: tl.constexpr,
    CLUSTERS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Program (row, unit block): for each cluster some query head must score exactly
    (exact [rows, GROUP, max_units] int8), replace that head's estimate by the exact log-mass."""
    row = tl.program_id(0)
    request = row // num_kv_heads
    kv_head = row % num_kv_heads
    pool_index = tl.load(req_pool_ptr + request).to(tl.int64)
    num_cluster_units = (tl.load(seq_lens_ptr + request) // SEGMENT) * CLUSTERS
    heads = tl.arange(0, BLOCK_H)
    head_mask = heads < GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    q = tl.load(
        q_ptr
        + request * stride_q_batch
        + (kv_head * GROUP + heads)[:, None] * stride_q_head
        + dims[None, :],
        mask=head_mask[:, None] & dim_mask[None, :],
        other=0.0,
    ).to(tl.float32)
    for offset in range(0, BLOCK_U):
        unit = tl.program_id(1) * BLOCK_U + offset
        flags = tl.load(
            exact_ptr + (row * GROUP + heads) * max_units + unit,
            mask=head_mask & (unit < num_cluster_units),
            other=0,
        )
        if tl.max(flags, axis=0) > 0:
            segment_slot = tl.load(
                req_to_segment_ptr + pool_index * stride_req_segment + unit // CLUSTERS
            ).to(tl.int64)
            segment_row = segment_slot * num_kv_heads + kv_head
            start = tl.load(offsets_ptr + segment_row * (CLUSTERS + 1) + unit % CLUSTERS)
            end = tl.load(offsets_ptr + segment_row * (CLUSTERS + 1) + unit % CLUSTERS + 1)
            running_max = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
            running_sum = tl.zeros([BLOCK_H], dtype=tl.float32)
            for member_start in range(start, end, BLOCK_M):
                members = member_start + tl.arange(0, BLOCK_M)
                member_mask = members < end
                slots = tl.load(
                    member_slots_ptr + segment_row * SEGMENT + members, mask=member_mask, other=0
                ).to(tl.int64)
                keys = tl.load(
                    k_ptr + (slots * num_kv_heads + kv_head)[:, None] * HEAD_DIM + dims[None, :],
                    mask=member_mask[:, None] & dim_mask[None, :],
                    other=0.0,
                ).to(tl.float32)
                scores = tl.dot(q, tl.trans(keys)) * scale
                scores = tl.where(member_mask[None, :], scores, float("-inf"))
                new_max = tl.maximum(running_max, tl.max(scores, axis=1))
                running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(
                    tl.exp(scores - new_max[:, None]), axis=1
                )
                running_max = new_max
            tl.store(
                log_mass_ptr + (row * GROUP + heads) * max_units + unit,
                running_max + tl.log(running_sum),
                mask=head_mask & (flags > 0),
            )


@triton.jit
def _write_rows_kernel(
    member_slots_ptr,
    offsets_ptr,
    req_to_segment_ptr,
    req_to_token_ptr,
    req_pool_ptr,
    seq_lens_ptr,
    selected_ptr,
    unit_start_ptr,
    indices_ptr,
    stride_req_segment,
    stride_req_token,
    num_kv_heads,
    max_units,
    SEGMENT: tl.constexpr,
    CLUSTERS: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Program (row, unit block): copy each selected unit's KV rows (slot * H_kv + kv_head) to
    indices[unit_start[row, unit]:...]."""
    row = tl.program_id(0)
    request = row // num_kv_heads
    kv_head = row % num_kv_heads
    pool_index = tl.load(req_pool_ptr + request).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + request)
    num_cluster_units = (seq_len // SEGMENT) * CLUSTERS
    tail_start = (seq_len // SEGMENT) * SEGMENT
    for offset in range(0, BLOCK_U):
        unit = tl.program_id(1) * BLOCK_U + offset
        chosen = tl.load(selected_ptr + row * max_units + unit, mask=unit < max_units, other=0)
        if chosen != 0:
            destination = tl.load(unit_start_ptr + row * max_units + unit)
            if unit < num_cluster_units:
                segment_slot = tl.load(
                    req_to_segment_ptr + pool_index * stride_req_segment + unit // CLUSTERS
                ).to(tl.int64)
                segment_row = segment_slot * num_kv_heads + kv_head
                start = tl.load(offsets_ptr + segment_row * (CLUSTERS + 1) + unit % CLUSTERS)
                end = tl.load(offsets_ptr + segment_row * (CLUSTERS + 1) + unit % CLUSTERS + 1)
                for member_start in range(start, end, BLOCK_M):
                    members = member_start + tl.arange(0, BLOCK_M)
                    member_mask = members < end
                    slots = tl.load(
                        member_slots_ptr + segment_row * SEGMENT + members,
                        mask=member_mask,
                        other=0,
                    )
                    tl.store(
                        indices_ptr + destination + members - start,
                        slots * num_kv_heads + kv_head,
                        mask=member_mask,
                    )
            else:
                slot = tl.load(
                    req_to_token_ptr
                    + pool_index * stride_req_token
                    + tail_start
                    + unit
                    - num_cluster_units
                )
                tl.store(indices_ptr + destination, slot * num_kv_heads + kv_head)


@dataclass(frozen=True)
class SelectedRows:
    """Device-side output of a selection step.
    indptr [rows + 1] int32 and indices [capacity] int32 (flat KV rows): the CSR the attention
    executors read, rows = batch * H_kv; query_head_counts [batch, H_q] int64 tokens each query
    head selected on its own; estimated_mass [batch, H_q] float32 share of the estimated mass
    each query head's selection covers."""

    indptr: torch.Tensor
    indices: torch.Tensor
    query_head_counts: torch.Tensor
    estimated_mass: torch.Tensor


def _forced_units(pool, req_pool, seq_lens, num_kv_heads, max_units, config):
    """[rows, max_units] bool: units holding always-attended positions (the recent window and
    the sinks), plus every tail unit when tail_policy is 'attend'."""
    size, clusters = pool.segment_size, pool.clusters_per_segment
    device = seq_lens.device
    batch = seq_lens.shape[0]
    seq = seq_lens.long()[:, None]
    tail_start = (seq // size) * size
    num_cluster_units = (seq // size) * clusters
    recent = seq - config.recent_window + torch.arange(config.recent_window, device=device)
    sinks = torch.arange(config.sink_tokens, device=device).expand(batch, -1)
    positions = torch.cat([recent, sinks], dim=1)  # [batch, P]
    valid = (positions >= 0) & (positions < seq)
    positions = positions.clamp(min=0)
    segment_index = (positions // size).clamp(max=pool.req_to_segment.shape[1] - 1)
    segment_slot = torch.gather(pool.req_to_segment[req_pool.long()].long(), 1, segment_index)
    heads = torch.arange(num_kv_heads, device=device)
    local_cluster = pool.token_cluster[
        segment_slot[:, None, :], heads[None, :, None], (positions % size)[:, None, :]
    ].long()  # [batch, H_kv, P]
    cluster_unit = (positions // size)[:, None, :] * clusters + local_cluster
    tail_unit = (num_cluster_units + positions - tail_start)[:, None, :].expand_as(cluster_unit)
    unit = torch.where((positions >= tail_start)[:, None, :], tail_unit, cluster_unit)
    unit = torch.where(valid[:, None, :], unit, max_units)  # a spare column takes invalid ones
    forced = torch.zeros(batch, num_kv_heads, max_units + 1, dtype=torch.bool, device=device)
    forced.scatter_(2, unit, True)
    forced = forced[..., :max_units]
    if config.tail_policy == "attend":
        units = torch.arange(max_units, device=device)
        tail_units = (units >= num_cluster_units) & (units < num_cluster_units + seq - tail_start)
        forced |= tail_units[:, None, :]
    return forced.reshape(batch * num_kv_heads, max_units)


def select_rows(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    pool: ClusterPool,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    targets: torch.Tensor,
    max_seq_len: int,
    config: TacticConfig | None = None,
    block_units: int = 64,
) -> SelectedRows:
    """Tactic selection for a decode batch. q [batch, H_q, d]; k_cache [num_slots, H_kv, d];
    req_pool_indices, seq_lens [batch] on the device; targets [max_reqs] float32 on the device,
    the target mass P of each request by its pool index; max_seq_len (host) bounds seq_lens."""
    config = config or TacticConfig()
    if config.segment_size != pool.segment_size:
        raise ValueError("config.segment_size must equal the cluster pool's segment_size")
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    rows = batch * num_kv_heads
    device = q.device
    size, clusters = pool.segment_size, pool.clusters_per_segment
    max_units = (max_seq_len // size) * clusters + size
    scale = 1.0 / math.sqrt(head_dim)
    block_h = max(16, triton.next_power_of_2(group))
    block_d = triton.next_power_of_2(head_dim)
    common = dict(GROUP=group, HEAD_DIM=head_dim, SEGMENT=size, CLUSTERS=clusters)
    unit_blocks = triton.cdiv(max_units, block_units)

    log_mass = torch.empty(rows, group, max_units, device=device)
    unit_size = torch.empty(rows, max_units, dtype=torch.int32, device=device)
    _score_units_kernel[(rows, unit_blocks)](
        q, k_cache, pool.centroids, pool.spreads, pool.cluster_offsets, pool.req_to_segment,
        req_to_token, req_pool_indices, seq_lens, log_mass, unit_size,
        q.stride(0), q.stride(1), pool.req_to_segment.stride(0), req_to_token.stride(0),
        num_kv_heads, max_units, scale,
        BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_U=block_units, **common,
    )  # fmt: skip

    sizes = unit_size.float()[:, None, :].expand(-1, group, -1)
    log_sizes = torch.where(sizes > 0, sizes.clamp_min(1).log(), -math.inf)
    density = torch.where(sizes > 0, log_mass - log_sizes, -math.inf)
    # the units at the top of the estimated order, up to exact_fraction of each context
    by_rank = torch.argsort(density, dim=-1, descending=True)
    sorted_sizes = torch.gather(sizes, 2, by_rank)
    budget = (config.exact_fraction * seq_lens.float()).repeat_interleave(num_kv_heads)
    exact_in_rank = (sorted_sizes.cumsum(-1) - sorted_sizes) < budget[:, None, None]
    exact = torch.zeros_like(exact_in_rank).scatter_(2, by_rank, exact_in_rank).to(torch.int8)
    _exact_units_kernel[(rows, unit_blocks)](
        q, k_cache, pool.member_slots, pool.cluster_offsets, pool.req_to_segment,
        req_pool_indices, seq_lens, exact, log_mass,
        q.stride(0), q.stride(1), pool.req_to_segment.stride(0),
        num_kv_heads, max_units, scale,
        BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_U=block_units, BLOCK_M=16, **common,
    )  # fmt: skip

    forced = _forced_units(pool, req_pool_indices, seq_lens, num_kv_heads, max_units, config)
    forced = forced[:, None, :].expand(-1, group, -1)
    walk_key = torch.where(sizes > 0, log_mass - log_sizes, -math.inf)
    walk_key = torch.where(forced, math.inf, walk_key)
    walk_order = torch.argsort(walk_key, dim=-1, descending=True)
    walk_mass = torch.gather(log_mass, 2, walk_order)
    walk_mass = torch.exp(walk_mass - walk_mass.amax(dim=-1, keepdim=True)).nan_to_num(0.0)
    cumulative = walk_mass.cumsum(dim=-1)
    total = cumulative[..., -1:]
    target = targets[req_pool_indices.long()].repeat_interleave(num_kv_heads)[:, None, None]
    taken = (cumulative < target * total).sum(dim=-1, keepdim=True) + 1
    taken = torch.where(target >= 1.0, max_units, taken)
    taken = torch.maximum(taken, forced.sum(dim=-1, keepdim=True)).clamp_max(max_units)
    in_walk = torch.arange(max_units, device=device) < taken
    selected = torch.zeros_like(in_walk).scatter_(2, walk_order, in_walk)
    estimated_mass = torch.gather(cumulative, 2, taken - 1) / total.clamp_min(1e-38)

    union = selected.any(dim=1)
    row_tokens = torch.where(union, unit_size, 0).long()
    indptr = torch.zeros(rows + 1, dtype=torch.int64, device=device)
    indptr[1:] = row_tokens.sum(dim=-1).cumsum(0)
    unit_start = indptr[:-1, None] + row_tokens.cumsum(dim=-1) - row_tokens
    indices = torch.empty(rows * max_seq_len, dtype=torch.int32, device=device)
    _write_rows_kernel[(rows, unit_blocks)](
        pool.member_slots, pool.cluster_offsets, pool.req_to_segment, req_to_token,
        req_pool_indices, seq_lens, union.to(torch.int8), unit_start, indices,
        pool.req_to_segment.stride(0), req_to_token.stride(0), num_kv_heads, max_units,
        SEGMENT=size, CLUSTERS=clusters, BLOCK_U=block_units, BLOCK_M=16,
    )  # fmt: skip
    counts = (selected * unit_size[:, None, :]).sum(dim=-1)
    return SelectedRows(
        indptr=indptr.to(torch.int32),
        indices=indices,
        query_head_counts=counts.reshape(batch, num_q_heads),
        estimated_mass=estimated_mass.reshape(batch, num_q_heads),
    )
