"""Sparse paged decode attention over per-(request, KV head) index lists, flash-decoding style.

One row of the CSR selection is one (request, KV head) pair; its indices are flat KV rows
(slot * num_kv_heads + kv_head) of the layer's cache [num_slots, num_kv_heads, head_dim], so a
row reads each selected K/V row once for all query heads of its GQA group. Each row is split into
chunks processed by separate programs (of `split_tokens` each, or as many a row as fill the GPU,
each chunk's length computed on the device from the row's own length); a second kernel merges
the chunks by their log-sum-exp. `sparse_decode_balanced` schedules the same attention the way
FlashInfer's split-KV does: the batch's selected tokens shared evenly among a fixed number of
programs, each taking its stretch row by row. With every position of every head listed, this is
our dense paged decode.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634


def pdl_launch(pdl: bool, device: torch.device) -> dict:
    """Launch keywords for programmatic dependent launch (Hopper and later, CUDA only): the
    kernel may start while the one before it in the stream finishes, and waits for its results
    (pdl_start) before reading anything. Off the GPU, before Hopper, or off, none."""
    if not (pdl and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9):
        return {"USE_PDL": False}
    return {"USE_PDL": True, "launch_pdl": True}


@triton.jit
def pdl_start(USE_PDL: tl.constexpr):
    """A kernel's first statement where it may be launched dependently: wait until the kernel
    before it has finished and its writes are visible, then let the kernel after it start
    launching (it waits in turn)."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """Operand type of tl.dot for a cache of this dtype: the cache's own on a GPU (tensor cores,
    fp32 accumulation); float32 under TRITON_INTERPRET=1, where Triton 3.6 miscomputes tl.dot on
    bfloat16 operands (values off by 1e10 in a 16x16 product)."""
    if os.environ.get("TRITON_INTERPRET") == "1" or dtype == torch.float32:
        return tl.float32
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16


def dot_precision(dtype: torch.dtype) -> str:
    """input_precision of tl.dot: IEEE for a float32 cache (tf32 would move scores by 1e-3);
    for 16-bit operands the products are exact in fp32 anyway."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def load_group_queries(
    q_ptr,
    request,
    kv_head,
    stride_q_batch,
    stride_q_head,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """[BLOCK_H, BLOCK_D] queries of the GROUP query heads of one KV head (zero padded)."""
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    offsets = request * stride_q_batch + (kv_head * GROUP + heads)[:, None] * stride_q_head
    mask = (heads < GROUP)[:, None] & (dims < HEAD_DIM)[None, :]
    return tl.load(q_ptr + offsets + dims[None, :], mask=mask, other=0.0)


