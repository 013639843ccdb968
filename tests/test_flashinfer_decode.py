"""FlashInfer executor of Tactic's sparse decode attention and the torch reference it must match.

CPU: the reference against an independent float64 computation built from per-(request, KV head)
position lists and a req_to_token slot mapping. GPU (marked `gpu`, needs flashinfer: on the GPU
machine `source scripts/gpu_env.sh` with `.whl` carried): FlashInferSparseDecode against the
reference.
"""

import math
import sys

import pytest
import torch
from tactic_server.kernels.decode_attention import sparse_decode_reference
from tactic_server.kernels.flashinfer_decode import (
    FlashInferSparseDecode,
    page_size_one_last_page_len,
)


def make_problem(
    batch,
    num_kv_heads,
    group,
    head_dim,
    context_lens,
    row_lens,
    dtype,
    device="cpu",
    spare_slots=17,
    capacity_pad=5,
    seed=0,
):
    """A layer's KV pool with SGLang's layout and a Tactic-style selection over it.

    Each request's positions map to distinct random pool slots (req_to_token), so a request's
    slots are neither contiguous nor ordered. Row (request b, KV head h) selects row_lens[b][h]
    distinct random positions of request b. Returns the tensors and the position lists."""
    gen = torch.Generator().manual_seed(seed)
    num_slots = sum(context_lens) + spare_slots
    perm = torch.randperm(num_slots, generator=gen)
    max_len = max(context_lens)
    req_to_token = torch.full((batch, max_len), -1, dtype=torch.int64)
    offset = 0
    for b, n in enumerate(context_lens):
        req_to_token[b, :n] = perm[offset : offset + n]
        offset += n
    positions = []  # positions[b][h]: sorted list of selected positions
    indptr = [0]
    flat_rows = []
    for b in range(batch):
        per_head = []
        for h in range(num_kv_heads):
            n = row_lens[b][h]
            assert n <= context_lens[b], "a row selects distinct positions of its request"
            pos = torch.randperm(context_lens[b], generator=gen)[:n].sort().values
            per_head.append(pos.tolist())
            flat_rows.append(req_to_token[b, pos] * num_kv_heads + h)
            indptr.append(indptr[-1] + n)
        positions.append(per_head)
    nnz = indptr[-1]
    # Capacity beyond indptr[-1], filled with out-of-range rows that must never be read.
    indices = torch.full((nnz + capacity_pad,), num_slots * num_kv_heads + 123, dtype=torch.int32)
    if nnz:
        indices[:nnz] = torch.cat(flat_rows).to(torch.int32)
    num_q_heads = num_kv_heads * group
    q = torch.randn(batch, num_q_heads, head_dim, generator=gen).to(dtype)
    k_cache = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen).to(dtype)
    problem = {
        "q": q.to(device),
        "k_cache": k_cache.to(device),
        "v_cache": v_cache.to(device),
        "indptr": torch.tensor(indptr, dtype=torch.int32, device=device),
        "indices": indices.to(device),
    }
    return problem, req_to_token, positions


