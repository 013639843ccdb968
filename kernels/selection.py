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
from .decode_attention import dot_dtype, dot_precision, load_group_queries


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
    clustered_ptr,
    log_mass_ptr,
    unit_size_ptr,
    forced_ptr,
    token_cluster_ptr,
    stride_q_batch,
    stride_q_head,
    stride_req_segment,
    stride_req_token,
    num_kv_heads,
    max_units,
    scale,
    recent_window,
    sink_tokens,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SEGMENT: tl.constexpr,
    CLUSTERS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_F: tl.constexpr,
    ATTEND_TAIL: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program (row, unit block): log of each unit's mass for each query head of the row, the
    capped log-normal estimate of tactic.selection for clusters and the exact score
    for tail positions (-inf for padding); each unit's size; and whether it holds an
    always-attended position (recent window, sinks, the tail when ATTEND_TAIL)."""
    row = tl.program_id(0)
    request = row // num_kv_heads
    kv_head = row % num_kv_heads
    pool_index = tl.load(req_pool_ptr + request).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + request)
    num_cluster_units = tl.load(clustered_ptr + request) * CLUSTERS
    tail_start = tl.load(clustered_ptr + request) * SEGMENT

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
    vectors = tl.where(is_cluster[:, None], centroid.to(DOT_DTYPE), key.to(DOT_DTYPE))

    heads = tl.arange(0, BLOCK_H)
    head_mask = heads < GROUP
    q = load_group_queries(
        q_ptr, request, kv_head, stride_q_batch, stride_q_head, GROUP, HEAD_DIM, BLOCK_H, BLOCK_D
    ).to(tl.float32)
    # products of 16-bit values are exact in fp32 on tensor cores; a float32 cache gets IEEE
    # products (tf32 would move scores by 1e-3 and the selection with them)
    scores = tl.dot(q.to(DOT_DTYPE), tl.trans(vectors), input_precision=DOT_PRECISION) * scale
    query_norm_sq = tl.sum(q * q, axis=1)

    segment_offsets = offsets_ptr + (segment_slot * num_kv_heads + kv_head) * (CLUSTERS + 1)
    local = units % CLUSTERS
    cluster_size = tl.load(segment_offsets + local + 1, mask=is_cluster, other=0) - tl.load(
        segment_offsets + local, mask=is_cluster, other=0
    )
    size = tl.where(is_cluster, cluster_size, tl.where(is_tail, 1, 0))
    spread = tl.load(spreads_ptr + cluster_row, mask=is_cluster, other=0.0)
    # log-normal correction, capped at the expected largest of n normal scores (as the reference)
    log_size = tl.log(tl.maximum(size, 1).to(tl.float32))[None, :]
    score_variance = query_norm_sq[:, None] * spread[None, :] * (scale * scale)
    ceiling = tl.sqrt(score_variance * 2.0 * log_size)
    log_mass = log_size + scores + tl.minimum(score_variance * 0.5, ceiling)
    log_mass = tl.where((size > 0)[None, :], log_mass, float("-inf"))
    out = (row * GROUP + heads)[:, None] * max_units + units[None, :]
    tl.store(log_mass_ptr + out, log_mass, mask=head_mask[:, None] & in_range[None, :])
    tl.store(unit_size_ptr + row * max_units + units, size, mask=in_range)

    # the units of the always-attended positions: the last recent_window, the first sink_tokens
    slots = tl.arange(0, BLOCK_F)
    positions = tl.where(
        slots < recent_window, seq_len - recent_window + slots, slots - recent_window
    )
    position_valid = (
        (slots < recent_window + sink_tokens) & (positions >= 0) & (positions < seq_len)
    )
    position_segment = tl.load(
        req_to_segment_ptr + pool_index * stride_req_segment + positions // SEGMENT,
        mask=position_valid & (positions < tail_start),
        other=0,
    ).to(tl.int64)
    local_cluster = tl.load(
        token_cluster_ptr
        + (position_segment * num_kv_heads + kv_head) * SEGMENT
        + positions % SEGMENT,
        mask=position_valid & (positions < tail_start),
        other=0,
    )
    forced_units = tl.where(
        positions < tail_start,
        (positions // SEGMENT) * CLUSTERS + local_cluster,
        num_cluster_units + positions - tail_start,
    )
    forced_units = tl.where(position_valid, forced_units, -1)
    forced = tl.max((units[:, None] == forced_units[None, :]).to(tl.int32), axis=1) > 0
    if ATTEND_TAIL:
        forced = forced | is_tail
    tl.store(forced_ptr + row * max_units + units, forced.to(tl.int8), mask=in_range)


@triton.jit
def _order_key(values):
    """int32 keys that order like the float32 values (flip the magnitude bits of negatives)."""
    bits = values.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _exact_threshold_kernel(
    log_mass_ptr,
    unit_size_ptr,
    seq_lens_ptr,
    exact_ptr,
    num_kv_heads,
    max_units,
    exact_fraction,
    GROUP: tl.constexpr,
    UNITS_PAD: tl.constexpr,
):
    """Program (row, query head): mark the units whose estimated mass per token is so high that
    fewer than exact_fraction * seq_len tokens lie in denser units; they are scored exactly.
    Bisection on the order key finds the density threshold without sorting."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    units = tl.arange(0, UNITS_PAD)
    valid_unit = units < max_units
    size = tl.load(unit_size_ptr + row * max_units + units, mask=valid_unit, other=0)
    log_mass = tl.load(
        log_mass_ptr + (row * GROUP + head) * max_units + units, mask=valid_unit, other=0.0
    )
    occupied = size > 0
    key = _order_key(log_mass - tl.log(tl.maximum(size, 1).to(tl.float32)))
    budget = exact_fraction * tl.load(seq_lens_ptr + row // num_kv_heads).to(tl.float32)
    # find the smallest threshold t with sum(size[key > t]) < budget; exact = key >= t
    low = tl.min(tl.where(occupied, key, 2147483647), axis=0).to(tl.int64) - 1
    high = tl.max(tl.where(occupied, key, -2147483647), axis=0).to(tl.int64)
    all_below = tl.sum(tl.where(occupied, size, 0), axis=0) < budget
    for _ in range(34):
        middle = low + (high - low) // 2
        denser = tl.sum(tl.where(occupied & (key > middle), size, 0), axis=0)
        searching = high - low > 1
        low = tl.where(searching & (denser >= budget), middle, low)
        high = tl.where(searching & (denser < budget), middle, high)
    threshold = tl.where(all_below, low, high)
    threshold = tl.where(budget > 0, threshold, 1 << 40)  # a zero budget scores nothing exactly
    exact = occupied & (key >= threshold)
    tl.store(
        exact_ptr + (row * GROUP + head) * max_units + units, exact.to(tl.int8), mask=valid_unit
    )


@triton.jit
def _walk_kernel(
    log_mass_ptr,
    unit_size_ptr,
    forced_ptr,
    targets_ptr,
    req_pool_ptr,
    selected_ptr,
    counts_ptr,
    estimated_mass_ptr,
    num_kv_heads,
    max_units,
    GROUP: tl.constexpr,
    UNITS_PAD: tl.constexpr,
):
    """Program (row, query head): the densest units (always-attended ones first) whose mass
    reaches the request's target share of the total: the shortest prefix of the units ordered
    by mass per token, found by bisection on the order key instead of a sort."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    units = tl.arange(0, UNITS_PAD)
    valid_unit = units < max_units
    size = tl.load(unit_size_ptr + row * max_units + units, mask=valid_unit, other=0)
    log_mass = tl.load(
        log_mass_ptr + (row * GROUP + head) * max_units + units,
        mask=valid_unit,
        other=float("-inf"),
    )
    forced = tl.load(forced_ptr + row * max_units + units, mask=valid_unit, other=0) > 0
    occupied = size > 0
    key = _order_key(log_mass - tl.log(tl.maximum(size, 1).to(tl.float32)))
    key = tl.where(forced, 2147483647, tl.where(occupied, key, -2147483647))
    mass = tl.where(occupied, tl.exp(log_mass - tl.max(log_mass, axis=0)), 0.0)
    total = tl.sum(mass, axis=0)
    target = tl.load(targets_ptr + tl.load(req_pool_ptr + row // num_kv_heads))
    need = target * total
    # find the largest threshold t with sum(mass[key >= t]) >= need; selected = key >= t
    low = tl.min(tl.where(occupied, key, 2147483647), axis=0).to(tl.int64)
    high = tl.max(key, axis=0).to(tl.int64) + 1
    for _ in range(34):
        middle = low + (high - low) // 2
        covered = tl.sum(tl.where(key >= middle, mass, 0.0), axis=0)
        searching = high - low > 1
        low = tl.where(searching & (covered >= need), middle, low)
        high = tl.where(searching & (covered < need), middle, high)
    threshold = tl.where(target >= 1.0, -2147483647, low)
    # empty units (padding, empty clusters) hold no token: never list them
    selected = (key >= threshold) & occupied
    tl.store(
        selected_ptr + (row * GROUP + head) * max_units + units,
        selected.to(tl.int8),
        mask=valid_unit,
    )
    tl.store(counts_ptr + row * GROUP + head, tl.sum(tl.where(selected, size, 0), axis=0))
    covered = tl.sum(tl.where(selected, mass, 0.0), axis=0)
    tl.store(estimated_mass_ptr + row * GROUP + head, covered / total)


@triton.jit
def _compact_kernel(
    flags_ptr,
    unit_size_ptr,
    units_ptr,
    token_start_ptr,
    count_ptr,
    row_tokens_ptr,
    max_units,
    GROUP: tl.constexpr,
    UNITS_PAD: tl.constexpr,
):
    """Program (row): the units flagged ([rows, GROUP, max_units] int8) for any query head of the
    row, listed in unit order: units[row, :count], each one's first token within the row
    token_start[row, :count] (prefix sum of sizes), count[row] and the row's tokens."""
    row = tl.program_id(0)
    units = tl.arange(0, UNITS_PAD)
    valid_unit = units < max_units
    flagged = tl.zeros([UNITS_PAD], dtype=tl.int32)
    for head in tl.static_range(GROUP):
        flag = tl.load(
            flags_ptr + (row * GROUP + head) * max_units + units, mask=valid_unit, other=0
        )
        flagged = tl.maximum(flagged, flag.to(tl.int32))
    tokens = tl.where(
        flagged > 0, tl.load(unit_size_ptr + row * max_units + units, mask=valid_unit, other=0), 0
    )
    slot = tl.cumsum(flagged, axis=0) - flagged
    keep = flagged > 0
    tl.store(units_ptr + row * max_units + slot, units, mask=keep)
    tl.store(
        token_start_ptr + row * max_units + slot, tl.cumsum(tokens, axis=0) - tokens, mask=keep
    )
    tl.store(count_ptr + row, tl.sum(flagged, axis=0))
    tl.store(row_tokens_ptr + row, tl.sum(tokens, axis=0))


@triton.jit
def _unit_members(
    listed_units_ptr,
    token_start_ptr,
    req_to_segment_ptr,
    offsets_ptr,
    row,
    kv_head,
    pool_index,
    listed,
    num_cluster_units,
    stride_req_segment,
    num_kv_heads,
    max_units,
    CLUSTERS: tl.constexpr,
    BLOCK_U: tl.constexpr,
):
    """The BLOCK_U listed units of this program: unit ids, whether each is a cluster or a tail
    position, the segment row and first member of clusters, member counts, and token starts."""
    entries = tl.program_id(1) * BLOCK_U + tl.arange(0, BLOCK_U)
    live = entries < listed
    unit = tl.load(listed_units_ptr + row * max_units + entries, mask=live, other=0)
    token_start = tl.load(token_start_ptr + row * max_units + entries, mask=live, other=0)
    is_cluster = live & (unit < num_cluster_units)
    is_tail = live & (unit >= num_cluster_units)
    segment_slot = tl.load(
        req_to_segment_ptr + pool_index * stride_req_segment + unit // CLUSTERS,
        mask=is_cluster,
        other=0,
    ).to(tl.int64)
    segment_row = segment_slot * num_kv_heads + kv_head
    local = segment_row * (CLUSTERS + 1) + unit % CLUSTERS
    start = tl.load(offsets_ptr + local, mask=is_cluster, other=0)
    end = tl.load(offsets_ptr + local + 1, mask=is_cluster, other=0)
    count = tl.where(is_cluster, end - start, tl.where(is_tail, 1, 0))
    return unit, token_start, is_cluster, is_tail, segment_row, start, count


@triton.jit
def _exact_units_kernel(
    q_ptr,
    k_ptr,
    member_slots_ptr,
    offsets_ptr,
    req_to_segment_ptr,
    req_pool_ptr,
    clustered_ptr,
    exact_ptr,
    exact_units_ptr,
    exact_count_ptr,
    token_start_ptr,
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
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program (row, block of BLOCK_U entries of the row's list of exactly scored units): the
    exact log-mass of each listed cluster, for every query head that flagged it (exact [rows,
    GROUP, max_units] int8), members of all BLOCK_U clusters read as one tile per step."""
    row = tl.program_id(0)
    listed = tl.load(exact_count_ptr + row)
    if tl.program_id(1) * BLOCK_U >= listed:
        return
    request = row // num_kv_heads
    kv_head = row % num_kv_heads
    pool_index = tl.load(req_pool_ptr + request).to(tl.int64)
    num_cluster_units = tl.load(clustered_ptr + request) * CLUSTERS
    unit, _, is_cluster, _, segment_row, start, count = _unit_members(
        exact_units_ptr, token_start_ptr, req_to_segment_ptr, offsets_ptr, row, kv_head,
        pool_index, listed, num_cluster_units, stride_req_segment, num_kv_heads, max_units,
        CLUSTERS, BLOCK_U,
    )  # fmt: skip
    heads = tl.arange(0, BLOCK_H)
    head_mask = heads < GROUP
    flags = tl.load(
        exact_ptr + (row * GROUP + heads)[:, None] * max_units + unit[None, :],
        mask=head_mask[:, None] & is_cluster[None, :],
        other=0,
    )  # [BLOCK_H, BLOCK_U]
    count = tl.where(tl.max(flags, axis=0) > 0, count, 0)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    q = load_group_queries(
        q_ptr, request, kv_head, stride_q_batch, stride_q_head, GROUP, HEAD_DIM, BLOCK_H, BLOCK_D
    ).to(DOT_DTYPE)
    running_max = tl.full([BLOCK_H, BLOCK_U], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_H, BLOCK_U], dtype=tl.float32)
    members = tl.arange(0, BLOCK_M)
    for member_start in range(0, tl.max(count, axis=0), BLOCK_M):
        member_mask = (member_start + members)[None, :] < count[:, None]  # [BLOCK_U, BLOCK_M]
        slots = tl.load(
            member_slots_ptr + segment_row[:, None] * SEGMENT + start[:, None] + member_start
            + members[None, :],
            mask=member_mask,
            other=0,
        ).to(tl.int64)  # fmt: skip
        rows_3d = (slots * num_kv_heads + kv_head)[:, :, None] * HEAD_DIM + dims[None, None, :]
        keys = tl.load(
            k_ptr + rows_3d, mask=member_mask[:, :, None] & dim_mask[None, None, :], other=0.0
        ).to(DOT_DTYPE)
        keys = tl.reshape(keys, (BLOCK_U * BLOCK_M, BLOCK_D))
        scores = tl.dot(q, tl.trans(keys), input_precision=DOT_PRECISION) * scale
        scores = tl.reshape(scores, (BLOCK_H, BLOCK_U, BLOCK_M))
        scores = tl.where(member_mask[None, :, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=2))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(
            tl.exp(scores - safe_max[:, :, None]), axis=2
        )
        running_max = new_max
    tl.store(
        log_mass_ptr + (row * GROUP + heads)[:, None] * max_units + unit[None, :],
        running_max + tl.log(tl.where(running_sum > 0, running_sum, 1.0)),
        mask=flags > 0,
    )


@triton.jit
def _write_rows_kernel(
    member_slots_ptr,
    offsets_ptr,
    req_to_segment_ptr,
    req_to_token_ptr,
    req_pool_ptr,
    clustered_ptr,
    selected_units_ptr,
    selected_count_ptr,
    token_start_ptr,
    indptr_ptr,
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
    """Program (row, block of BLOCK_U entries of the row's list of selected units): copy each
    listed unit's KV rows (slot * H_kv + kv_head) to indices[indptr[row] + token_start:...]."""
    row = tl.program_id(0)
    listed = tl.load(selected_count_ptr + row)
    if tl.program_id(1) * BLOCK_U >= listed:
        return
    request = row // num_kv_heads
    kv_head = row % num_kv_heads
    pool_index = tl.load(req_pool_ptr + request).to(tl.int64)
    num_cluster_units = tl.load(clustered_ptr + request) * CLUSTERS
    tail_start = tl.load(clustered_ptr + request) * SEGMENT
    unit, token_start, is_cluster, is_tail, segment_row, start, count = _unit_members(
        selected_units_ptr, token_start_ptr, req_to_segment_ptr, offsets_ptr, row, kv_head,
        pool_index, listed, num_cluster_units, stride_req_segment, num_kv_heads, max_units,
        CLUSTERS, BLOCK_U,
    )  # fmt: skip
    tail_slot = tl.load(
        req_to_token_ptr + pool_index * stride_req_token + tail_start + unit - num_cluster_units,
        mask=is_tail,
        other=0,
    )
    destination = tl.load(indptr_ptr + row) + token_start
    members = tl.arange(0, BLOCK_M)
    for member_start in range(0, tl.max(count, axis=0), BLOCK_M):
        member_mask = (member_start + members)[None, :] < count[:, None]
        member_slot = tl.load(
            member_slots_ptr + segment_row[:, None] * SEGMENT + start[:, None] + member_start
            + members[None, :],
            mask=member_mask & is_cluster[:, None],
            other=0,
        )  # fmt: skip
        slot = tl.where(is_cluster[:, None], member_slot, tail_slot[:, None])
        tl.store(
            indices_ptr + destination[:, None] + member_start + members[None, :],
            slot * num_kv_heads + kv_head,
            mask=member_mask,
        )


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


def select_rows(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    pool: ClusterPool,
    req_to_segment: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    targets: torch.Tensor,
    max_seq_len: int,
    config: TacticConfig | None = None,
    clustered_segments: torch.Tensor | None = None,
    block_units: int = 64,
    exact_units_per_program: int = 8,
    write_units_per_program: int = 16,
) -> SelectedRows:
    """Tactic selection for a decode batch. q [batch, H_q, d]; k_cache [num_slots, H_kv, d];
    req_to_segment [max_reqs, max_segments] int32: each request's segment slots in the pool;
    req_pool_indices, seq_lens [batch] on the device; targets [max_reqs] float32 on the device,
    the target mass P of each request by its pool index; max_seq_len (host) bounds seq_lens.
    clustered_segments [batch]: full segments whose clusters are in the pool (default all,
    seq_lens // segment_size); a segment completed but not yet clustered (at most one) is
    scored token by token with the tail.
    block_units: units scored per program; exact_units_per_program, write_units_per_program:
    listed units whose members an exact-scoring or row-writing program reads as one tile."""
    config = config or TacticConfig()
    if config.segment_size != pool.segment_size:
        raise ValueError("config.segment_size must equal the cluster pool's segment_size")
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    rows = batch * num_kv_heads
    device = q.device
    size, clusters = pool.segment_size, pool.clusters_per_segment
    # clusters of the full segments, plus a tail of up to two segments (one not clustered yet)
    max_units = (max_seq_len // size) * clusters + 2 * size
    if clustered_segments is None:
        clustered_segments = seq_lens // size
    clustered_segments = clustered_segments.to(torch.int32)
    units_pad = triton.next_power_of_2(max_units)
    scale = 1.0 / math.sqrt(head_dim)
    block_h = max(16, triton.next_power_of_2(group))
    block_d = triton.next_power_of_2(head_dim)
    common = dict(
        GROUP=group, HEAD_DIM=head_dim, SEGMENT=size, CLUSTERS=clusters,
        DOT_DTYPE=dot_dtype(k_cache.dtype),
        DOT_PRECISION=dot_precision(k_cache.dtype),
    )  # fmt: skip
    walk_warps = max(4, min(16, units_pad // 1024))

    log_mass = torch.empty(rows, group, max_units, device=device)
    unit_size = torch.empty(rows, max_units, dtype=torch.int32, device=device)
    forced = torch.empty(rows, max_units, dtype=torch.int8, device=device)
    _score_units_kernel[(rows, triton.cdiv(max_units, block_units))](
        q, k_cache, pool.centroids, pool.spreads, pool.cluster_offsets, req_to_segment,
        req_to_token, req_pool_indices, seq_lens, clustered_segments, log_mass, unit_size, forced,
        pool.token_cluster,
        q.stride(0), q.stride(1), req_to_segment.stride(0), req_to_token.stride(0),
        num_kv_heads, max_units, scale, config.recent_window, config.sink_tokens,
        BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_U=block_units,
        BLOCK_F=max(16, triton.next_power_of_2(config.recent_window + config.sink_tokens)),
        ATTEND_TAIL=config.tail_policy == "attend", **common,
    )  # fmt: skip

    exact = torch.empty(rows, group, max_units, dtype=torch.int8, device=device)
    _exact_threshold_kernel[(rows, group)](
        log_mass, unit_size, seq_lens, exact, num_kv_heads, max_units, config.exact_fraction,
        GROUP=group, UNITS_PAD=units_pad, num_warps=walk_warps,
    )  # fmt: skip
    listed_units = torch.empty(rows, max_units, dtype=torch.int32, device=device)
    token_start = torch.empty(rows, max_units, dtype=torch.int32, device=device)
    listed = torch.empty(rows, dtype=torch.int32, device=device)
    row_tokens = torch.empty(rows, dtype=torch.int32, device=device)
    _compact_kernel[(rows,)](
        exact, unit_size, listed_units, token_start, listed, row_tokens, max_units,
        GROUP=group, UNITS_PAD=units_pad, num_warps=walk_warps,
    )  # fmt: skip
    _exact_units_kernel[(rows, triton.cdiv(max_units, exact_units_per_program))](
        q, k_cache, pool.member_slots, pool.cluster_offsets, req_to_segment,
        req_pool_indices, clustered_segments, exact, listed_units, listed, token_start, log_mass,
        q.stride(0), q.stride(1), req_to_segment.stride(0),
        num_kv_heads, max_units, scale,
        BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_U=exact_units_per_program, BLOCK_M=16, **common,
    )  # fmt: skip

    selected = torch.empty(rows, group, max_units, dtype=torch.int8, device=device)
    counts = torch.empty(rows, group, dtype=torch.int32, device=device)
    estimated_mass = torch.empty(rows, group, device=device)
    _walk_kernel[(rows, group)](
        log_mass, unit_size, forced, targets, req_pool_indices, selected, counts, estimated_mass,
        num_kv_heads, max_units, GROUP=group, UNITS_PAD=units_pad, num_warps=walk_warps,
    )  # fmt: skip

    # the list, token offsets and counts are reused for the selected units (the union over heads)
    _compact_kernel[(rows,)](
        selected, unit_size, listed_units, token_start, listed, row_tokens, max_units,
        GROUP=group, UNITS_PAD=units_pad, num_warps=walk_warps,
    )  # fmt: skip
    indptr = torch.zeros(rows + 1, dtype=torch.int32, device=device)
    indptr[1:] = row_tokens.cumsum(dim=0)
    indices = torch.empty(rows * max_seq_len, dtype=torch.int32, device=device)
    _write_rows_kernel[(rows, triton.cdiv(max_units, write_units_per_program))](
        pool.member_slots, pool.cluster_offsets, req_to_segment, req_to_token,
        req_pool_indices, clustered_segments, listed_units, listed, token_start, indptr, indices,
        req_to_segment.stride(0), req_to_token.stride(0), num_kv_heads, max_units,
        SEGMENT=size, CLUSTERS=clusters, BLOCK_U=write_units_per_program, BLOCK_M=32,
    )  # fmt: skip
    return SelectedRows(
        indptr=indptr,
        indices=indices,
        query_head_counts=counts.reshape(batch, num_q_heads).long(),
        estimated_mass=estimated_mass.reshape(batch, num_q_heads),
    )
