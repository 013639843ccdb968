"""Sparse decode attention kernel against its torch reference and against tactic.sparse_attention,
under the Triton interpreter on the CPU (and on CUDA where there is one)."""

import math

import pytest
import torch
from tactic_server.kernels.decode_attention import (
    dense_rows,
    pdl_launch,
    sparse_decode,
    sparse_decode_balanced,
    sparse_decode_reference,
)

from tactic_server.tactic import plan_tactic, sparse_attention
from tactic_server.tactic.workloads import generate_workload

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_rows(generator, batch, num_kv_heads, num_slots, lengths):
    """CSR rows of flat KV rows (slot * H_kv + head) with the given lengths, slots distinct."""
    rows = []
    for row, length in enumerate(lengths):
        slots = torch.randperm(num_slots, generator=generator)[:length]
        rows.append(slots * num_kv_heads + row % num_kv_heads)
    indptr = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    indptr[1:] = torch.tensor(lengths).cumsum(0)
    return indptr, torch.cat(rows).int()


def random_batch(seed, group, head_dim, dtype, lengths, batch=3, num_kv_heads=2, num_slots=700):
    """q [batch, H_kv * group, d], K and V caches [num_slots, H_kv, d] and CSR rows of the
    given lengths, on DEVICE."""
    generator = torch.Generator().manual_seed(seed)
    indptr, indices = random_rows(generator, batch, num_kv_heads, num_slots, lengths)
    q = torch.randn(batch, num_kv_heads * group, head_dim, generator=generator).to(dtype)
    k = torch.randn(num_slots, num_kv_heads, head_dim, generator=generator).to(dtype)
    v = torch.randn(num_slots, num_kv_heads, head_dim, generator=generator).to(dtype)
    return tuple(t.to(DEVICE) for t in (q, k, v, indptr, indices))


