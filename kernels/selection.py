"""Tactic selection on the device for a batch of requests: score every unit (cluster or tail
position) into per-(request, KV head, query head) histograms over log mass per token, score the
densest bins exactly, walk the bins from the densest down until each query head's target is
reached, and write one CSR row of flat KV rows per (request, KV head).

It computes the same function as tactic_server.tactic.selection.plan_tactic (the reference), with
no host synchronisation: buffers are sized from host-side bounds, counts stay on the device.
Every kernel is one pass, parallel over (row, unit block) or (row, query head): the thresholds
come from histograms (a few thousand bins), not from sorting or bisecting over the units, so the
step is bounded by the bytes it reads rather than by serial passes at small batches.
Units of a request: clusters of its full segments in (segment, cluster) order, then its tail.
The histograms are summed with float atomics, in an order that varies between runs: a threshold
can differ from the reference's only where a cumulative mass equals the target to float
precision. The exact list's order varies too; what each listed cluster gets does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tactic_server.tactic.clustering import stored_variance_dims
from tactic_server.tactic.config import TacticConfig
from tactic_server.tactic.selection import FP16_MAX, MAX_RELATIVE_LOG_MASS

from .cluster_pool import ClusterPool
from .decode_attention import dot_dtype, dot_precision, load_group_queries, pdl_launch, pdl_start

FP16_LARGEST = tl.constexpr(FP16_MAX)


@triton.jit
def _score_units_kernel(
    q_ptr,
    k_ptr,
    centroids_ptr,
    variances_ptr,
    profiles_ptr,
    offsets_ptr,
    req_to_segment_ptr,
    req_to_token_ptr,
    req_pool_ptr,
    seq_lens_ptr,
    clustered_ptr,
    clustered_out_ptr,
    log_mass_ptr,
    unit_bin_ptr,
    unit_size_ptr,
    forced_ptr,
    token_cluster_ptr,
    mass_hist_ptr,
    stride_q_batch,
    stride_q_head,
    stride_req_segment,
    stride_req_token,
    num_kv_heads,
    max_units,
    scale,
    recent_window,
    sink_tokens,
    lowest_density,
    inverse_bin_width,
    bin_width,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SEGMENT: tl.constexpr,
    CLUSTERS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_F: tl.constexpr,
    ATTEND_TAIL: tl.constexpr,
    CLUSTERED_GIVEN: tl.constexpr,
    VARIANCE_DIMS: tl.constexpr,
    PROFILE: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BINS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    VARIANCE_DOT_DTYPE: tl.constexpr,
    STREAM_EVICTION: tl.constexpr,
    STORE_LOG_MASS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program (row, unit block): the density bin (unit_bin, int16) of each unit's log mass for
    each query head of the row (the log mass itself for tail positions alone), the capped
    log-normal estimate of tactic.selection (isotropic or per-dimension variances, as
    VARIANCE_DIMS is 1 or HEAD_DIM; "profile" variances, VARIANCE_DIMS 1 and PROFILE > 0: a
    scale per cluster times its segment's profile, read once a block where the block's
    clusters are one segment's, PROFILE 2, else per cluster, PROFILE 1) for clusters and the
    exact score for tail positions (-inf for padding); each unit's size; whether it holds an
    always-attended position (recent window, sinks, the tail when ATTEND_TAIL); and the
    units' share of the row's density histograms: estimated mass of the units the walk may take
    (plane 0 of mass_hist), mass of the forced ones (plane 2). One atomic per (query head,
    unit): at large batches atomics bound this kernel as much as the centroids it reads.
    STREAM_EVICTION: the L2 eviction policy of the centroid and variance tiles, read once
    ("evict_first": they do not push the histograms, whose atomics run in L2, out of it).
    STORE_LOG_MASS: every unit's log mass stored, not only the tail's (the boundary band
    re-sums the units it leaves whole)."""
    pdl_start(USE_PDL)
    row = tl.program_id(0)
    request = row // num_kv_heads
    seq_len = tl.load(seq_lens_ptr + request)
    # segments selected by cluster: the full ones (those clustered, where given) that end before
    # the recent window (tactic.selection.segments_before_recent); the later kernels read them
    # from clustered_out, so no launch before this one computes them
    clustered = tl.maximum(seq_len - recent_window, 0) // SEGMENT
    if CLUSTERED_GIVEN:
        clustered = tl.minimum(clustered, tl.load(clustered_ptr + request).to(clustered.dtype))
    if (row % num_kv_heads == 0) & (tl.program_id(1) == 0):
        tl.store(clustered_out_ptr + request, clustered)
    num_cluster_units = clustered * CLUSTERS
    tail_start = clustered * SEGMENT
    num_units = num_cluster_units + seq_len - tail_start  # _row_units, from what is loaded here
    if tl.program_id(1) * BLOCK_U >= num_units:
        return  # a block wholly beyond the row's units
    kv_head = row % num_kv_heads
    pool_index = tl.load(req_pool_ptr + request).to(tl.int64)

    units = tl.program_id(1) * BLOCK_U + tl.arange(0, BLOCK_U)
    in_range = units < max_units
    is_cluster = units < num_cluster_units
    is_tail = (units >= num_cluster_units) & (units < num_units)
    if CLUSTERS % BLOCK_U == 0:
        # the block's clusters are one segment's (and the tail starts at a block boundary):
        # one segment slot for the block instead of a gather of one per unit
        first = tl.program_id(1) * BLOCK_U
        segment_slot = tl.load(
            req_to_segment_ptr + pool_index * stride_req_segment + first // CLUSTERS,
            mask=first < num_cluster_units,
            other=0,
        ).to(tl.int64)
        local = first % CLUSTERS + tl.arange(0, BLOCK_U)
    else:
        segment_slot = tl.load(
            req_to_segment_ptr + pool_index * stride_req_segment + units // CLUSTERS,
            mask=is_cluster,
            other=0,
        ).to(tl.int64)
        local = units % CLUSTERS
    cluster_row = (segment_slot * num_kv_heads + kv_head) * CLUSTERS + local
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
        eviction_policy=STREAM_EVICTION,
    )
    q = load_group_queries(
        q_ptr, request, kv_head, stride_q_batch, stride_q_head, GROUP, HEAD_DIM, BLOCK_H, BLOCK_D
    ).to(DOT_DTYPE)
    # products of 16-bit values are exact in fp32 on tensor cores; a float32 cache gets IEEE
    # products (tf32 would move scores by 1e-3 and the selection with them). The dots need
    # 16 rows; everything after them works on the GROUP_PAD rows of real query heads only
    scores = tl.dot(q, tl.trans(centroid.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
    # the tail's keys only in the blocks that reach the tail: the others neither load them nor
    # compute their addresses (with the sink lookup below, -3% selection at 128k batch 16 on
    # the H100; the registers stayed at 128 there, though Triton's own ptxas here gives 118)
    if (tl.program_id(1) + 1) * BLOCK_U > num_cluster_units:
        key = tl.load(
            k_ptr + (kv_slot * num_kv_heads + kv_head)[:, None] * HEAD_DIM + dims[None, :],
            mask=is_tail[:, None] & dim_mask[None, :],
            other=0.0,
        )
        tail_scores = tl.dot(q, tl.trans(key.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
        scores = tl.where(is_cluster[None, :], scores, tail_scores)
    scores = _leading_rows(scores, GROUP_PAD, BLOCK_H, BLOCK_U) * scale
    heads = tl.arange(0, GROUP_PAD)
    head_mask = heads < GROUP
    q = load_group_queries(
        q_ptr, request, kv_head, stride_q_batch, stride_q_head, GROUP, HEAD_DIM, GROUP_PAD,
        BLOCK_D,
    ).to(tl.float32)  # fmt: skip
    query_norm_sq = tl.sum(q * q, axis=1)

    segment_offsets = offsets_ptr + (segment_slot * num_kv_heads + kv_head) * (CLUSTERS + 1)
    cluster_size = tl.load(segment_offsets + local + 1, mask=is_cluster, other=0) - tl.load(
        segment_offsets + local, mask=is_cluster, other=0
    )
    size = tl.where(is_cluster, cluster_size, tl.where(is_tail, 1, 0))
    if PROFILE == 2:  # sum_i q_i^2 p_i once for the block's segment, times each scale
        # (select_rows sets PROFILE 2 only where the block's clusters are one segment's, so
        # segment_slot above is the block's one)
        spread = tl.load(variances_ptr + cluster_row, mask=is_cluster, other=0.0)
        profile = tl.load(
            profiles_ptr + (segment_slot * num_kv_heads + kv_head) * HEAD_DIM + dims,
            mask=dim_mask & (first < num_cluster_units),
            other=0.0,
        ).to(tl.float32)
        weights = _variance_weights(q_ptr, request, kv_head, stride_q_batch, stride_q_head,
                                    GROUP, HEAD_DIM, GROUP_PAD, BLOCK_D).to(tl.float32)
        weighted = tl.sum(weights * profile[None, :], axis=1)
        score_variance = weighted[:, None] * spread[None, :] * (scale * scale)
    elif PROFILE == 1:  # each cluster's segment profile, as the per-dimension variances are
        spread = tl.load(variances_ptr + cluster_row, mask=is_cluster, other=0.0)
        profiles = tl.load(
            profiles_ptr + (segment_slot * num_kv_heads + kv_head)[:, None] * HEAD_DIM
            + dims[None, :],
            mask=is_cluster[:, None] & dim_mask[None, :],
            other=0.0,
        )
        weighted = _leading_rows(
            tl.dot(_variance_weights(q_ptr, request, kv_head, stride_q_batch, stride_q_head,
                                     GROUP, HEAD_DIM, BLOCK_H, BLOCK_D).to(VARIANCE_DOT_DTYPE),
                   tl.trans(profiles.to(VARIANCE_DOT_DTYPE))),
            GROUP_PAD, BLOCK_H, BLOCK_U,
        )  # fmt: skip
        score_variance = weighted * spread[None, :] * (scale * scale)
    elif VARIANCE_DIMS == 1:
        spread = tl.load(variances_ptr + cluster_row, mask=is_cluster, other=0.0)
        score_variance = query_norm_sq[:, None] * spread[None, :] * (scale * scale)
    else:  # sum_i q_i^2 var_i: a second [units, d] tile like the centroids'
        variances = tl.load(  # float8 e5m2: the top byte of fp16 values (encode_variances)
            variances_ptr + cluster_row[:, None] * HEAD_DIM + dims[None, :],
            mask=is_cluster[:, None] & dim_mask[None, :],
            other=0.0,
            eviction_policy=STREAM_EVICTION,
        ).to(tl.float16)
        # fp16 operands on tensor cores, fp32 sums (an fp32 FMA dot of this tile spilled
        # registers and took 4x the centroid scoring): a pair of e5m2 values becomes its fp16
        # operand with one byte permute, and q_i^2 is rounded as the reference rounds it (to
        # nearest, clamped into fp16's range). Under the interpreter the same fp16 values go
        # through an fp32 dot (dot_dtype), whose default tf32 products of them are exact too
        score_variance = _leading_rows(
            tl.dot(_variance_weights(q_ptr, request, kv_head, stride_q_batch, stride_q_head,
                                     GROUP, HEAD_DIM, BLOCK_H, BLOCK_D).to(VARIANCE_DOT_DTYPE),
                   tl.trans(variances.to(VARIANCE_DOT_DTYPE))),
            GROUP_PAD, BLOCK_H, BLOCK_U,
        ) * (scale * scale)  # fmt: skip
    # log-normal correction, capped at the expected largest of n normal scores (as the reference)
    log_size = tl.log(tl.maximum(size, 1).to(tl.float32))[None, :]
    ceiling = tl.sqrt(score_variance * 2.0 * log_size)
    log_mass = log_size + scores + tl.minimum(score_variance * 0.5, ceiling)
    log_mass = tl.where((size > 0)[None, :], log_mass, float("-inf"))
    stored = head_mask[:, None] & in_range[None, :]
    out = (row * GROUP + heads)[:, None] * max_units + units[None, :]
    # the later kernels compare density bins; only the tail's move between planes by value
    tl.store(log_mass_ptr + out, log_mass, mask=stored & (is_tail | STORE_LOG_MASS)[None, :])
    tl.store(unit_size_ptr + row * max_units + units, size, mask=in_range)

    # the always-attended positions: tail ones (the recent window always is: select_rows
    # leaves a segment it reaches into to the tail, as the reference does) by arithmetic, and
    # the clusters of the sinks that lie in clustered segments, looked up
    tail_position = tail_start + units - num_cluster_units
    forced = is_tail & ((tail_position < sink_tokens) | (tail_position >= seq_len - recent_window))
    # (two dependent loads, so only in the blocks that hold the sinks' segments' clusters)
    if tl.program_id(1) * BLOCK_U < tl.cdiv(sink_tokens, SEGMENT) * CLUSTERS:
        sinks = tl.arange(0, BLOCK_F)
        clustered_sink = (sinks < sink_tokens) & (sinks < tail_start)
        sink_segment = tl.load(
            req_to_segment_ptr + pool_index * stride_req_segment + sinks // SEGMENT,
            mask=clustered_sink,
            other=0,
        ).to(tl.int64)
        sink_cluster = tl.load(
            token_cluster_ptr + (sink_segment * num_kv_heads + kv_head) * SEGMENT
            + sinks % SEGMENT,
            mask=clustered_sink,
            other=0,
        )  # fmt: skip
        sink_units = tl.where(clustered_sink, (sinks // SEGMENT) * CLUSTERS + sink_cluster, -1)
        forced = forced | (
            tl.max((units[:, None] == sink_units[None, :]).to(tl.int32), axis=1) > 0
        )
    if ATTEND_TAIL:
        forced = forced | is_tail
    tl.store(forced_ptr + row * max_units + units, forced.to(tl.int8), mask=in_range)

    occupied = size > 0
    bins = _density_bin(log_mass, size[None, :], lowest_density, inverse_bin_width, BINS)
    tl.store(unit_bin_ptr + out, bins.to(tl.int16), mask=stored)
    relative = _relative_mass(log_mass, bins, lowest_density, bin_width)
    hist_row = (row * GROUP + heads)[:, None]
    candidate = stored & (occupied & ~forced)[None, :]
    tl.atomic_add(mass_hist_ptr + (hist_row * 3 + 0) * BINS + bins, relative, mask=candidate,
                  sem="relaxed")  # fmt: skip
    tl.atomic_add(mass_hist_ptr + (hist_row * 3 + 2) * BINS + bins, relative,
                  mask=stored & (occupied & forced)[None, :], sem="relaxed")  # fmt: skip


@triton.jit
def _leading_rows(tile, ROWS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_U: tl.constexpr):
    """tile[:ROWS] of a [BLOCK_H, BLOCK_U] tile (ROWS a power of two up to BLOCK_H): the rows
    of the real query heads of a dot padded to 16, so that the arithmetic after it is not done
    over the padding too (exact: each row summed with zeros)."""
    if ROWS == BLOCK_H:
        return tile
    parts = tl.reshape(tile, [BLOCK_H // ROWS, ROWS, BLOCK_U])
    first = (tl.arange(0, BLOCK_H // ROWS) == 0)[:, None, None]
    return tl.sum(tl.where(first, parts, 0.0), axis=0)


@triton.jit
def _variance_weights(q_ptr, request, kv_head, stride_q_batch, stride_q_head,
                      GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                      BLOCK_D: tl.constexpr):  # fmt: skip
    """[BLOCK_H, BLOCK_D] float16 q_i^2 of the group's queries for the tensor-core variance dot:
    rounded to nearest, clamped into fp16's range, as the reference rounds them."""
    q = load_group_queries(q_ptr, request, kv_head, stride_q_batch, stride_q_head, GROUP,
                           HEAD_DIM, BLOCK_H, BLOCK_D).to(tl.float32)  # fmt: skip
    return tl.minimum(q * q, FP16_LARGEST).to(tl.float16)


@triton.jit
def _row_units(seq_lens_ptr, clustered_ptr, request, SEGMENT: tl.constexpr,
               CLUSTERS: tl.constexpr):  # fmt: skip
    """The units a request has: the clusters of its clustered segments, then one per position
    after them. A row's units past this bound (max_units covers the longest possible tail) are
    never read: the unit-parallel kernels return at once for blocks wholly beyond it."""
    clustered = tl.load(clustered_ptr + request)
    return clustered * CLUSTERS + tl.load(seq_lens_ptr + request) - clustered * SEGMENT


RELATIVE_LOG_MASS_CAP = tl.constexpr(MAX_RELATIVE_LOG_MASS)


@triton.jit
def _density_bin(log_mass, size, lowest_density, inverse_bin_width, BINS: tl.constexpr):
    """int32 bin of log mass per token, clamped into [0, BINS) (tactic.selection.density_bin)."""
    density = log_mass - tl.log(tl.maximum(size, 1).to(tl.float32))
    bins = tl.floor((density - lowest_density) * inverse_bin_width)
    return tl.minimum(tl.maximum(bins, 0.0), BINS - 1).to(tl.int32)


@triton.jit
def _relative_mass(log_mass, bins, lowest_density, bin_width):
    """exp(log_mass - the lower edge of the bin) (tactic.selection.bin_relative_mass)."""
    edge = lowest_density + bins.to(tl.float32) * bin_width
    return tl.exp(tl.minimum(log_mass - edge, RELATIVE_LOG_MASS_CAP))


@triton.jit
def _exact_threshold_kernel(
    mass_hist_ptr,
    seq_lens_ptr,
    exact_threshold_ptr,
    num_kv_heads,
    exact_fraction,
    tokens_per_relative_mass,
    GROUP: tl.constexpr,
    BINS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program (row, query head): the first bin scored exactly, the lowest bin b such that the
    bins from b up hold at most exact_fraction * seq_len tokens (BINS: none), in one pass over
    the row's estimated-mass plane. A bin's tokens are its relative mass times
    exp(-width / 2): each unit's relative mass is its size times exp(0..width)."""
    pdl_start(USE_PDL)
    row = tl.program_id(0)
    head = tl.program_id(1)
    bins = tl.arange(0, BINS)
    tokens = tl.load(mass_hist_ptr + (row * GROUP + head) * 3 * BINS + bins)
    tokens = tokens * tokens_per_relative_mass
    at_or_above = tl.sum(tokens, axis=0) - (tl.cumsum(tokens, axis=0) - tokens)
    budget = exact_fraction * tl.load(seq_lens_ptr + row // num_kv_heads).to(tl.float32)
    threshold = tl.sum((at_or_above > budget).to(tl.int32), axis=0)
    tl.store(exact_threshold_ptr + row * GROUP + head, threshold)


@triton.jit
def _listed_block(
    unit_bin_ptr, unit_size_ptr, forced_ptr, clustered_ptr, threshold_ptr, row, row_units,
    num_kv_heads, max_units, GROUP: tl.constexpr, CLUSTERS: tl.constexpr, BINS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_U: tl.constexpr,
):  # fmt: skip
    """What the listing kernels (exact top, boundary band) read of a unit block: its units
    (in_range: the row's), the query heads and their mask and histogram rows, the row's cluster
    unit count, each head's threshold bin, each unit's size and forced flag (padding: forced)
    and its bin for each head."""
    units = tl.program_id(1) * BLOCK_U + tl.arange(0, BLOCK_U)
    in_range = units < row_units
    heads = tl.arange(0, BLOCK_H)
    head_mask = heads < GROUP
    hist_row = (row * GROUP + heads)[:, None]
    num_cluster_units = tl.load(clustered_ptr + row // num_kv_heads) * CLUSTERS
    thresholds = tl.load(threshold_ptr + row * GROUP + heads, mask=head_mask, other=BINS)
    size = tl.load(unit_size_ptr + row * max_units + units, mask=in_range, other=0)
    forced = tl.load(forced_ptr + row * max_units + units, mask=in_range, other=1) > 0
    bins = tl.load(unit_bin_ptr + hist_row * max_units + units[None, :],
                   mask=head_mask[:, None] & in_range[None, :], other=0).to(tl.int32)  # fmt: skip
    return units, in_range, heads, head_mask, hist_row, num_cluster_units, thresholds, size, \
        forced, bins


@triton.jit
def _exact_list_kernel(
    log_mass_ptr,
    unit_bin_ptr,
    unit_size_ptr,
    forced_ptr,
    clustered_ptr,
    seq_lens_ptr,
    exact_threshold_ptr,
    mass_hist_ptr,
    exact_units_ptr,
    exact_count_ptr,
    num_kv_heads,
    max_units,
    lowest_density,
    bin_width,
    GROUP: tl.constexpr,
    SEGMENT: tl.constexpr,
    CLUSTERS: tl.constexpr,
    BINS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_U: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program (row, unit block): the units whose estimated bin is at or above a query head's
    exact threshold. Clusters among them are appended to the row's list for exact scoring
    (exact_units [rows, max_units], in no particular order); tail positions are exact already
    and move to the exact plane (1) of the row's histogram at once."""
    pdl_start(USE_PDL)
    row = tl.program_id(0)
    row_units = _row_units(seq_lens_ptr, clustered_ptr, row // num_kv_heads, SEGMENT, CLUSTERS)
    if tl.program_id(1) * BLOCK_U >= row_units:
        return
    units, in_range, heads, head_mask, hist_row, num_cluster_units, thresholds, size, forced, \
        bins = _listed_block(unit_bin_ptr, unit_size_ptr, forced_ptr, clustered_ptr,
                             exact_threshold_ptr, row, row_units, num_kv_heads, max_units,
                             GROUP, CLUSTERS, BINS, BLOCK_H, BLOCK_U)  # fmt: skip
    flagged = (
        head_mask[:, None]
        & ((size > 0) & ~forced)[None, :]
        & (bins >= thresholds[:, None])
    )  # fmt: skip
    moved = flagged & (units >= num_cluster_units)[None, :]  # tail positions: log mass kept
    estimated = tl.load(log_mass_ptr + hist_row * max_units + units[None, :], mask=moved,
                        other=0.0)  # fmt: skip
    tl.atomic_add(mass_hist_ptr + (hist_row * 3 + 1) * BINS + bins,
                  _relative_mass(estimated, bins, lowest_density, bin_width),
                  mask=moved, sem="relaxed")  # fmt: skip
    wanted = ((tl.max(flagged.to(tl.int32), axis=0) > 0) & (units < num_cluster_units)).to(tl.int32)
    count = tl.sum(wanted, axis=0)
    if count > 0:
        first = tl.atomic_add(exact_count_ptr + row, count, sem="relaxed")
        slot = first + tl.cumsum(wanted, axis=0) - wanted
        tl.store(exact_units_ptr + row * max_units + slot, units, mask=wanted > 0)


@triton.jit
def _cluster_span(
    req_to_segment_ptr, offsets_ptr, pool_index, kv_head, unit, mask, stride_req_segment,
    num_kv_heads, CLUSTERS: tl.constexpr,
):  # fmt: skip
    """For cluster units (where mask): their segment row (segment slot * H_kv + kv_head), the
    first member and the member count in that segment's member list."""
    segment_slot = tl.load(
        req_to_segment_ptr + pool_index * stride_req_segment + unit // CLUSTERS, mask=mask, other=0
    ).to(tl.int64)
    segment_row = segment_slot * num_kv_heads + kv_head
    local = segment_row * (CLUSTERS + 1) + unit % CLUSTERS
    start = tl.load(offsets_ptr + local, mask=mask, other=0)
    return segment_row, start, tl.load(offsets_ptr + local + 1, mask=mask, other=0) - start


@triton.jit
def _list_program(
    q_ptr, req_pool_ptr, threshold_ptr, row, stride_q_batch, stride_q_head, num_kv_heads,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BINS: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr, GROUP_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    """What a program over a row's list of clusters (exact top, boundary band) needs first: the
    row's KV head and request pool index, its query heads (GROUP_PAD: the dot's 16 rows, or the
    group's alone, real_rows) and their mask, each head's threshold bin (BINS past the group)
    and the group's queries as the dot's operand."""
    request = row // num_kv_heads
    kv_head = row % num_kv_heads
    pool_index = tl.load(req_pool_ptr + request).to(tl.int64)
    heads = tl.arange(0, GROUP_PAD)
    head_mask = heads < GROUP
    thresholds = tl.load(threshold_ptr + row * GROUP + heads, mask=head_mask, other=BINS)
    q = load_group_queries(
        q_ptr, request, kv_head, stride_q_batch, stride_q_head, GROUP, HEAD_DIM, BLOCK_H, BLOCK_D,
    ).to(DOT_DTYPE)  # fmt: skip
    return kv_head, pool_index, heads, head_mask, thresholds, q


@triton.jit
def _listed_clusters(
    list_ptr, row, first, count, max_units, req_to_segment_ptr, offsets_ptr, pool_index, kv_head,
    stride_req_segment, num_kv_heads, BLOCK_E: tl.constexpr, CLUSTERS: tl.constexpr,
):  # fmt: skip
    """BLOCK_E entries of a row's cluster list from `first` (live: within its count): the
    clusters, and their segment rows, first members and member counts (_cluster_span)."""
    entries = first + tl.arange(0, BLOCK_E)
    live = entries < count
    unit = tl.load(list_ptr + row * max_units + entries, mask=live, other=0)
    segment_row, start, members_count = _cluster_span(
        req_to_segment_ptr, offsets_ptr, pool_index, kv_head, unit, live, stride_req_segment,
        num_kv_heads, CLUSTERS,
    )  # fmt: skip
    return unit, live, segment_row, start, members_count


@triton.jit
def _member_scores(
    q, k_ptr, member_slots_ptr, segment_row, first, member_mask, kv_head, num_kv_heads, scale,
    HEAD_DIM: tl.constexpr, SEGMENT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_PAD: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Scaled scores [GROUP_PAD, BLOCK_E, BLOCK_M] of the group's queries q [BLOCK_H, BLOCK_D]
    against BLOCK_M members of each of BLOCK_E clusters (member_mask [BLOCK_E, BLOCK_M]; the
    members from `first` [BLOCK_E] on in their segment rows' member lists), -inf off the mask:
    one [BLOCK_E * BLOCK_M, d] key tile, one dot."""
    dims = tl.arange(0, BLOCK_D)
    members = tl.arange(0, BLOCK_M)
    slots = tl.load(
        member_slots_ptr + segment_row[:, None] * SEGMENT + first[:, None] + members[None, :],
        mask=member_mask,
        other=0,
    ).to(tl.int64)  # fmt: skip
    rows_3d = (slots * num_kv_heads + kv_head)[:, :, None] * HEAD_DIM + dims[None, None, :]
    keys = tl.load(
        k_ptr + rows_3d, mask=member_mask[:, :, None] & (dims < HEAD_DIM)[None, None, :],
        other=0.0,
    ).to(DOT_DTYPE)  # fmt: skip
    keys = tl.reshape(keys, (BLOCK_E * BLOCK_M, BLOCK_D))
    scores = _leading_rows(
        tl.dot(q, tl.trans(keys), input_precision=DOT_PRECISION),
        GROUP_PAD, BLOCK_H, BLOCK_E * BLOCK_M,
    ) * scale  # fmt: skip
    scores = tl.reshape(scores, (GROUP_PAD, BLOCK_E, BLOCK_M))
    return tl.where(member_mask[None, :, :], scores, float("-inf"))


@triton.jit
def _exact_units_kernel(
    q_ptr,
    k_ptr,
    member_slots_ptr,
    offsets_ptr,
    req_to_segment_ptr,
    req_pool_ptr,
    unit_bin_ptr,
    unit_size_ptr,
    exact_threshold_ptr,
    mass_hist_ptr,
    exact_units_ptr,
    exact_count_ptr,
    stride_q_batch,
    stride_q_head,
    stride_req_segment,
    num_kv_heads,
    max_units,
    scale,
    lowest_density,
    inverse_bin_width,
    bin_width,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SEGMENT: tl.constexpr,
    CLUSTERS: tl.constexpr,
    BINS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program (row, p) of P per row: every P-th group of BLOCK_E clusters of the row's exact
    list, scored over their members (one [BLOCK_E * BLOCK_M, d] tile per step), so the work of
    a row spreads evenly over its programs; each cluster's exact log-mass replaces the estimate
    for the query heads that flagged it, and its mass goes into the exact plane."""
    pdl_start(USE_PDL)
    row = tl.program_id(0)
    programs = tl.num_programs(1)
    count = tl.load(exact_count_ptr + row)
    if tl.program_id(1) * BLOCK_E < count:
        kv_head, pool_index, heads, head_mask, thresholds, q = _list_program(
            q_ptr, req_pool_ptr, exact_threshold_ptr, row, stride_q_batch, stride_q_head,
            num_kv_heads, GROUP, HEAD_DIM, BINS, BLOCK_H, BLOCK_D, GROUP_PAD, DOT_DTYPE,
        )  # fmt: skip
        hist_row = (row * GROUP + heads)[:, None]
        members = tl.arange(0, BLOCK_M)
        for first in range(tl.program_id(1) * BLOCK_E, count, programs * BLOCK_E):
            unit, live, segment_row, start, members_count = _listed_clusters(
                exact_units_ptr, row, first, count, max_units, req_to_segment_ptr, offsets_ptr,
                pool_index, kv_head, stride_req_segment, num_kv_heads, BLOCK_E, CLUSTERS,
            )  # fmt: skip
            unit_size = tl.load(unit_size_ptr + row * max_units + unit, mask=live, other=0)
            unit_bins = tl.load(unit_bin_ptr + hist_row * max_units + unit[None, :],
                                mask=head_mask[:, None] & live[None, :], other=0)  # fmt: skip
            flags = head_mask[:, None] & live[None, :] & (unit_bins >= thresholds[:, None])
            running_max = tl.full([GROUP_PAD, BLOCK_E], float("-inf"), dtype=tl.float32)
            running_sum = tl.zeros([GROUP_PAD, BLOCK_E], dtype=tl.float32)
            for member_start in range(0, tl.max(members_count, axis=0), BLOCK_M):
                member_mask = (member_start + members)[None, :] < members_count[:, None]
                scores = _member_scores(
                    q, k_ptr, member_slots_ptr, segment_row, start + member_start, member_mask,
                    kv_head, num_kv_heads, scale, HEAD_DIM, SEGMENT, BLOCK_H, BLOCK_D, BLOCK_E,
                    BLOCK_M, GROUP_PAD, DOT_DTYPE, DOT_PRECISION,
                )  # fmt: skip
                new_max = tl.maximum(running_max, tl.max(scores, axis=2))
                safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
                running_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(
                    tl.exp(scores - safe_max[:, :, None]), axis=2
                )
                running_max = new_max
            exact = running_max + tl.log(tl.where(running_sum > 0, running_sum, 1.0))
            exact_bins = _density_bin(exact, unit_size[None, :], lowest_density,
                                      inverse_bin_width, BINS)  # fmt: skip
            tl.store(unit_bin_ptr + hist_row * max_units + unit[None, :],
                     exact_bins.to(tl.int16), mask=flags)  # fmt: skip
            tl.atomic_add(mass_hist_ptr + (hist_row * 3 + 1) * BINS + exact_bins,
                          _relative_mass(exact, exact_bins, lowest_density, bin_width),
                          mask=flags, sem="relaxed")  # fmt: skip


@triton.jit
def _walk_threshold_kernel(
    mass_hist_ptr,
    exact_threshold_ptr,
    targets_ptr,
    req_pool_ptr,
    walk_threshold_ptr,
    estimated_mass_ptr,
    band_hist_ptr,
    num_kv_heads,
    bin_width,
    GROUP: tl.constexpr,
    BINS: tl.constexpr,
    EXACT: tl.constexpr,
    BAND: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program (row, query head): the lowest bin the walk takes, so that the forced mass plus
    the bins from the densest down to it reach the request's target share of the total (BINS:
    the forced units alone reach it); and the share of the estimated mass that covers.
    EXACT: some units were scored exactly (the exact plane replaces the estimates from the
    exact threshold up; else the estimated plane is the walk's, and exact_threshold_ptr unread).
    BAND: the boundary band's second walk, over its two planes (band_hist_ptr: the units left
    whole, the split units' tokens) and the forced plane."""
    pdl_start(USE_PDL)
    row = tl.program_id(0)
    head = tl.program_id(1)
    bins = tl.arange(0, BINS)
    planes = mass_hist_ptr + (row * GROUP + head) * 3 * BINS + bins
    if BAND:
        band_planes = band_hist_ptr + (row * GROUP + head) * 2 * BINS + bins
        walk = tl.load(band_planes) + tl.load(band_planes + BINS)
    elif EXACT:
        exact_threshold = tl.load(exact_threshold_ptr + row * GROUP + head)
        walk = tl.where(bins < exact_threshold, tl.load(planes), 0.0) + tl.load(planes + BINS)
    else:
        walk = tl.load(planes)
    forced = tl.load(planes + 2 * BINS)
    top = tl.max(tl.where((walk > 0) | (forced > 0), bins, -1), axis=0)
    scale = tl.exp(tl.minimum((bins - top).to(tl.float32) * bin_width, 0.0))
    walk = walk * scale
    forced_total = tl.sum(forced * scale, axis=0)
    walk_total = tl.sum(walk, axis=0)
    total = forced_total + walk_total
    target = tl.load(targets_ptr + tl.load(req_pool_ptr + row // num_kv_heads))
    need = target * total
    covered = forced_total + (walk_total - (tl.cumsum(walk, axis=0) - walk))
    threshold = tl.maximum(tl.sum((covered >= need).to(tl.int32), axis=0) - 1, 0)
    threshold = tl.where(forced_total >= need, BINS, threshold)
    threshold = tl.where(target >= 1.0, 0, threshold)
    share = tl.where(
        threshold == BINS, forced_total, tl.sum(tl.where(bins == threshold, covered, 0.0), axis=0)
    )
    tl.store(walk_threshold_ptr + row * GROUP + head, threshold)
    tl.store(estimated_mass_ptr + row * GROUP + head, share / tl.maximum(total, 1e-38))


@triton.jit
def _flagging(bits, heads):
    """[heads, units] whether each query head flagged each unit for the band (band_heads'
    bit mask, bit h for query head h)."""
    return ((bits[None, :] >> heads[:, None]) & 1) > 0


@triton.jit
def _member_place(unit, start, SEGMENT: tl.constexpr, CLUSTERS: tl.constexpr):
    """Where a cluster's first member (`start` in its segment's member list) sits in a row's
    token_taken: segment index * SEGMENT + its place in the list."""
    return (unit // CLUSTERS) * SEGMENT + start


@triton.jit
def _band_list_kernel(
    log_mass_ptr,
    unit_bin_ptr,
    unit_size_ptr,
    forced_ptr,
    clustered_ptr,
    seq_lens_ptr,
    walk_threshold_ptr,
    band_hist_ptr,
    band_heads_ptr,
    band_units_ptr,
    band_count_ptr,
    num_kv_heads,
    max_units,
    lowest_density,
    bin_width,
    BAND_BINS: tl.constexpr,
    GROUP: tl.constexpr,
    SEGMENT: tl.constexpr,
    CLUSTERS: tl.constexpr,
    BINS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_U: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program (row, unit block), after the first walk: the boundary band of each query head,
    its candidate clusters whose bin lies within BAND_BINS of the bin where its walk stopped
    (boundary_tokens, boundary_band). Each unit's heads that flag it as a bit mask
    (band_heads [rows, max_units] int32), the flagged clusters appended to the row's list
    (band_units, band_count), and the other candidates' mass summed afresh into the band's
    plane 0 (the units the second walk takes whole; tail positions are never split: a single
    token's bin is its unit's)."""
    pdl_start(USE_PDL)
    row = tl.program_id(0)
    row_units = _row_units(seq_lens_ptr, clustered_ptr, row // num_kv_heads, SEGMENT, CLUSTERS)
    if tl.program_id(1) * BLOCK_U >= row_units:
        return
    units, in_range, heads, head_mask, hist_row, num_cluster_units, thresholds, size, forced, \
        bins = _listed_block(unit_bin_ptr, unit_size_ptr, forced_ptr, clustered_ptr,
                             walk_threshold_ptr, row, row_units, num_kv_heads, max_units,
                             GROUP, CLUSTERS, BINS, BLOCK_H, BLOCK_U)  # fmt: skip
    stored = head_mask[:, None] & in_range[None, :]
    candidate = stored & ((size > 0) & ~forced)[None, :]
    distance = tl.abs(bins - thresholds[:, None])
    flagged = candidate & (units < num_cluster_units)[None, :] & (distance <= BAND_BINS)
    whole = candidate & ~flagged
    log_mass = tl.load(log_mass_ptr + hist_row * max_units + units[None, :], mask=whole,
                       other=0.0)  # fmt: skip
    tl.atomic_add(band_hist_ptr + hist_row * 2 * BINS + bins,
                  _relative_mass(log_mass, bins, lowest_density, bin_width), mask=whole,
                  sem="relaxed")  # fmt: skip
    bits = tl.sum(flagged.to(tl.int32) << heads[:, None], axis=0)
    tl.store(band_heads_ptr + row * max_units + units, bits, mask=in_range)
    wanted = (bits != 0).to(tl.int32)
    count = tl.sum(wanted, axis=0)
    if count > 0:
        first = tl.atomic_add(band_count_ptr + row, count, sem="relaxed")
        slot = first + tl.cumsum(wanted, axis=0) - wanted
        tl.store(band_units_ptr + row * max_units + slot, units, mask=wanted > 0)


@triton.jit
def _band_tokens_kernel(
    q_ptr,
    k_ptr,
    member_slots_ptr,
    offsets_ptr,
    req_to_segment_ptr,
    req_pool_ptr,
    walk_threshold_ptr,
    band_hist_ptr,
    band_heads_ptr,
    band_units_ptr,
    band_count_ptr,
    head_tokens_ptr,
    band_taken_ptr,
    token_taken_ptr,
    member_bins_ptr,
    stride_q_batch,
    stride_q_head,
    stride_req_segment,
    num_kv_heads,
    max_units,
    max_seq_len,
    scale,
    lowest_density,
    inverse_bin_width,
    bin_width,
    TAKE: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SEGMENT: tl.constexpr,
    CLUSTERS: tl.constexpr,
    BINS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program (row, p) of P per row, over the band's listed clusters as _exact_units_kernel
    walks its list: each member scored exactly for the query heads that flagged its cluster.
    TAKE off (before the second walk): each member's mass into the band's plane 1 by its own
    density bin (as the reference's token_bins), and that bin kept for each flagging head in
    member_bins [rows, GROUP, max_seq_len] int16 (by the member's place, as token_taken). TAKE
    on (after it, walk_threshold_ptr the second walk's), reading those bins instead of the keys
    again: a member is taken where its bin reaches a flagging head's threshold;
    token_taken [rows, max_seq_len] int8 says so by its place in the row's segments (segment
    index * SEGMENT + its place in the segment's member list), band_taken [rows, max_units]
    counts each cluster's taken members, and each flagging head's own count goes into
    head_tokens."""
    pdl_start(USE_PDL)
    row = tl.program_id(0)
    programs = tl.num_programs(1)
    count = tl.load(band_count_ptr + row)
    if tl.program_id(1) * BLOCK_E < count:
        kv_head, pool_index, heads, head_mask, thresholds, q = _list_program(
            q_ptr, req_pool_ptr, walk_threshold_ptr, row, stride_q_batch, stride_q_head,
            num_kv_heads, GROUP, HEAD_DIM, BINS, BLOCK_H, BLOCK_D, GROUP_PAD, DOT_DTYPE,
        )  # fmt: skip
        hist_row = (row * GROUP + heads)[:, None, None]
        bins_row = member_bins_ptr + hist_row.to(tl.int64) * max_seq_len
        members = tl.arange(0, BLOCK_M)
        for first in range(tl.program_id(1) * BLOCK_E, count, programs * BLOCK_E):
            unit, live, segment_row, start, members_count = _listed_clusters(
                band_units_ptr, row, first, count, max_units, req_to_segment_ptr, offsets_ptr,
                pool_index, kv_head, stride_req_segment, num_kv_heads, BLOCK_E, CLUSTERS,
            )  # fmt: skip
            bits = tl.load(band_heads_ptr + row * max_units + unit, mask=live, other=0)
            flags = head_mask[:, None] & live[None, :] & _flagging(bits, heads)
            place = _member_place(unit, start, SEGMENT, CLUSTERS)
            taken_count = tl.zeros([BLOCK_E], dtype=tl.int32)
            head_count = tl.zeros([GROUP_PAD], dtype=tl.int32)
            for member_start in range(0, tl.max(members_count, axis=0), BLOCK_M):
                member_mask = (member_start + members)[None, :] < members_count[:, None]
                counted = flags[:, :, None] & member_mask[None, :, :]
                kept_bins = bins_row + (place[:, None] + member_start + members[None, :])[None]
                if TAKE:
                    token_bins = tl.load(kept_bins, mask=counted, other=0).to(tl.int32)
                    by_head = counted & (token_bins >= thresholds[:, None, None])
                    taken = tl.max(by_head.to(tl.int32), axis=0)  # [BLOCK_E, BLOCK_M]
                    tl.store(token_taken_ptr + row * max_seq_len + place[:, None] + member_start
                             + members[None, :], taken.to(tl.int8), mask=member_mask)  # fmt: skip
                    taken_count += tl.sum(taken, axis=1)
                    head_count += tl.sum(tl.sum(by_head.to(tl.int32), axis=2), axis=1)
                else:
                    scores = _member_scores(
                        q, k_ptr, member_slots_ptr, segment_row, start + member_start,
                        member_mask, kv_head, num_kv_heads, scale, HEAD_DIM, SEGMENT, BLOCK_H,
                        BLOCK_D, BLOCK_E, BLOCK_M, GROUP_PAD, DOT_DTYPE, DOT_PRECISION,
                    )  # fmt: skip
                    # a token's own bin (its size is 1: its density is its score)
                    token_bins = tl.floor((scores - lowest_density) * inverse_bin_width)
                    token_bins = tl.minimum(tl.maximum(token_bins, 0.0), BINS - 1).to(tl.int32)
                    tl.store(kept_bins, token_bins.to(tl.int16), mask=counted)
                    tl.atomic_add(band_hist_ptr + (hist_row * 2 + 1) * BINS + token_bins,
                                  _relative_mass(scores, token_bins, lowest_density, bin_width),
                                  mask=counted, sem="relaxed")  # fmt: skip
            if TAKE:
                tl.store(band_taken_ptr + row * max_units + unit, taken_count, mask=live)
                tl.atomic_add(head_tokens_ptr + row * GROUP + heads, head_count, mask=head_mask,
                              sem="relaxed")  # fmt: skip


@triton.jit
def _mark_kernel(
    unit_bin_ptr,
    unit_size_ptr,
    forced_ptr,
    walk_threshold_ptr,
    seq_lens_ptr,
    clustered_ptr,
    picked_ptr,
    block_units_ptr,
    block_tokens_ptr,
    row_tokens_ptr,
    head_tokens_ptr,
    band_heads_ptr,
    band_taken_ptr,
    num_kv_heads,
    max_units,
    num_blocks,
    GROUP: tl.constexpr,
    SEGMENT: tl.constexpr,
    CLUSTERS: tl.constexpr,
    BINS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BAND: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program (row, unit block): which units the row reads (forced, or at or above a query
    head's walk threshold), listed at the start of the block's stretch of picked [rows * blocks,
    2, BLOCK_U] (unit, then its tokens' offset in the block's part of the row, in unit order),
    their count (block_units), the block's and the row's token counts, and each query head's own
    (a block beyond the row's units counts none and writes nothing else).
    BAND: a query head that flagged a cluster (band_heads) takes it token by token, not whole;
    a cluster no head takes whole but whose members some flagging head took (band_taken of
    them) is listed as unit + max_units, for the writing kernel to copy only those."""
    pdl_start(USE_PDL)
    row = tl.program_id(0)
    block = tl.program_id(1)
    row_units = _row_units(seq_lens_ptr, clustered_ptr, row // num_kv_heads, SEGMENT, CLUSTERS)
    if block * BLOCK_U >= row_units:
        tl.store(block_tokens_ptr + row * num_blocks + block, 0)
        tl.store(block_units_ptr + row * num_blocks + block, 0)
        return
    units = block * BLOCK_U + tl.arange(0, BLOCK_U)
    in_range = units < row_units
    heads = tl.arange(0, BLOCK_H)
    head_mask = heads < GROUP
    size = tl.load(unit_size_ptr + row * max_units + units, mask=in_range, other=0)
    forced = tl.load(forced_ptr + row * max_units + units, mask=in_range, other=0) > 0
    bins = tl.load(unit_bin_ptr + (row * GROUP + heads)[:, None] * max_units + units[None, :],
                   mask=head_mask[:, None] & in_range[None, :], other=0)  # fmt: skip
    thresholds = tl.load(walk_threshold_ptr + row * GROUP + heads, mask=head_mask, other=BINS)
    by_head = (
        head_mask[:, None]
        & (size > 0)[None, :]
        & (forced[None, :] | (bins >= thresholds[:, None]))
    )  # fmt: skip
    listed = units
    if BAND:
        bits = tl.load(band_heads_ptr + row * max_units + units, mask=in_range, other=0)
        by_head = by_head & ~_flagging(bits, heads)
    selected = tl.max(by_head.to(tl.int32), axis=0) > 0
    taken = tl.where(selected, size, 0)
    if BAND:
        split = in_range & (bits != 0) & ~selected
        split_taken = tl.load(band_taken_ptr + row * max_units + units, mask=split, other=0)
        partial = split & (split_taken > 0)
        taken = tl.where(partial, split_taken, taken)
        listed = tl.where(partial, units + max_units, units)
        selected = selected | partial
    picked = selected.to(tl.int32)
    entry = picked_ptr + (row * num_blocks + block) * 2 * BLOCK_U + tl.cumsum(picked, axis=0) - 1
    tl.store(entry, listed, mask=selected)
    tl.store(entry + BLOCK_U, tl.cumsum(taken, axis=0) - taken, mask=selected)
    tl.store(block_units_ptr + row * num_blocks + block, tl.sum(picked, axis=0))
    tokens = tl.sum(taken, axis=0)
    tl.store(block_tokens_ptr + row * num_blocks + block, tokens)
    tl.atomic_add(row_tokens_ptr + row, tokens, sem="relaxed")
    tl.atomic_add(head_tokens_ptr + row * GROUP + heads,
                  tl.sum(tl.where(by_head, size[None, :], 0), axis=1), mask=head_mask,
                  sem="relaxed")  # fmt: skip


@triton.jit
def _write_rows_kernel(
    member_slots_ptr,
    offsets_ptr,
    req_to_segment_ptr,
    req_to_token_ptr,
    req_pool_ptr,
    clustered_ptr,
    unit_size_ptr,
    picked_ptr,
    block_units_ptr,
    block_tokens_ptr,
    row_tokens_ptr,
    indptr_ptr,
    indices_ptr,
    token_taken_ptr,
    stride_req_segment,
    stride_req_token,
    num_kv_heads,
    max_units,
    max_seq_len,
    num_blocks,
    SEGMENT: tl.constexpr,
    CLUSTERS: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BAND: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program (row, unit block): the CSR offsets (rows before this one, blocks before this one),
    then the KV rows (slot * H_kv + kv_head) of the block's picked units (_mark_kernel's list,
    BLOCK_E units by BLOCK_M members a step: only units read are touched) at their places in
    indices, in unit order; block 0 writes indptr[row + 1]. BAND: a unit listed as unit +
    max_units (_mark_kernel) copies only its members that token_taken marks, in member order."""
    pdl_start(USE_PDL)
    row = tl.program_id(0)
    block = tl.program_id(1)
    earlier_rows = tl.arange(0, BLOCK_R)
    row_start = tl.sum(
        tl.load(row_tokens_ptr + earlier_rows, mask=earlier_rows < row, other=0), axis=0
    )
    if block == 0:
        tl.store(indptr_ptr + row + 1, row_start + tl.load(row_tokens_ptr + row))
        if row == 0:
            tl.store(indptr_ptr, 0)
    picked_count = tl.load(block_units_ptr + row * num_blocks + block)
    if picked_count > 0:
        earlier_blocks = tl.arange(0, BLOCK_B)
        block_start = row_start + tl.sum(
            tl.load(block_tokens_ptr + row * num_blocks + earlier_blocks,
                    mask=earlier_blocks < block, other=0),
            axis=0,
        )  # fmt: skip
        request = row // num_kv_heads
        kv_head = row % num_kv_heads
        pool_index = tl.load(req_pool_ptr + request).to(tl.int64)
        clustered = tl.load(clustered_ptr + request)
        num_cluster_units = clustered * CLUSTERS
        tail_start = clustered * SEGMENT
        picked = picked_ptr + (row * num_blocks + block) * 2 * BLOCK_U
        entries = tl.arange(0, BLOCK_E)
        members = tl.arange(0, BLOCK_M)
        for first in range(0, picked_count, BLOCK_E):
            live = first + entries < picked_count
            units = tl.load(picked + first + entries, mask=live, other=0)
            destination = block_start + tl.load(picked + BLOCK_U + first + entries, mask=live,
                                                 other=0)  # fmt: skip
            if BAND:
                partial = units >= max_units
                units = tl.where(partial, units - max_units, units)
                written = tl.zeros([BLOCK_E], dtype=tl.int32)
            count = tl.load(unit_size_ptr + row * max_units + units, mask=live, other=0)
            is_cluster = live & (units < num_cluster_units)
            is_tail = live & (units >= num_cluster_units)
            segment_row, start, _ = _cluster_span(
                req_to_segment_ptr, offsets_ptr, pool_index, kv_head, units, is_cluster,
                stride_req_segment, num_kv_heads, CLUSTERS,
            )  # fmt: skip
            tail_slot = tl.load(
                req_to_token_ptr + pool_index * stride_req_token + tail_start + units
                - num_cluster_units,
                mask=is_tail,
                other=0,
            )  # fmt: skip
            for member_start in range(0, tl.max(count, axis=0), BLOCK_M):
                member_mask = (member_start + members)[None, :] < count[:, None]
                member_slot = tl.load(
                    member_slots_ptr + segment_row[:, None] * SEGMENT + start[:, None]
                    + member_start + members[None, :],
                    mask=member_mask & is_cluster[:, None],
                    other=0,
                )  # fmt: skip
                slot = tl.where(is_cluster[:, None], member_slot, tail_slot[:, None])
                if BAND:  # a partly taken cluster's taken members, packed
                    place = _member_place(units, start, SEGMENT, CLUSTERS)
                    marked = tl.load(
                        token_taken_ptr + row * max_seq_len + place[:, None] + member_start
                        + members[None, :],
                        mask=member_mask & partial[:, None],
                        other=0,
                    )  # fmt: skip
                    keep = (member_mask & (~partial[:, None] | (marked > 0))).to(tl.int32)
                    offset = written[:, None] + tl.cumsum(keep, axis=1) - keep
                    written += tl.sum(keep, axis=1)
                    tl.store(indices_ptr + destination[:, None] + offset,
                             slot * num_kv_heads + kv_head, mask=keep > 0)  # fmt: skip
                else:
                    tl.store(
                        indices_ptr + destination[:, None] + member_start + members[None, :],
                        slot * num_kv_heads + kv_head,
                        mask=member_mask,
                    )


EXACT_PROGRAMS_PER_BATCH = 2048
"""Programs that score a batch's exact clusters, shared among its rows (at least one each)."""
EXACT_SMALL_TILE_ROWS = 64
"""From this many rows (batch * H_kv) up, exact scoring steps over [8 clusters, 16 members]."""


@dataclass(frozen=True)
class SelectedRows:
    """Device-side output of a selection step.
    indptr [rows + 1] int32 and indices [capacity] int32 (flat KV rows): the CSR the attention
    executors read, rows = batch * H_kv; query_head_counts [batch, H_q] int32 tokens each query
    head selected on its own (as counted: a cast to int64 would be one more launch a layer);
    estimated_mass [batch, H_q] float32 share of the estimated mass each query head's
    selection covers."""

    indptr: torch.Tensor
    indices: torch.Tensor
    query_head_counts: torch.Tensor
    estimated_mass: torch.Tensor


def kernel_unsupported(config: TacticConfig) -> list[str]:
    """The fields of config these kernels do not compute (the torch reference,
    tactic.selection, plans them): the inverse-fit estimator, the exact top's units taken token
    by token, and the boundary band beside an exact top (the band without one they compute)."""
    band_beside_exact = config.boundary_tokens and config.exact_fraction > 0
    return [name for name, value in (("estimator", config.estimator != "lognormal"),
                                     ("exact_tokens", config.exact_tokens),
                                     ("boundary_tokens with exact_fraction", band_beside_exact))
            if value]  # fmt: skip


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
    score_units_per_program: int = 64,
    score_warps: int = 4,
    real_rows: bool = True,
    score_max_registers: int = 0,
    score_stream: bool = False,
    units_per_program: int = 128,
    light_warps: int = 1,
    write_warps: int = 2,
    exact_units_per_program: int | None = None,
    exact_members_per_step: int | None = None,
    write_units_per_step: int = 16,
    write_members_per_step: int = 16,
    pdl: bool = False,
) -> SelectedRows:
    """Tactic selection for a decode batch. q [batch, H_q, d]; k_cache [num_slots, H_kv, d];
    req_to_segment [max_reqs, max_segments] int32: each request's segment slots in the pool;
    req_pool_indices, seq_lens [batch] on the device; targets [max_reqs] float32 on the device,
    the target mass P of each request by its pool index; max_seq_len (host) bounds seq_lens.
    clustered_segments [batch]: full segments whose clusters are in the pool (default all,
    seq_lens // segment_size); a segment completed but not yet clustered (at most one) is
    scored token by token with the tail, and so is one that the recent window reaches into
    (as the reference does: recent positions are forced one by one, not through clusters).
    score_units_per_program: units one scoring program reads, score_warps: its warps (more
    share its tiles, so each thread holds fewer registers), real_rows: the scoring and exact
    scoring kernels' arithmetic after their dots on the real query heads' rows only, not on
    the dots' padding to 16 rows (the same selection; the default since it was timed: H100,
    128k, float8 centroids, scoring 183 against 217 us at batch 16, 15.1 against 19.3 at
    batch 1, exact scoring 52 against 62 and 9.2 against 10.5;
    benchmarks/results/profile_launch_options_*_h100.txt), score_max_registers: ptxas's
    register cap for the scoring kernel (Triton's maxnreg; 0: none); score_stream: the
    scoring kernel reads the centroids and variances, each read once, with L2 evict-first
    hints, so that they do not push out of L2 the histograms its atomics update (at 128k
    batch 16, 268 MB stream past 13 MB of histograms). Off: on the H100 it moved selection by
    -5 to +1.6% (scoring 169.5 against 172.9 us at 128k batch 16, the same at batch 1;
    benchmarks/results/decode_attention_table_2d3d91b_h100.json, select_ms_by_launch);
    units_per_program: units of one program of the lighter unit-parallel kernels (listing,
    marking, writing: more units per program keeps large batches from paying per-program
    latency many times over), light_warps: those kernels' warps (0: 4, 8 from 256 units a
    program). The defaults, 128 units in one
    warp, were timed against 64 units in four (H100, 128k, CUDA-event profiles of 10 steps,
    benchmarks/results/profile_launch_options_64f046f_h100.txt): at batch 16 marking 13.7
    against 29.7 us, listing 15.2 against 28.4, writing 17.5 against 18.2, the graph-replayed
    step 394 against 423 us; at batch 1 the step 65.2 against 66.2 us (writing 9.2 against
    5.3: one warp writes a long row's members slowly where few programs run); write_warps:
    the writing kernel's (0: as light_warps). Two, the default, wrote the rows in 13.2 us at
    batch 16 and 6.0 at batch 1 over 128 units a program (one warp 17.5 / 9.2, four over 64
    units 18.2 / 5.3; the same profiles; the step with this split of warps is not timed);
    exact_units_per_program, exact_members_per_step: the [clusters, members] tile of one
    exact-scoring step (a cluster of more members takes more steps); by default [8, 16] from
    64 rows (batch * H_kv) up, else [4, 32] (H100, 128k: [8, 16] 2-3% less selection at 128
    rows, 6% more at 8; benchmarks/results/selection_vs_f1ab0ac_new_0f254fa_h100.json);
    write_units_per_step, write_members_per_step: the [units, members] tile of a row writing
    step (it walks only the units a block picked); pdl: every kernel launched dependently
    (programmatic dependent launch on a Hopper GPU: a kernel's launch overlaps the end of the
    one before it: 2-3 us of batch 1's 20-35 us selection on the H100, under 1% at batch
    16, benchmarks/results/decode_attention_8k_32k_pdl_19727f1_h100.json; ignored off CUDA and
    before Hopper).

    Four launches (seven with an exact top, config.exact_fraction > 0; eight with the boundary
    band, config.boundary_tokens), each a single pass in parallel over (row, unit block),
    (row, query head) or (row, listed clusters): score every unit into per-(row, head) density
    histograms; [find the exact threshold bin; list the clusters above it; score them
    exactly;] find the walk's threshold bin; [list the clusters within the band of it, score
    their members into the band's planes, walk again, take their members;] mark the selected
    units; write the CSR rows."""
    config = config or TacticConfig()
    if unsupported := kernel_unsupported(config):
        raise ValueError(f"the selection kernels compute the log-normal estimate, whole units "
                         f"and the boundary band without an exact top: unsupported config "
                         f"{', '.join(unsupported)}")
    if config.segment_size != pool.segment_size:
        raise ValueError("config.segment_size must equal the cluster pool's segment_size")
    if (pool.variances.shape[-1], pool.profiles.shape[-1]) != stored_variance_dims(config,
                                                                                 q.shape[-1]):
        raise ValueError(f"config.variance {config.variance!r} is not what the pool keeps")
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    rows = batch * num_kv_heads
    device = q.device
    dependent = pdl_launch(pdl, device)
    exact_tile = (8, 16) if rows >= EXACT_SMALL_TILE_ROWS else (4, 32)
    exact_units_per_program = exact_units_per_program or exact_tile[0]
    exact_members_per_step = exact_members_per_step or exact_tile[1]
    size, clusters = pool.segment_size, pool.clusters_per_segment
    # clusters of the full segments, plus a tail of up to two segments (one not clustered yet)
    # and the recent window's reach into the segment before
    max_units = (max_seq_len // size) * clusters + 2 * size + config.recent_window
    num_blocks = triton.cdiv(max_units, units_per_program)
    scale = 1.0 / math.sqrt(head_dim)
    bins = config.density_bins
    binning = dict(lowest_density=config.lowest_density,
                   inverse_bin_width=1.0 / config.density_bin_width)  # fmt: skip
    block_h = max(16, triton.next_power_of_2(group))
    block_d = triton.next_power_of_2(head_dim)
    common = dict(
        GROUP=group, HEAD_DIM=head_dim, SEGMENT=size, CLUSTERS=clusters, BINS=bins,
        DOT_DTYPE=dot_dtype(k_cache.dtype),
        DOT_PRECISION=dot_precision(k_cache.dtype),
    )  # fmt: skip
    grid = (rows, num_blocks)
    unit_block = dict(BLOCK_U=units_per_program,
                      num_warps=light_warps or (8 if units_per_program >= 256 else 4))
    group_pad = triton.next_power_of_2(group)  # kernels without tl.dot need no 16-row tile

    # one zeroed workspace: mass histograms [rows, group, 3 planes (estimated, exact, forced),
    # bins] float32, then int32 counters: row tokens [rows], head tokens [rows, group], listed
    # exact clusters [rows]; and the segments each request selects by cluster [batch], which
    # the scoring kernel writes
    # (with the boundary band: its histograms [rows, group, 2 planes (units left whole, split
    # units' tokens), bins] and its listed clusters [rows] too)
    band = config.boundary_tokens
    hist_len = 3 * rows * group * bins
    band_len = 2 * rows * group * bins if band else 0
    workspace = torch.zeros(hist_len + band_len + rows * (group + 3) + batch, dtype=torch.int32,
                            device=device)  # fmt: skip
    mass_hist = workspace[:hist_len].view(torch.float32)
    band_hist = workspace[hist_len : hist_len + band_len].view(torch.float32)
    row_tokens, head_tokens, exact_count, band_count, clustered = workspace[
        hist_len + band_len :
    ].split([rows, rows * group, rows, rows, batch])

    # written for the tail only, unless the band re-sums the units it leaves whole
    log_mass = torch.empty(rows, group, max_units, device=device)
    unit_bin = torch.empty(rows, group, max_units, dtype=torch.int16, device=device)
    unit_size = torch.empty(rows, max_units, dtype=torch.int32, device=device)
    forced = torch.empty(rows, max_units, dtype=torch.int8, device=device)
    # "profile" variances: one profile a scoring block where its clusters are one segment's
    profile = 0 if pool.profiles.shape[-1] == 0 else (
        2 if clusters % score_units_per_program == 0 else 1)
    _score_units_kernel[(rows, triton.cdiv(max_units, score_units_per_program))](
        q, k_cache, pool.centroids, pool.variances, pool.profiles, pool.cluster_offsets,
        req_to_segment,
        req_to_token, req_pool_indices, seq_lens,
        seq_lens if clustered_segments is None else clustered_segments, clustered,
        log_mass, unit_bin, unit_size, forced,
        pool.token_cluster, mass_hist,
        q.stride(0), q.stride(1), req_to_segment.stride(0), req_to_token.stride(0),
        num_kv_heads, max_units, scale, config.recent_window, config.sink_tokens,
        bin_width=config.density_bin_width, **binning,
        BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_U=score_units_per_program,
        BLOCK_F=max(2, triton.next_power_of_2(config.sink_tokens)),
        ATTEND_TAIL=config.tail_policy == "attend", CLUSTERED_GIVEN=clustered_segments is not None,
        VARIANCE_DIMS=pool.variances.shape[-1], PROFILE=profile,
        GROUP_PAD=group_pad if real_rows else block_h,
        VARIANCE_DOT_DTYPE=dot_dtype(torch.float16),
        STREAM_EVICTION="evict_first" if score_stream else "", STORE_LOG_MASS=band,
        num_warps=score_warps, **common,
        **({"maxnreg": score_max_registers} if score_max_registers and q.is_cuda else {}),
        **dependent,
    )  # fmt: skip

    # the kernels that score a row's listed clusters member by member (exact top, band): a
    # fixed number of programs per row, each taking every P-th group of listed clusters
    list_programs = max(1, min(triton.cdiv(max_units, exact_units_per_program),
                               EXACT_PROGRAMS_PER_BATCH // rows))  # fmt: skip
    list_tiles = dict(
        bin_width=config.density_bin_width, **binning, BLOCK_H=block_h, BLOCK_D=block_d,
        BLOCK_E=exact_units_per_program, BLOCK_M=exact_members_per_step,
        GROUP_PAD=group_pad if real_rows else block_h, **common, **dependent,
    )  # fmt: skip
    exact_top = config.exact_fraction > 0
    if exact_top:
        exact_threshold = torch.empty(rows, group, dtype=torch.int32, device=device)
        _exact_threshold_kernel[(rows, group)](
            mass_hist, seq_lens, exact_threshold, num_kv_heads, config.exact_fraction,
            math.exp(-config.density_bin_width / 2), GROUP=group, BINS=bins, **dependent,
        )  # fmt: skip
        exact_units = torch.empty(rows, max_units, dtype=torch.int32, device=device)
        _exact_list_kernel[grid](
            log_mass, unit_bin, unit_size, forced, clustered, seq_lens, exact_threshold,
            mass_hist, exact_units, exact_count, num_kv_heads, max_units,
            lowest_density=config.lowest_density, bin_width=config.density_bin_width,
            GROUP=group, SEGMENT=size,
            CLUSTERS=clusters, BINS=bins, BLOCK_H=group_pad, **unit_block, **dependent,
        )  # fmt: skip
        _exact_units_kernel[(rows, list_programs)](
            q, k_cache, pool.member_slots, pool.cluster_offsets, req_to_segment, req_pool_indices,
            unit_bin, unit_size, exact_threshold, mass_hist, exact_units, exact_count,
            q.stride(0), q.stride(1), req_to_segment.stride(0), num_kv_heads, max_units, scale,
            **list_tiles,
        )  # fmt: skip
    else:  # nothing is scored exactly: the walk kernel (EXACT off) never reads this pointer,
        # so any tensor will do and no launch fills a threshold
        exact_threshold = mass_hist

    walk_threshold = torch.empty(rows, group, dtype=torch.int32, device=device)
    estimated_mass = torch.empty(rows, group, device=device)
    walk = dict(GROUP=group, BINS=bins, **dependent)
    _walk_threshold_kernel[(rows, group)](
        mass_hist, exact_threshold, targets, req_pool_indices, walk_threshold, estimated_mass,
        band_hist, num_kv_heads, config.density_bin_width, EXACT=exact_top, BAND=False, **walk,
    )  # fmt: skip
    # the boundary band: the clusters near each head's stopping bin split into their tokens,
    # then the walk again and the split clusters' members taken against its thresholds
    band_heads = band_taken = token_taken = walk_threshold  # unread without the band
    if band:
        band_heads = torch.empty(rows, max_units, dtype=torch.int32, device=device)
        band_units = torch.empty(rows, max_units, dtype=torch.int32, device=device)
        band_taken = torch.empty(rows, max_units, dtype=torch.int32, device=device)
        token_taken = torch.empty(rows, max_seq_len, dtype=torch.int8, device=device)
        # each flagging head's bin of each band member, by its place as token_taken: the taking
        # pass reads these instead of the members' keys (2 bytes a head, written sparsely)
        member_bins = torch.empty(rows, group, max_seq_len, dtype=torch.int16, device=device)
        _band_list_kernel[grid](
            log_mass, unit_bin, unit_size, forced, clustered, seq_lens, walk_threshold,
            band_hist, band_heads, band_units, band_count, num_kv_heads, max_units,
            lowest_density=config.lowest_density, bin_width=config.density_bin_width,
            BAND_BINS=round(config.boundary_band / config.density_bin_width), GROUP=group,
            SEGMENT=size, CLUSTERS=clusters, BINS=bins, BLOCK_H=group_pad, **unit_block,
            **dependent,
        )  # fmt: skip
        second_walk = torch.empty_like(walk_threshold)
        band_members = (
            q, k_cache, pool.member_slots, pool.cluster_offsets, req_to_segment,
            req_pool_indices, second_walk, band_hist, band_heads, band_units, band_count,
            head_tokens, band_taken, token_taken, member_bins, q.stride(0), q.stride(1),
            req_to_segment.stride(0), num_kv_heads, max_units, max_seq_len, scale,
        )  # fmt: skip
        # the members' masses into the band's token plane (second_walk not read yet) ...
        _band_tokens_kernel[(rows, list_programs)](*band_members, TAKE=False, **list_tiles)
        walk_threshold = second_walk
        _walk_threshold_kernel[(rows, group)](
            mass_hist, exact_threshold, targets, req_pool_indices, walk_threshold,
            estimated_mass, band_hist, num_kv_heads, config.density_bin_width, EXACT=False,
            BAND=True, **walk,
        )  # fmt: skip
        # ... and, after the second walk, the members it takes
        _band_tokens_kernel[(rows, list_programs)](*band_members, TAKE=True, **list_tiles)

    # each block's picked units and their token offsets, listed from the start of its stretch
    picked = torch.empty(rows * num_blocks * 2 * units_per_program, dtype=torch.int32,
                         device=device)  # fmt: skip
    block_units = torch.empty(rows, num_blocks, dtype=torch.int32, device=device)
    block_tokens = torch.empty(rows, num_blocks, dtype=torch.int32, device=device)
    _mark_kernel[grid](
        unit_bin, unit_size, forced, walk_threshold, seq_lens, clustered, picked,
        block_units, block_tokens, row_tokens, head_tokens, band_heads, band_taken,
        num_kv_heads, max_units, num_blocks, GROUP=group, SEGMENT=size, CLUSTERS=clusters,
        BINS=bins, BLOCK_H=group_pad, BAND=band, **unit_block, **dependent,
    )  # fmt: skip
    indptr = torch.empty(rows + 1, dtype=torch.int32, device=device)
    indices = torch.empty(rows * max_seq_len, dtype=torch.int32, device=device)
    _write_rows_kernel[grid](
        pool.member_slots, pool.cluster_offsets, req_to_segment, req_to_token,
        req_pool_indices, clustered, unit_size, picked, block_units, block_tokens,
        row_tokens, indptr, indices, token_taken, req_to_segment.stride(0),
        req_to_token.stride(0), num_kv_heads, max_units, max_seq_len, num_blocks,
        SEGMENT=size, CLUSTERS=clusters, BAND=band,
        BLOCK_E=write_units_per_step, BLOCK_M=write_members_per_step,
        **(unit_block | ({"num_warps": write_warps} if write_warps else {})),
        BLOCK_R=triton.next_power_of_2(rows), BLOCK_B=triton.next_power_of_2(num_blocks),
        **dependent,
    )  # fmt: skip
    return SelectedRows(
        indptr=indptr,
        indices=indices,
        query_head_counts=head_tokens.reshape(batch, num_q_heads),
        estimated_mass=estimated_mass.reshape(batch, num_q_heads),
    )