@triton.jit
def _attend_part(
    q_ptr, k_ptr, v_ptr, indices_ptr, partial_out_ptr, partial_lse_ptr, row, start, end, slot,
    scale_log2, stride_q_batch, stride_q_head, num_kv_heads,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Attention of a row's query heads over indices[start:end] (start < end), written as part
    `slot`: its normalised output [GROUP, HEAD_DIM] and base-2 log-sum-exp [GROUP]."""
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    head_mask = heads < GROUP
    dim_mask = dims < HEAD_DIM
    q = load_group_queries(
        q_ptr, row // num_kv_heads, row % num_kv_heads, stride_q_batch, stride_q_head,
        GROUP, HEAD_DIM, BLOCK_H, BLOCK_D,
    ).to(DOT_DTYPE)  # fmt: skip
    running_max = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for token_start in range(start, end, BLOCK_N):
        tokens = token_start + tl.arange(0, BLOCK_N)
        token_mask = tokens < end
        kv_rows = tl.load(indices_ptr + tokens, mask=token_mask, other=0).to(tl.int64)
        kv_offsets = kv_rows[:, None] * HEAD_DIM + dims[None, :]
        kv_mask = token_mask[:, None] & dim_mask[None, :]
        k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        # base-2 scores [BLOCK_H, BLOCK_N]; a float32 cache gets IEEE products, not tf32
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        scores = tl.where(token_mask[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        weights = tl.exp2(scores - new_max[:, None])
        rescale = tl.exp2(running_max - new_max)
        running_sum = running_sum * rescale + tl.sum(weights, axis=1)
        v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        acc = acc * rescale[:, None] + tl.dot(
            weights.to(DOT_DTYPE), v, input_precision=DOT_PRECISION
        )
        running_max = new_max
    out_offsets = (slot * GROUP + heads)[:, None] * HEAD_DIM + dims[None, :]
    tl.store(partial_out_ptr + out_offsets, acc / running_sum[:, None],
             mask=head_mask[:, None] & dim_mask[None, :])  # fmt: skip
    tl.store(partial_lse_ptr + slot * GROUP + heads, running_max + tl.log2(running_sum),
             mask=head_mask)  # fmt: skip


@triton.jit
def _merge_parts(
    partial_out_ptr, partial_lse_ptr, out_ptr, stride_out_batch, stride_out_head, num_kv_heads,
    row, head, first_slot, parts,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Merge by log-sum-exp a query head's parts at slots first_slot .. first_slot + parts - 1,
    BLOCK_S a step, into the row's output; no parts (an empty row) gives zeros."""
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    running_max = tl.full([1], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for step in range(0, parts, BLOCK_S):
        offsets = step + tl.arange(0, BLOCK_S)
        live = offsets < parts
        entry = (first_slot + offsets) * GROUP + head
        lse = tl.load(partial_lse_ptr + entry, mask=live, other=float("-inf"))
        chunks = tl.load(partial_out_ptr + entry[:, None] * HEAD_DIM + dims[None, :],
                         mask=live[:, None] & dim_mask[None, :], other=0.0)  # fmt: skip
        new_max = tl.maximum(running_max, tl.max(lse, axis=0))
        weights = tl.exp2(lse - new_max)
        rescale = tl.exp2(running_max - new_max)
        running_sum = running_sum * rescale + tl.sum(weights, axis=0)
        acc = acc * rescale + tl.sum(chunks * weights[:, None], axis=0)
        running_max = new_max
    # an empty row has nothing to attend: zeros, without dividing by its zero sum
    result = acc / tl.where(running_sum > 0, running_sum, 1.0)
    out_offsets = (
        (row // num_kv_heads) * stride_out_batch
        + ((row % num_kv_heads) * GROUP + head) * stride_out_head
        + dims
    )  # fmt: skip
    tl.store(out_ptr + out_offsets, result.to(out_ptr.dtype.element_ty), mask=dim_mask)


@triton.jit
def _chunk_tokens(row_len, max_splits, split_tokens, BLOCK_N: tl.constexpr):
    """Tokens of one chunk of a row: split_tokens where > 0, else the row's length shared out
    among max_splits programs in whole blocks of BLOCK_N (at least one block)."""
    shared = tl.maximum(tl.cdiv(tl.cdiv(row_len, max_splits), BLOCK_N), 1) * BLOCK_N
    return tl.where(split_tokens > 0, split_tokens, shared)


@triton.jit
def _partial_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    indptr_ptr,
    indices_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    scale_log2,
    stride_q_batch,
    stride_q_head,
    num_kv_heads,
    max_splits,
    split_tokens,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program (row, split): attention of the row's query heads over one chunk of its list.
    Writes the chunk's normalised output [GROUP, HEAD_DIM] and base-2 log-sum-exp [GROUP]."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    row_start = tl.load(indptr_ptr + row)
    row_end = tl.load(indptr_ptr + row + 1)
    chunk = _chunk_tokens(row_end - row_start, max_splits, split_tokens, BLOCK_N)
    chunk_start = row_start + split * chunk
    if chunk_start < row_end:
        _attend_part(
            q_ptr, k_ptr, v_ptr, indices_ptr, partial_out_ptr, partial_lse_ptr, row,
            chunk_start, tl.minimum(row_end, chunk_start + chunk), row * max_splits + split,
            scale_log2, stride_q_batch, stride_q_head, num_kv_heads,
            GROUP, HEAD_DIM, BLOCK_H, BLOCK_D, BLOCK_N, DOT_DTYPE, DOT_PRECISION,
        )  # fmt: skip


@triton.jit
def _merge_kernel(
    partial_out_ptr,
    partial_lse_ptr,
    indptr_ptr,
    out_ptr,
    stride_out_batch,
    stride_out_head,
    num_kv_heads,
    max_splits,
    split_tokens,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Program (row, query head): merge the row's chunks by log-sum-exp, BLOCK_S chunks a step
    (one step for up to BLOCK_S chunks); an empty row gives zeros."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    row_len = tl.load(indptr_ptr + row + 1) - tl.load(indptr_ptr + row)
    num_splits = tl.cdiv(row_len, _chunk_tokens(row_len, max_splits, split_tokens, BLOCK_N))
    _merge_parts(
        partial_out_ptr, partial_lse_ptr, out_ptr, stride_out_batch, stride_out_head,
        num_kv_heads, row, head, row * max_splits, num_splits, GROUP, HEAD_DIM, BLOCK_D, BLOCK_S,
    )  # fmt: skip


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (8 elsewhere: the interpreter's stand-in)."""
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


PROGRAMS_PER_MULTIPROCESSOR = 4
"""Attention programs a launch aims at per SM when it shares rows out among them."""


def _checked_rows_and_group(q, k_cache, v_cache, indptr) -> tuple[int, int]:
    """The CSR rows (batch * num_kv_heads) and the GQA group of a decode launch, after checking
    its inputs' shapes and layout (ValueError naming what is wrong)."""
    batch, num_q_heads, head_dim = q.shape
    num_slots, num_kv_heads, kv_dim = k_cache.shape
    if kv_dim != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must be [num_slots, num_kv_heads, {head_dim}], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads do not split into {num_kv_heads} groups")
    rows = batch * num_kv_heads
    if indptr.shape != (rows + 1,):
        raise ValueError(f"indptr must have batch * num_kv_heads + 1 = {rows + 1} entries")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and q.stride(2) == 1):
        raise ValueError("k_cache and v_cache must be contiguous, q contiguous in head_dim")
    return rows, num_q_heads // num_kv_heads


def sparse_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    max_row_len: int,
    split_tokens: int | None = 256,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Decode attention of q [batch, num_q_heads, head_dim] over the CSR rows (indptr [batch *
    num_kv_heads + 1], indices: flat KV rows) of k_cache / v_cache [num_slots, num_kv_heads,
    head_dim]. max_row_len bounds every row's length (host side, e.g. the longest context): it
    sizes the grid, so nothing is read back from the device. Returns [batch, num_q_heads,
    head_dim] in q's dtype, softmax scale 1/sqrt(head_dim), fp32 accumulation.
    split_tokens: chunks of that many tokens, max_row_len / split_tokens programs a row (most
    of which return at once where rows are much shorter than max_row_len); None shares each
    row out among as many programs as fill the GPU (PROGRAMS_PER_MULTIPROCESSOR a
    multiprocessor over the batch's rows, at most one a block of block_n tokens), each chunk's
    length taken on the device from the row's own length. Timed on the H100 (128k and 256k,
    benchmarks/results/decode_attention_table_64f046f_h100.json, where None was the default):
    None is 2-13% faster than the fastest fixed length at batch 1 but 5-12% slower at batch
    16, and 3.5x slower where one row is far longer than the rest (32k, batch 16, 1% needed:
    0.233 against 0.067 ms), its few programs a row left with the long row: so 256 stays the
    default here. No fixed length suits every batch (at 128k batch 16, 512 tokens beat 256 by
    a third), so the server attends its selected rows with sparse_decode_balanced; this
    schedule serves rows of one length (dense, sliding windows)."""
    rows, group = _checked_rows_and_group(q, k_cache, v_cache, indptr)
    head_dim, num_kv_heads = q.shape[-1], k_cache.shape[1]
    if split_tokens is not None and split_tokens < 1:
        raise ValueError(f"split_tokens must be None or >= 1, got {split_tokens}")
    if split_tokens is None:
        programs = _multiprocessors(q.device) * PROGRAMS_PER_MULTIPROCESSOR
        max_splits = max(1, min(triton.cdiv(max_row_len, block_n), programs // max(rows, 1)))
    else:
        max_splits = max(1, math.ceil(max_row_len / split_tokens))
    partial_out = torch.empty(
        rows * max_splits * group * head_dim, device=q.device, dtype=torch.float32
    )
    partial_lse = torch.empty(rows * max_splits * group, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    block_d = triton.next_power_of_2(head_dim)
    _partial_kernel[(rows, max_splits)](
        q,
        k_cache,
        v_cache,
        indptr,
        indices,
        partial_out,
        partial_lse,
        LOG2_E / math.sqrt(head_dim),
        q.stride(0),
        q.stride(1),
        num_kv_heads,
        max_splits,
        split_tokens or 0,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        DOT_DTYPE=dot_dtype(k_cache.dtype),
        DOT_PRECISION=dot_precision(k_cache.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    _merge_kernel[(rows, group)](
        partial_out,
        partial_lse,
        indptr,
        out,
        out.stride(0),
        out.stride(1),
        num_kv_heads,
        max_splits,
        split_tokens or 0,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        BLOCK_S=min(64, triton.next_power_of_2(max_splits)),
    )
    return out


@triton.jit
def _balanced_partial_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    indptr_ptr,
    indices_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    scale_log2,
    stride_q_batch,
    stride_q_head,
    num_kv_heads,
    rows,
    programs,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program p of `programs`: the p-th of equal stretches of the whole batch's selected
    tokens (indices[p * chunk : (p + 1) * chunk], chunk = ceil(total / programs)), row by row
    through the rows it spans; each (program, row) part is written at partial slot p + row,
    which no other pair takes (a row that reaches into a later program's stretch ends there)."""
    pdl_start(USE_PDL)
    program = tl.program_id(0)
    total = tl.load(indptr_ptr + rows)
    chunk = tl.maximum(tl.cdiv(total, programs), 1)
    start = program * chunk
    end = tl.minimum(start + chunk, total)
    if start < end:
        # the first row that ends after start: the rows ending at or before it come first
        earlier = tl.arange(0, BLOCK_R)
        ends = tl.load(indptr_ptr + 1 + earlier, mask=earlier < rows, other=0)
        row = tl.sum(((ends <= start) & (earlier < rows)).to(tl.int32), axis=0)
        row_start = tl.load(indptr_ptr + row)
        while row_start < end:  # indptr[rows] = total >= end stops it after the last row
            row_end = tl.load(indptr_ptr + row + 1)
            part_start = tl.maximum(row_start, start)
            part_end = tl.minimum(row_end, end)
            if part_start < part_end:
                _attend_part(
                    q_ptr, k_ptr, v_ptr, indices_ptr, partial_out_ptr, partial_lse_ptr, row,
                    part_start, part_end, program + row, scale_log2, stride_q_batch,
                    stride_q_head, num_kv_heads,
                    GROUP, HEAD_DIM, BLOCK_H, BLOCK_D, BLOCK_N, DOT_DTYPE, DOT_PRECISION,
                )  # fmt: skip
            row += 1
            row_start = row_end


@triton.jit
def _balanced_merge_kernel(
    partial_out_ptr,
    partial_lse_ptr,
    indptr_ptr,
    out_ptr,
    stride_out_batch,
    stride_out_head,
    num_kv_heads,
    rows,
    programs,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program (row, query head): merge the parts the row's programs wrote (slots p + row for
    the programs p whose stretches it spans) by log-sum-exp; an empty row gives zeros."""
    pdl_start(USE_PDL)
    row = tl.program_id(0)
    head = tl.program_id(1)
    chunk = tl.maximum(tl.cdiv(tl.load(indptr_ptr + rows), programs), 1)
    row_start = tl.load(indptr_ptr + row)
    row_end = tl.load(indptr_ptr + row + 1)
    first = row_start // chunk
    parts = tl.where(row_end > row_start, (row_end - 1) // chunk - first + 1, 0)
    _merge_parts(
        partial_out_ptr, partial_lse_ptr, out_ptr, stride_out_batch, stride_out_head,
        num_kv_heads, row, head, first + row, parts, GROUP, HEAD_DIM, BLOCK_D, BLOCK_S,
    )  # fmt: skip


def sparse_decode_balanced(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    programs: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    pdl: bool = False,
) -> torch.Tensor:
    """sparse_decode with the batch's selected tokens shared evenly among a fixed number of
    programs (default PROGRAMS_PER_MULTIPROCESSOR a multiprocessor), as FlashInfer's split-KV
    schedule does, each program taking its stretch row by row, so that neither one long row
    nor many short ones leave programs idle; the stretch length is read on the device from
    indptr[-1], so nothing is read back and the grid is fixed (CUDA graphs). The server's
    attention over selected rows. Timed on the H100 beside sparse_decode's 256-token chunks,
    its fastest chunk length and FlashInfer's sparse decode, same rows
    (benchmarks/results/decode_attention_table_2d3d91b_h100.json; 1 / 3 / 10 / 30% needed):
    128k batch 16 0.054 / 0.113 / 0.290 / 0.851 ms against 0.084 / 0.140 / 0.327 / 0.922
    (256-token chunks), 0.052 / 0.110 / 0.295 / 0.883 (fastest: 512) and 0.054 / 0.110 /
    0.291 / 0.857 (FlashInfer); batch 1 within 5% of the chunks either way; at 32k batch 16
    4-12% slower than the chunks at 1-10% needed. pdl: both kernels launched dependently
    (pdl_launch)."""
    rows, group = _checked_rows_and_group(q, k_cache, v_cache, indptr)
    head_dim, num_kv_heads = q.shape[-1], k_cache.shape[1]
    programs = programs or _multiprocessors(q.device) * PROGRAMS_PER_MULTIPROCESSOR
    slots = programs + rows  # a program's part of a row at slot program + row
    partial_out = torch.empty(slots * group * head_dim, device=q.device, dtype=torch.float32)
    partial_lse = torch.empty(slots * group, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    block_d = triton.next_power_of_2(head_dim)
    dependent = pdl_launch(pdl, q.device)
    _balanced_partial_kernel[(programs,)](
        q, k_cache, v_cache, indptr, indices, partial_out, partial_lse,
        LOG2_E / math.sqrt(head_dim), q.stride(0), q.stride(1), num_kv_heads, rows, programs,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_R=triton.next_power_of_2(rows),
        DOT_DTYPE=dot_dtype(k_cache.dtype), DOT_PRECISION=dot_precision(k_cache.dtype),
        num_warps=num_warps, num_stages=num_stages, **dependent,
    )  # fmt: skip
    _balanced_merge_kernel[(rows, group)](
        partial_out, partial_lse, indptr, out, out.stride(0), out.stride(1), num_kv_heads, rows,
        programs, GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_S=min(64, triton.next_power_of_2(programs)), **dependent,
    )  # fmt: skip
    return out


def sparse_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    indptr: torch.Tensor,
    indices: torch.Tensor,
) -> torch.Tensor:
    """Plain-torch float32 version of sparse_decode: the function every executor must match."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    flat_k = k_cache.reshape(-1, head_dim).float()
    flat_v = v_cache.reshape(-1, head_dim).float()
    out = torch.zeros(batch, num_q_heads, head_dim, dtype=torch.float32, device=q.device)
    bounds = indptr.tolist()
    for row in range(batch * num_kv_heads):
        rows = indices[bounds[row] : bounds[row + 1]].long()
        if rows.numel() == 0:
            continue
        request, kv_head = divmod(row, num_kv_heads)
        heads = slice(kv_head * group, (kv_head + 1) * group)
        scores = q[request, heads].float() @ flat_k[rows].T / math.sqrt(head_dim)
        out[request, heads] = torch.softmax(scores, dim=-1) @ flat_v[rows]
    return out


def dense_rows(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    num_kv_heads: int,
    max_seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR rows listing every position of every KV head (our dense baseline), built on the
    device from SGLang's req_to_token [max_reqs, max_context] without a host sync: indptr
    [batch * num_kv_heads + 1] int32, indices int32 flat KV rows. max_seq_len (host) bounds
    seq_lens and sizes the gather."""
    device = req_to_token.device
    batch = req_pool_indices.shape[0]
    positions = torch.arange(max_seq_len, device=device)
    slots = req_to_token[req_pool_indices.long()][:, :max_seq_len].long()  # [batch, max_seq_len]
    heads = torch.arange(num_kv_heads, device=device)
    flat_rows = slots[:, None, :] * num_kv_heads + heads[None, :, None]  # [batch, H_kv, len]
    lengths = seq_lens.long().repeat_interleave(num_kv_heads)
    indptr = torch.zeros(batch * num_kv_heads + 1, dtype=torch.int64, device=device)
    indptr[1:] = lengths.cumsum(0)
    # scatter each valid position to indptr[row] + position; invalid ones to a spare last entry
    capacity = batch * num_kv_heads * max_seq_len
    target = indptr[:-1].reshape(batch, num_kv_heads, 1) + positions
    valid = positions[None, None, :] < seq_lens.reshape(batch, 1, 1)
    target = torch.where(valid, target, capacity)
    indices = torch.empty(capacity + 1, dtype=torch.int32, device=device)
    indices.scatter_(0, target.flatten(), flat_rows.flatten().to(torch.int32))
    return indptr.to(torch.int32), indices