def relative_error(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group,head_dim", [(4, 64), (1, 32), (5, 48)])
@pytest.mark.parametrize("split_tokens,block_n", [(128, 32), (None, 32), (8, 16)])
def test_sparse_decode_matches_reference(dtype, group, head_dim, split_tokens, block_n):
    """Fixed chunks (8 tokens: 88 chunks in the 700-token row, more than one merge step) and
    chunks shared out by each row's own length (split_tokens None)."""
    # lengths not multiples of the block or split sizes, an empty row and a one-token row
    q, k, v, indptr, indices = random_batch(group * 100 + head_dim, group, head_dim, dtype,
                                            [0, 1, 77, 700, 129, 300])  # fmt: skip
    out = sparse_decode(q, k, v, indptr, indices, max_row_len=700, split_tokens=split_tokens,
                        block_n=block_n)  # fmt: skip
    ref = sparse_decode_reference(q, k, v, indptr, indices)
    assert torch.isfinite(out).all()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert relative_error(out, ref) < tolerance
    # the empty row (request 0, KV head 0) gives zeros
    assert torch.equal(out[0, :group].float().cpu(), torch.zeros(group, head_dim))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group,head_dim", [(4, 64), (1, 32), (5, 48)])
@pytest.mark.parametrize("programs", [None, 1, 5, 1000])
def test_balanced_schedule_matches_reference(dtype, group, head_dim, programs):
    """The batch's tokens shared evenly among programs: one program over every row, a few
    whose stretches start and end inside rows, and more programs than pairs of tokens (a row
    then has hundreds of parts, merged over several steps); empty rows give zeros."""
    q, k, v, indptr, indices = random_batch(group * 10 + head_dim, group, head_dim, dtype,
                                            [0, 1, 77, 700, 129, 0])  # fmt: skip
    out = sparse_decode_balanced(q, k, v, indptr, indices, programs=programs, block_n=16)
    ref = sparse_decode_reference(q, k, v, indptr, indices)
    assert torch.isfinite(out).all()
    assert relative_error(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    for request, kv_head in ((0, 0), (2, 1)):  # the empty rows
        heads = slice(kv_head * group, (kv_head + 1) * group)
        assert torch.equal(out[request, heads].float().cpu(), torch.zeros(group, head_dim))


@pytest.mark.parametrize("programs", [3, 64])
def test_dependent_launches_give_the_same_attention(programs):
    """pdl=True launches both kernels dependently on a CUDA GPU (the merge may start while the
    partials finish, and waits for them): the same output, bit for bit; off CUDA the option is
    ignored (the interpreter runs each kernel to its end anyway)."""
    q, k, v, indptr, indices = random_batch(91, 4, 32, torch.float16, [0, 1, 77, 700, 129, 0])
    plain = sparse_decode_balanced(q, k, v, indptr, indices, programs=programs, block_n=16)
    dependent = sparse_decode_balanced(q, k, v, indptr, indices, programs=programs,
                                       block_n=16, pdl=True)  # fmt: skip
    assert torch.equal(dependent, plain)
    assert relative_error(dependent, sparse_decode_reference(q, k, v, indptr, indices)) < 1e-2


def test_dependent_launch_keywords_only_on_cuda_from_hopper_on(monkeypatch):
    capability = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability["value"])
    assert pdl_launch(True, torch.device("cpu")) == {"USE_PDL": False}
    assert pdl_launch(False, torch.device("cuda")) == {"USE_PDL": False}
    assert pdl_launch(True, torch.device("cuda")) == {"USE_PDL": True, "launch_pdl": True}
    capability["value"] = (8, 0)  # an A100: no griddepcontrol
    assert pdl_launch(True, torch.device("cuda")) == {"USE_PDL": False}


def test_balanced_schedule_of_an_empty_batch_writes_zeros():
    q = torch.randn(2, 4, 32).to(DEVICE)
    k = torch.randn(10, 2, 32).to(DEVICE)
    indptr = torch.zeros(5, dtype=torch.int32, device=DEVICE)
    out = sparse_decode_balanced(q, k, k, indptr, indptr[:0], programs=3, block_n=16)
    assert torch.equal(out.cpu(), torch.zeros(2, 4, 32))


def test_one_row_shared_out_among_many_programs():
    """One long row alone: split_tokens=None gives it every program the launch aims at (32
    under the interpreter's stand-in of 8 multiprocessors), each a chunk of one or two blocks."""
    generator = torch.Generator().manual_seed(11)
    q = torch.randn(1, 4, 32, generator=generator).to(DEVICE)
    k = torch.randn(900, 1, 32, generator=generator).to(DEVICE)
    v = torch.randn(900, 1, 32, generator=generator).to(DEVICE)
    indptr, indices = random_rows(generator, 1, 1, 900, [900])
    indptr, indices = indptr.to(DEVICE), indices.to(DEVICE)
    ref = sparse_decode_reference(q, k, v, indptr, indices)
    for max_row_len in (900, 100_000):  # a bound far above the row changes only the chunking
        out = sparse_decode(q, k, v, indptr, indices, max_row_len=max_row_len,
                            split_tokens=None, block_n=16)  # fmt: skip
        assert relative_error(out, ref) < 1e-5


def test_every_output_is_written():
    """The launcher allocates its output uninitialised; poison the memory it will reuse."""
    generator = torch.Generator().manual_seed(7)
    q = torch.randn(2, 8, 32, generator=generator).to(DEVICE)
    k = torch.randn(50, 2, 32, generator=generator).to(DEVICE)
    indptr, indices = random_rows(generator, 2, 2, 50, [3, 50, 1, 17])
    indptr, indices = indptr.to(DEVICE), indices.to(DEVICE)
    for _ in range(2):
        torch.full((1 << 16,), math.nan, device=DEVICE)  # leave NaN in the caching allocator
        out = sparse_decode(q, k, k, indptr, indices, max_row_len=50, split_tokens=16, block_n=16)
        assert torch.isfinite(out).all()


def test_kernel_computes_tactic_sparse_attention():
    """Rows built from a Tactic plan through req_to_token give tactic.sparse_attention."""
    workload = generate_workload(
        "needles", seq_len=1200, num_q_heads=8, num_kv_heads=2, head_dim=64
    )
    plan = plan_tactic(workload.query, workload.keys, 0.9)
    generator = torch.Generator().manual_seed(0)
    num_slots = 1500
    req_to_token = torch.randperm(num_slots, generator=generator)[:1200]
    k_cache = torch.randn(num_slots, 2, 64, generator=generator)
    v_cache = torch.randn(num_slots, 2, 64, generator=generator)
    k_cache[req_to_token], v_cache[req_to_token] = workload.keys, workload.values
    rows = [req_to_token[positions] * 2 + head for head, positions in enumerate(plan.indices)]
    indptr = torch.tensor([0, len(rows[0]), len(rows[0]) + len(rows[1])], dtype=torch.int32)
    out = sparse_decode(
        workload.query[None].to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE),
        indptr.to(DEVICE), torch.cat(rows).int().to(DEVICE), max_row_len=1200,
    )  # fmt: skip
    expected = sparse_attention(workload.query, workload.keys, workload.values, plan)
    assert relative_error(out[0].cpu(), expected) < 1e-5


