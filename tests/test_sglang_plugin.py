"""The SGLang plugin against SGLang's own classes (0.5.12.post1, installed by the `sglang` extra):
the entry point registers the backend and its hooks; cluster metadata lives beside a real
MHATokenToKVPool, is shared by requests whose radix prefix shares the KV slots, and is dropped
when the real allocator frees them; a decode step over the real pools (kernels under the Triton
interpreter on the CPU) equals the torch reference, Tactic and dense rows in one batch."""

import math

import pytest
import torch

sglang = pytest.importorskip("sglang")

from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: E402

from tactic_server.sglang_plugin.clusters import ClusterSide  # noqa: E402
from tactic_server.sglang_plugin.decode import TacticDecoder  # noqa: E402
from tactic_server.sglang_plugin.settings import request_target  # noqa: E402
from tactic_server.tactic import TacticConfig, build_cluster_index, plan_tactic  # noqa: E402
from tactic_server.tactic.attention import sparse_attention  # noqa: E402
from tactic_server.tactic.workloads import generate_workload  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIG = TacticConfig(segment_size=64)
HEADS, KV_HEADS, DIM, LAYERS = 8, 2, 32, 2


@pytest.fixture(scope="module", autouse=True)
def plugins():
    from sglang.srt.plugins import load_plugins

    load_plugins()


def make_pools(num_slots=1024, max_requests=4, max_context=512):
    kv = MHATokenToKVPool(num_slots, page_size=1, dtype=torch.float32, head_num=KV_HEADS,
                          head_dim=DIM, layer_num=LAYERS, device=DEVICE,
                          enable_memory_saver=False)  # fmt: skip
    requests = ReqToTokenPool(max_requests, max_context, DEVICE, enable_memory_saver=False)
    allocator = TokenToKVPoolAllocator(num_slots, torch.float32, DEVICE, kv, need_sort=False)
    side = ClusterSide(num_slots + 1, LAYERS, KV_HEADS, DIM, torch.float32, DEVICE, CONFIG,
                       max_requests)  # fmt: skip
    kv.tactic_side = side  # what the plugin's pool hook attaches
    return kv, requests, allocator, side


def fill(kv, requests, request_slot, slots, kind, seed):
    """Keys and values of a workload at these KV slots, mapped for request_slot."""
    length = slots.numel()
    workload = generate_workload(kind, length, HEADS, KV_HEADS, DIM, seed=seed)
    for layer in range(LAYERS):
        kv.k_buffer[layer][slots] = (workload.keys * (layer + 1)).to(DEVICE)
        kv.v_buffer[layer][slots] = torch.randn(length, KV_HEADS, DIM).to(DEVICE)
    requests.req_to_token[request_slot, :length] = slots.int()
    return workload.query


def test_plugin_registers_backend_and_hooks():
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES

    assert "tactic" in ATTENTION_BACKENDS and "tactic" in ATTENTION_BACKEND_CHOICES
    assert TokenToKVPoolAllocator.free.__wrapped__ is not None  # the invalidation hook


def test_request_targets_from_custom_params():
    assert request_target(None, 0.9) == 0.9
    assert request_target({"tactic_target": 0.75}, 0.9) == 0.75
    assert request_target({"tactic": {"target": 0.5}}, 0.9) == 0.5
    assert request_target({"tactic": {"enabled": False, "target": 0.5}}, 0.9) == 1.0
    assert request_target({"tactic_target": "bad"}, 0.9) == 0.9


