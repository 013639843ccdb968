"""Tactic's sparse decode attention through FlashInfer, as the Tactic paper runs it.

FlashInfer's `BatchDecodeWithPagedKVCacheWrapper` with page size 1 and one "request" per
(request, KV head) row: each row has `group` query heads and a single KV head, and its page list is
that KV head's selected tokens. Contract (shared with our Triton kernel, decode_attention.py):

- KV cache of one layer in SGLang's layout: `k_cache`, `v_cache` [num_slots, num_kv_heads,
  head_dim], bf16 or fp16, contiguous. Viewed as [num_slots * num_kv_heads, 1, 1, head_dim] it is
  an NHD paged cache with page size 1 and one KV head whose page ids are flat KV rows
  `slot * num_kv_heads + kv_head`: zero copy.
- Selection as CSR over rows r = request * num_kv_heads + kv_head: `indptr` int32 [rows + 1],
  `indices` int32 [capacity >= indptr[-1]] holding flat KV rows.
- Queries `q` [batch, num_q_heads, head_dim], num_q_heads = num_kv_heads * group, query head j
  belongs to KV head j // group, so q.view(batch * num_kv_heads, group, head_dim) has one row per
  (request, KV head).
- Output [batch, num_q_heads, head_dim] in q's dtype, softmax scale 1/sqrt(head_dim); a row with
  no selected token gives zeros.

`decode_attention.sparse_decode_reference` is the plain-torch function both executors must match.
FlashInfer is imported lazily, inside the class, so this module imports on a machine without it.
"""

from __future__ import annotations

import math

import torch

__all__ = ["FlashInferSparseDecode", "page_size_one_last_page_len"]


def page_size_one_last_page_len(indptr_host: torch.Tensor) -> torch.Tensor:
    """FlashInfer's `last_page_len` for page size 1: 1 for a non-empty row, 0 for an empty one.

    FlashInfer derives each row's KV length as clamp(num_pages - 1, min=0) * page_size +
    last_page_len (flashinfer/page.py, get_seq_lens); with page size 1 that is the row's length
    only if an empty row has last_page_len 0 (with 1 it would read one token of the next row)."""
    lengths = indptr_host[1:] - indptr_host[:-1]
    return lengths.clamp(max=1).to(torch.int32)