def test_dense_rows_list_every_position():
    generator = torch.Generator().manual_seed(3)
    req_to_token = torch.randperm(400, generator=generator).int().reshape(4, 100)
    seq_lens = torch.tensor([100, 1, 37], dtype=torch.int32)
    pool_indices = torch.tensor([2, 0, 3])
    indptr, indices = dense_rows(
        req_to_token, pool_indices, seq_lens, num_kv_heads=3, max_seq_len=100
    )
    assert indptr.tolist() == [0, 100, 200, 300, 301, 302, 303, 340, 377, 414]
    for row in range(9):
        request, head = divmod(row, 3)
        got = indices[indptr[row] : indptr[row + 1]].long()
        slots = req_to_token[pool_indices[request], : seq_lens[request]].long()
        assert torch.equal(got, slots * 3 + head)


def test_launcher_rejects_bad_shapes():
    q = torch.randn(1, 6, 32)
    k = torch.randn(10, 4, 32)
    indptr = torch.zeros(5, dtype=torch.int32)
    with pytest.raises(ValueError, match="do not split"):
        sparse_decode(q, k, k, indptr, indptr, max_row_len=10)
    with pytest.raises(ValueError, match="indptr"):
        sparse_decode(torch.randn(1, 8, 32), k, k, indptr[:3], indptr, max_row_len=10)
    with pytest.raises(ValueError, match="split_tokens"):
        sparse_decode(torch.randn(1, 8, 32), k, k, indptr, indptr, max_row_len=10, split_tokens=0)


@pytest.mark.gpu
def test_llama_shape_on_gpu():
    """Llama-3.1-8B layer shape, bf16, a long dense row and sparse rows, on CUDA."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    num_slots, num_kv_heads = 40_000, 8
    q = torch.randn(4, 32, 128, device="cuda", dtype=torch.bfloat16, generator=generator)
    k = torch.randn(num_slots, num_kv_heads, 128, device="cuda", dtype=torch.bfloat16,
                    generator=generator)  # fmt: skip
    v = torch.randn_like(k)
    lengths = [40_000, 1, 0, 1234] * 8
    indptr, indices = random_rows(torch.Generator().manual_seed(1), 4, 8, num_slots, lengths)
    indptr, indices = indptr.cuda(), indices.cuda()
    ref = sparse_decode_reference(q, k, v, indptr, indices)
    for split_tokens in (None, 128, 256, 1024):
        out = sparse_decode(q, k, v, indptr, indices, 40_000, split_tokens=split_tokens)
        assert relative_error(out, ref) < 1e-2
    assert relative_error(sparse_decode_balanced(q, k, v, indptr, indices), ref) < 1e-2