def float64_attention_from_positions(q, k_cache, v_cache, req_to_token, positions):
    """Independent computation: per (request, query head), gather K/V by [slot, kv_head] through
    req_to_token, exact softmax in float64 with an explicit max shift; empty selection -> 0."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    out = torch.zeros(batch, num_q_heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        for j in range(num_q_heads):
            h = j // group
            pos = positions[b][h]
            if not pos:
                continue
            slots = req_to_token[b, torch.tensor(pos, dtype=torch.int64)]
            k = k_cache[slots, h].double()
            v = v_cache[slots, h].double()
            logits = (k * q[b, j].double()).sum(-1) / math.sqrt(head_dim)
            weights = torch.exp(logits - logits.max())
            out[b, j] = (weights[:, None] * v).sum(0) / weights.sum()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_float64_from_positions(dtype):
    batch, num_kv_heads, group, head_dim = 3, 2, 3, 16
    context_lens = [40, 1, 57]
    row_lens = [[0, 13], [1, 0], [57, 1]]  # empty rows, single tokens, a whole context
    problem, req_to_token, positions = make_problem(
        batch, num_kv_heads, group, head_dim, context_lens, row_lens, dtype
    )
    out = sparse_decode_reference(**problem)
    assert out.dtype == torch.float32 and out.shape == (batch, num_kv_heads * group, head_dim)
    expected = float64_attention_from_positions(
        problem["q"], problem["k_cache"], problem["v_cache"], req_to_token, positions
    )
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    # Empty rows are exactly zero; a single selected token returns its value row.
    assert torch.all(out[0, 0:group] == 0) and torch.all(out[1, group : 2 * group] == 0)
    slot = req_to_token[1, positions[1][0][0]]
    torch.testing.assert_close(
        out[1, 0:group], problem["v_cache"][slot, 0].float().expand(group, head_dim)
    )


def test_reference_all_rows_empty():
    problem, _, _ = make_problem(2, 2, 2, 8, [5, 3], [[0, 0], [0, 0]], torch.float32)
    out = sparse_decode_reference(**problem)
    assert torch.all(out == 0)


def test_last_page_len_gives_row_lengths():
    """FlashInfer's length of a row is clamp(pages - 1, 0) * page_size + last_page_len
    (flashinfer/page.py, get_seq_lens): with page size 1 our last_page_len must give the row length,
    0 for an empty row."""
    indptr = torch.tensor([0, 0, 1, 5, 5, 4105], dtype=torch.int32)
    last = page_size_one_last_page_len(indptr)
    assert last.dtype == torch.int32 and last.tolist() == [0, 1, 1, 0, 1]
    pages = indptr[1:] - indptr[:-1]
    assert torch.equal(torch.clamp(pages - 1, min=0) * 1 + last, pages)


def test_executor_without_flashinfer_raises_import_error(monkeypatch):
    # a None entry in sys.modules makes `import flashinfer` fail, installed or not
    monkeypatch.setitem(sys.modules, "flashinfer", None)
    with pytest.raises(ImportError, match="flashinfer"):
        FlashInferSparseDecode("cpu")


def relative_error(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("use_tensor_cores", [True, False])
def test_flashinfer_matches_reference_on_cuda(use_tensor_cores):
    pytest.importorskip("flashinfer")
    device = "cuda"
    batch, num_kv_heads, group, head_dim = 3, 8, 4, 128
    context_lens = [6000, 5200, 300]
    row_lens = [
        [0, 1, 4999, 5000, 17, 0, 2048, 1],
        [5100, 0, 0, 1, 3333, 64, 5200, 129],
        [300, 1, 0, 250, 2, 0, 1, 299],
    ]
    problem, _, _ = make_problem(
        batch, num_kv_heads, group, head_dim, context_lens, row_lens, torch.bfloat16, device
    )
    executor = FlashInferSparseDecode(device, use_tensor_cores=use_tensor_cores)
    executor.plan(
        problem["indptr"], problem["indices"], num_kv_heads, group, head_dim, torch.bfloat16
    )
    q, k_cache, v_cache = problem["q"], problem["k_cache"], problem["v_cache"]
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    result = executor.run(q, k_cache, v_cache, out=out)
    assert result.data_ptr() == out.data_ptr()
    ref = sparse_decode_reference(**problem)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert not torch.isnan(out).any()
    assert relative_error(out, ref) < 1e-2
    empty = torch.tensor(row_lens, device=device).eq(0).repeat_interleave(group, dim=1)
    assert torch.all(out[empty] == 0)
    # Without `out`, and run again (a plan serves several runs, as across layers of one step).
    again = executor.run(q, k_cache, v_cache)
    assert again.data_ptr() != out.data_ptr() and not torch.isnan(again).any()
    assert relative_error(again, ref) < 1e-2

    # Re-plan the same executor for another selection (the next step; here also another pool).
    problem2, _, _ = make_problem(
        batch,
        num_kv_heads,
        group,
        head_dim,
        context_lens,
        [[4000, 0, 3, 5000, 0, 0, 1, 2], [0] * 8, [1] * 8],
        torch.bfloat16,
        device,
        seed=1,
    )
    executor.plan(
        problem2["indptr"], problem2["indices"], num_kv_heads, group, head_dim, torch.bfloat16
    )
    out2 = torch.full_like(problem2["q"], float("nan"))
    executor.run(problem2["q"], problem2["k_cache"], problem2["v_cache"], out=out2)
    ref2 = sparse_decode_reference(**problem2)
    assert not torch.isnan(out2).any()
    assert relative_error(out2, ref2) < 1e-2
    assert torch.all(out2[1] == 0)


@pytest.mark.gpu
def test_flashinfer_all_rows_empty_on_cuda():
    pytest.importorskip("flashinfer")
    problem, _, _ = make_problem(2, 8, 4, 128, [10, 10], [[0] * 8, [0] * 8], torch.bfloat16, "cuda")
    executor = FlashInferSparseDecode("cuda")
    executor.plan(problem["indptr"], problem["indices"], 8, 4, 128, torch.bfloat16)
    out = torch.full_like(problem["q"], float("nan"))
    executor.run(problem["q"], problem["k_cache"], problem["v_cache"], out=out)
    assert torch.all(out == 0)