def test_shared_prefix_reuses_clusters_and_freeing_invalidates():
    kv, requests, allocator, side = make_pools()
    first = allocator.alloc(200)
    fill(kv, requests, 0, first, "topics", seed=1)
    assert side.cluster([(0, 0, 3)], requests.req_to_token, kv.k_buffer) == 3
    # request 1 shares the first 150 slots (radix prefix), then has its own
    own = allocator.alloc(100)
    second = torch.cat([first[:150], own])
    fill(kv, requests, 1, second, "topics", seed=2)
    kv.k_buffer[0][first[:150]] = kv.k_buffer[0][first[:150]]  # shared KV is the same KV
    # segments 0 and 1 end inside the shared part: reused; segment 2 differs: clustered anew
    assert side.cluster([(1, 0, 3)], requests.req_to_token, kv.k_buffer) == 1
    cached = torch.tensor([200, 250], device=DEVICE)
    both = torch.tensor([0, 1], device=DEVICE)
    table, clustered = side.segment_table(requests.req_to_token, both, cached, 3)
    assert clustered.tolist() == [3, 3]
    assert table[0, :2].tolist() == table[1, :2].tolist() and table[0, 2] != table[1, 2]
    # the real allocator frees request 1's own slots: its third segment is gone, the rest stays
    allocator.free(own)
    both = torch.tensor([0, 1], device=DEVICE)
    table, clustered = side.segment_table(requests.req_to_token, both, cached, 3)
    assert clustered.tolist() == [3, 2]
    # ...and its metadata slot is reused once the free list runs dry
    side._free.clear()
    assert side.cluster([(1, 2, 3)], requests.req_to_token, kv.k_buffer) == 1


def test_decode_step_equals_torch_reference():
    """Three requests (two Tactic targets and one dense) in one decode step over the real pools:
    each layer's output equals plan_tactic + sparse_attention (Tactic) and softmax attention
    over every position (dense)."""
    kv, requests, allocator, side = make_pools()
    lengths, kinds, targets = [300, 190, 250], ["topics", "needles", "topics"], [0.9, 0.75, 1.0]
    queries = []
    for request, (length, kind) in enumerate(zip(lengths, kinds, strict=True)):
        slots = allocator.alloc(length)
        queries.append(fill(kv, requests, request, slots, kind, seed=request))
        side.start_request(request, targets[request])
    work = [(r, 0, (n - 1) // CONFIG.segment_size) for r, n in enumerate(lengths)]
    side.cluster(work, requests.req_to_token, kv.k_buffer)
    decoder = TacticDecoder(side, CONFIG, KV_HEADS)
    request_slots = torch.arange(3, device=DEVICE)
    seq_lens = torch.tensor(lengths, device=DEVICE)
    plan = decoder.plan(requests.req_to_token, request_slots, seq_lens, lengths, targets)
    q = torch.stack(queries).to(DEVICE)
    for layer in range(LAYERS):
        out = decoder.attend(plan, q, kv.k_buffer[layer], kv.v_buffer[layer], layer)
        for request, length in enumerate(lengths):
            slots = requests.req_to_token[request, :length].long()
            keys, values = kv.k_buffer[layer][slots], kv.v_buffer[layer][slots]
            if targets[request] < 1.0:
                clustered = (length - 1) // CONFIG.segment_size * CONFIG.segment_size
                index = build_cluster_index(keys[:clustered], CONFIG)
                index = type(index)(**{**index.__dict__, "seq_len": length})
                reference_plan = plan_tactic(q[request], keys, targets[request], index, CONFIG)
                expected = sparse_attention(q[request], keys, values, reference_plan)
            else:
                expanded = keys.repeat_interleave(HEADS // KV_HEADS, dim=1)
                scores = torch.einsum("hd,lhd->hl", q[request], expanded) / math.sqrt(DIM)
                grouped = values.repeat_interleave(HEADS // KV_HEADS, dim=1)
                expected = torch.einsum("hl,lhd->hd", scores.softmax(-1), grouped)
            torch.testing.assert_close(out[request], expected.to(out.dtype), atol=2e-4, rtol=1e-3)
    decoder.finish(plan)
    steps = side.stats[:, 3].tolist()
    assert steps[:3] == [1.0, 1.0, 0.0]  # the dense request has no Tactic statistics
    ratios = (side.stats[:2, 0] / side.stats[:2, 3]).tolist()
    assert all(0.0 < ratio < 1.0 for ratio in ratios)