class FlashInferSparseDecode:
    """Sparse decode attention over per-(request, KV head) CSR index lists, run by FlashInfer.

    Usage per decode step (and per layer, when layers have different selections):
        executor.plan(indptr, indices, num_kv_heads, group, head_dim, dtype)
        out = executor.run(q, k_cache, v_cache)

    `plan` copies `indptr` to the host: FlashInfer's planner (its split-KV scheduler) runs on the
    CPU and needs the row lengths there. That is one device-to-host synchronisation per `plan`
    call, which FlashInfer imposes; `run` does no host synchronisation. Between `plan` and the
    last `run` of that plan, `indices` must stay alive and unchanged (FlashInfer keeps a reference).
    """

    def __init__(
        self,
        device: torch.device | str,
        workspace_bytes: int = 256 * 1024 * 1024,
        use_tensor_cores: bool = True,
    ) -> None:
        try:
            import flashinfer
        except ImportError as error:  # pragma: no cover - depends on the machine
            raise ImportError(
                "FlashInferSparseDecode needs flashinfer (flashinfer_python==0.6.11.post1); "
                "for the GPU machine, stage it with scripts/stage_gpu_wheels.sh, then source "
                "scripts/gpu_env.sh there"
            ) from error
        self.device = torch.device(device)
        self.use_tensor_cores = use_tensor_cores
        # FlashInfer: the float workspace "must be initialized to 0 for its first use".
        self._workspace = torch.zeros(workspace_bytes, dtype=torch.uint8, device=self.device)
        # use_tensor_cores=True runs FlashInfer's FA2 paged prefill kernel with one query per row
        # (all `group` query heads of a row in one tensor-core tile); False runs its CUDA-core
        # decode kernel, which supports group sizes 1, 2, 3, 4 and 8 only.
        self._wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace, kv_layout="NHD", use_tensor_cores=use_tensor_cores
        )
        self._rows = 0
        self._nnz = 0
        self._empty_rows: torch.Tensor | None = None
        self._num_kv_heads = 0
        self._group = 0
        self._head_dim = 0
        self._dtype: torch.dtype | None = None

    def plan(
        self,
        indptr: torch.Tensor,
        indices: torch.Tensor,
        num_kv_heads: int,
        group: int,
        head_dim: int,
        dtype: torch.dtype,
    ) -> None:
        """Plans one selection: `indptr` int32 [rows + 1], `indices` int32 flat KV rows (both on the
        device; a host `indptr` is accepted too). One host sync (FlashInfer's planner needs
        `indptr` on the host)."""
        if indptr.dtype != torch.int32 or indices.dtype != torch.int32:
            raise ValueError(
                f"indptr and indices must be int32, got {indptr.dtype}, {indices.dtype}"
            )
        if indptr.dim() != 1 or indptr.numel() < 1:
            raise ValueError("indptr must be 1-D with rows + 1 entries")
        rows = indptr.numel() - 1
        if rows % num_kv_heads != 0:
            raise ValueError(f"{rows} rows is not a multiple of num_kv_heads={num_kv_heads}")
        indptr_host = indptr.to("cpu")  # the host sync FlashInfer's plan needs
        nnz = int(indptr_host[-1])
        if nnz > indices.numel():
            raise ValueError(
                f"indptr[-1]={nnz} exceeds the capacity of indices ({indices.numel()})"
            )
        last_page_len_host = page_size_one_last_page_len(indptr_host)

        self._rows, self._nnz = rows, nnz
        self._num_kv_heads, self._group, self._head_dim, self._dtype = (
            num_kv_heads,
            group,
            head_dim,
            dtype,
        )
        # Rows with no token get zeros by a masked fill in run(); FlashInfer's kernels already
        # write 0 there (their output transform uses 1/d only where the running max is finite),
        # but that is an implementation detail, so we do not rely on it. The mask is built on the
        # device from the device indptr (no transfer); skipped when the host copy shows none.
        if rows == 0 or nnz == 0 or not bool((last_page_len_host == 0).any()):
            self._empty_rows = None
        else:
            indptr_dev = indptr.to(self.device)
            self._empty_rows = (indptr_dev[1:] == indptr_dev[:-1]).view(rows, 1, 1)
        if rows == 0 or nnz == 0:
            return  # nothing to attend to: run() returns zeros without calling FlashInfer
        # Host indptr and last_page_len: FlashInfer copies them to the device itself (a few bytes
        # per row, from pageable memory) and finds them already on the host for its planner, so
        # it does no device-to-host copy of its own. indices[:nnz] is a view (no copy).
        self._wrapper.plan(
            indptr_host,
            indices[:nnz],
            last_page_len_host,
            num_qo_heads=group,  # per row: the query heads of one KV head
            num_kv_heads=1,  # per row: its single KV head
            head_dim=head_dim,
            page_size=1,
            pos_encoding_mode="NONE",
            q_data_type=dtype,
            kv_data_type=dtype,
            sm_scale=1.0 / math.sqrt(head_dim),
        )

    def run(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of `q` [batch, num_q_heads, head_dim] over the planned selection of `k_cache`,
        `v_cache` [num_slots, num_kv_heads, head_dim]. Returns [batch, num_q_heads, head_dim] in
        q's dtype (written into `out` when given: contiguous, same shape and dtype)."""
        if self._dtype is None:
            raise RuntimeError("call plan() before run()")
        batch, num_q_heads, head_dim = q.shape
        h, g, d = self._num_kv_heads, self._group, self._head_dim
        if batch * h != self._rows or num_q_heads != h * g or head_dim != d:
            raise ValueError(
                f"q {tuple(q.shape)} does not match the plan: {self._rows} rows of "
                f"{h} KV heads x group {g}, head_dim {d}"
            )
        if k_cache.shape != v_cache.shape or k_cache.dim() != 3 or k_cache.shape[1:] != (h, d):
            raise ValueError(f"k/v cache must be [num_slots, {h}, {d}]")
        if out is None:
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
        elif out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
            raise ValueError("out must be contiguous with q's shape and dtype")
        out_rows = out.view(self._rows, g, d)
        if self._nnz == 0:
            return out.zero_()
        # [num_slots, h, d] -> pages [num_slots * h, page_size 1, 1 KV head, d]: page id = flat row.
        k_pages = k_cache.view(-1, 1, 1, d)
        v_pages = v_cache.view(-1, 1, 1, d)
        self._wrapper.run(q.reshape(self._rows, g, d), (k_pages, v_pages), out=out_rows)
        if self._empty_rows is not None:
            out_rows.masked_fill_(self._empty_rows, 0.0)
        return out
