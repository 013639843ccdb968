"""The SGLang plugin against SGLang's own classes (0.5.12.post1, installed by the `sglang` extra):
the entry point registers the backend and its hooks; cluster metadata lives beside a real
MHATokenToKVPool, is shared by requests whose radix prefix shares the KV slots, and is dropped
when the real allocator frees them; a decode step over the real pools (kernels under the Triton
interpreter on the CPU) equals the torch reference, Tactic and dense rows in one batch; the
backend decodes a hand-built ForwardBatch like SGLang's Triton backend (dense) and the reference
(Tactic), also as two tensor-parallel ranks whose statistics are combined."""

import dataclasses
import math
import os

import pytest
import torch

sglang = pytest.importorskip("sglang")

from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: E402

from tactic_server.decode import ClusterSide, TacticDecoder  # noqa: E402
from tactic_server.decode.clusters import STATS  # noqa: E402
from tactic_server.decode.cost import DecodeCostModel  # noqa: E402
from tactic_server.sglang_plugin.settings import request_target  # noqa: E402
from tactic_server.tactic import TacticConfig, build_cluster_index, plan_tactic  # noqa: E402
from tactic_server.tactic.attention import dense_attention, sparse_attention  # noqa: E402
from tactic_server.tactic.workloads import generate_workload  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIG = TacticConfig(segment_size=64)
HEADS, KV_HEADS, DIM, LAYERS = 8, 2, 32, 2


@pytest.fixture(scope="module", autouse=True)
def plugins():
    from sglang.srt.plugins import load_plugins

    load_plugins()


def make_pools(num_slots=1024, max_requests=4, max_context=512, config=CONFIG):
    kv = MHATokenToKVPool(num_slots, page_size=1, dtype=torch.float32, head_num=KV_HEADS,
                          head_dim=DIM, layer_num=LAYERS, device=DEVICE,
                          enable_memory_saver=False)  # fmt: skip
    requests = ReqToTokenPool(max_requests, max_context, DEVICE, enable_memory_saver=False)
    allocator = TokenToKVPoolAllocator(num_slots, torch.float32, DEVICE, kv, need_sort=False)
    side = ClusterSide(num_slots + 1, LAYERS, KV_HEADS, DIM, torch.float32, DEVICE, config,
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


def test_request_start_and_invalidation_write_the_device_without_host_copies():
    """What runs per request on the tactic engine, dense requests included: start_request and
    the free hook's invalidate change the device tensors as they should, and on a GPU (sync
    debug mode "error") without a copy from the host, which would wait for the stream."""
    kv, requests, allocator, side = make_pools()
    slots = allocator.alloc(200)
    fill(kv, requests, 0, slots, "topics", seed=1)
    assert side.cluster([(0, 0, 3)], requests.req_to_token, kv.k_buffer) == 3
    side.stats[2] = 5.0
    on_gpu = slots.is_cuda
    if on_gpu:
        torch.cuda.set_sync_debug_mode("error")
    try:
        side.start_request(2, 0.75)
        side.invalidate(slots[100:])  # the second and third segments end there
    finally:
        if on_gpu:
            torch.cuda.set_sync_debug_mode("default")
    assert side.targets[2].item() == 0.75 and not side.stats[2].any()
    cached = torch.tensor([200], device=DEVICE)
    _, clustered = side.segment_table(requests.req_to_token, torch.tensor([0], device=DEVICE),
                                      cached, 3)  # fmt: skip
    assert clustered.tolist() == [1]


@pytest.mark.parametrize("config", [CONFIG, TacticConfig(segment_size=64, cluster_size=8,
                                                          boundary_tokens=True,
                                                          boundary_band=0.1)])  # fmt: skip
def test_decode_step_equals_torch_reference(config):
    """Three requests (two Tactic targets and one dense) in one decode step over the real pools:
    each layer's output equals plan_tactic + sparse_attention (Tactic) and softmax attention
    over every position (dense); by default and with the boundary band."""
    kv, requests, allocator, side = make_pools(config=config)
    lengths, kinds, targets = [300, 190, 250], ["topics", "needles", "topics"], [0.9, 0.75, 1.0]
    queries = []
    for request, (length, kind) in enumerate(zip(lengths, kinds, strict=True)):
        slots = allocator.alloc(length)
        queries.append(fill(kv, requests, request, slots, kind, seed=request))
        side.start_request(request, targets[request])
    work = [(r, 0, (n - 1) // config.segment_size) for r, n in enumerate(lengths)]
    side.cluster(work, requests.req_to_token, kv.k_buffer)
    decoder = TacticDecoder(side, config, KV_HEADS)
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
                clustered = (length - 1) // config.segment_size * config.segment_size
                index = build_cluster_index(keys[:clustered], config)
                index = type(index)(**{**index.__dict__, "seq_len": length})
                reference_plan = plan_tactic(q[request], keys, targets[request], index, config)
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


def make_runner(kv, requests, allocator, heads, kv_heads, max_context=512):
    """What SGLang's ModelRunner hands an attention backend (the attributes its constructor
    reads), around the real pools of one rank: heads and kv_heads are the model's, the pools
    hold this rank's share."""
    from types import SimpleNamespace

    from sglang.srt.configs.model_config import AttentionArch

    server_args = SimpleNamespace(
        attention_backend="tactic", speculative_algorithm=None, speculative_num_draft_tokens=None,
        speculative_num_steps=None, triton_attention_num_kv_splits=8, disable_cuda_graph=True,
        chunked_prefill_size=8192, enable_deterministic_inference=False,
        triton_attention_split_tile_size=None, page_size=1, enable_hierarchical_cache=False,
        disaggregation_mode="null",
    )  # fmt: skip
    model_config = SimpleNamespace(
        attention_arch=AttentionArch.MHA, num_attention_heads=heads, head_dim=DIM,
        get_num_kv_heads=lambda tp_size: kv_heads // tp_size, v_head_dim=DIM,
        swa_v_head_dim=None, context_len=max_context, is_encoder_decoder=False,
    )  # fmt: skip
    return SimpleNamespace(
        server_args=server_args, model_config=model_config, req_to_token_pool=requests,
        token_to_kv_pool=kv, token_to_kv_pool_allocator=allocator, sliding_window_size=None,
        hybrid_gdn_config=None, kimi_linear_config=None, linear_attn_model_spec=None,
        device=DEVICE, gpu_id=0, use_mla_backend=False,
    )  # fmt: skip


LENGTHS, KINDS = [300, 190, 250], ["topics", "needles", "topics"]
CUSTOM = [{"tactic_target": 0.9}, {"tactic": {"target": 0.999}}, {"tactic": {"enabled": False}}]
TARGETS = [0.9, 0.999, 1.0]
# a Tactic graph serves batches in which every request selects
GRAPH_CUSTOM, GRAPH_TARGETS = [*CUSTOM[:2], {"tactic_target": 0.95}], [0.9, 0.999, 0.95]


# a cost model by which selection never pays: every decode batch falls back to dense
NEVER_PAYS = DecodeCostModel(dense_floor_ms=1e-3, dense_ms_per_gb=1e-3, select_floor_ms=1.0,
                             select_ms_per_row=1.0, select_ms_per_gb=1.0, attend_floor_ms=1.0,
                             attend_ms_per_gb=1.0, attend_ms_per_row=1.0)  # fmt: skip


def decode_on_rank(tp_size=1, rank=0, combine_ranks=None, graph=False, fallback=False,
                   dense_layer=None):  # fmt: skip
    """One decode ForwardBatch (three requests: P = 0.9, P = 0.999 and dense, each writing its
    new token's K/V) through the tactic backend and SGLang's own Triton backend, both built on
    the same real pools of `rank` out of `tp_size` (that rank's share of the heads). Checks the
    dense request against the torch reference and SGLang's Triton decode (tf32 products on a
    GPU), the Tactic ones against the torch reference (plan_tactic + sparse_attention);
    returns the tactic backend's per-request sums.
    graph: the tactic backend runs what its CUDA graph family records (the replay hook's
    clustering, then the forward of a capture), on SGLang's padded graph batch of 4: a padding
    row of length 1 whose stale request slot is a live request's; every request selects.
    fallback: the cost model says selecting does not pay, so every row decodes dense through
    SGLang's Triton path (and the Tactic requests count a dense-fallback step).
    dense_layer: the cost model found that layer flat (the decoder's per-layer decision, set
    here directly): the Tactic requests decode it dense, the other layers select."""
    custom, targets = (GRAPH_CUSTOM, GRAPH_TARGETS) if graph else (CUSTOM, TARGETS)
    from sglang.srt.layers.attention import triton_backend
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
    from sglang.srt.sampling.sampling_params import SamplingParams

    from tactic_server.sglang_plugin import backend as backend_module
    from tactic_server.sglang_plugin import hooks

    # one process stands for one rank: SGLang's parallel state is not initialised here
    triton_backend.get_attention_tp_size = lambda: tp_size
    backend_module.get_attention_tp_size = lambda: tp_size
    # and the statistics' all-reduce is the caller's (none: this rank's own sums)
    backend_module.tp_mean = lambda step, size: combine_ranks(step) if combine_ranks else step
    heads, kv_heads = HEADS // tp_size, KV_HEADS // tp_size
    q_share = slice(rank * heads, (rank + 1) * heads)
    kv_share = slice(rank * kv_heads, (rank + 1) * kv_heads)
    num_slots, max_requests = 1024, 4
    kv = MHATokenToKVPool(num_slots, page_size=1, dtype=torch.float32, head_num=kv_heads,
                          head_dim=DIM, layer_num=LAYERS, device=DEVICE,
                          enable_memory_saver=False)  # fmt: skip
    requests = ReqToTokenPool(max_requests, 512, DEVICE, enable_memory_saver=False)
    allocator = TokenToKVPoolAllocator(num_slots, torch.float32, DEVICE, kv, need_sort=False)
    runner = make_runner(kv, requests, allocator, HEADS, KV_HEADS)
    hooks.init_pools_around(lambda runner: None, runner)  # what the plugin's pool hook adds
    tactic = backend_module.TacticAttnBackend(runner)
    triton = triton_backend.TritonAttnBackend(runner)
    if fallback:
        tactic.decoder.cost_model = NEVER_PAYS

    reqs, queries, new_k, new_v, slots = [], [], [], [], []
    for index, (length, kind) in enumerate(zip(LENGTHS, KINDS, strict=True)):
        req = Req(f"r{index}", "", [1] * (length - 1), SamplingParams(custom_params=custom[index]))
        request_slot = requests.alloc([req])[0]  # sets req.req_pool_idx, as the scheduler does
        held = allocator.alloc(length)
        workload = generate_workload(kind, length, HEADS, KV_HEADS, DIM, seed=index)
        keys = workload.keys[:, kv_share]
        values = torch.randn(length, KV_HEADS, DIM, generator=torch.Generator().manual_seed(index))
        values = values[:, kv_share]
        for layer in range(LAYERS):  # the context; the new token's K/V come with the batch
            kv.k_buffer[layer][held[:-1]] = (keys[:-1] * (layer + 1)).to(DEVICE)
            kv.v_buffer[layer][held[:-1]] = values[:-1].to(DEVICE)
        requests.req_to_token[request_slot, :length] = held.int()
        reqs.append(req)
        queries.append(workload.query[q_share])
        new_k.append(keys[-1])
        new_v.append(values[-1])
        slots.append(held)
    request_slots = torch.tensor([r.req_pool_idx for r in reqs], device=DEVICE)
    seq_lens = torch.tensor(LENGTHS, device=DEVICE)
    layers = [RadixAttention(heads, DIM, DIM**-0.5, kv_heads, layer_id=i) for i in range(LAYERS)]

    def decode_batch(backend, rows=3):
        cache_loc = torch.stack([s[-1] for s in slots]).to(DEVICE)
        if rows == 3:
            return ForwardBatch(
                forward_mode=ForwardMode.DECODE, batch_size=3,
                input_ids=torch.zeros(3, dtype=torch.long), req_pool_indices=request_slots,
                seq_lens=seq_lens, out_cache_loc=cache_loc, seq_lens_sum=sum(LENGTHS),
                seq_lens_cpu=seq_lens.cpu(), req_to_token_pool=requests, token_to_kv_pool=kv,
                attn_backend=backend,
            )  # fmt: skip
        padded_lens = torch.cat([seq_lens, torch.ones(1, dtype=seq_lens.dtype, device=DEVICE)])
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE, batch_size=4,
            input_ids=torch.zeros(4, dtype=torch.long),
            req_pool_indices=torch.cat([request_slots, request_slots[:1]]), seq_lens=padded_lens,
            out_cache_loc=torch.cat([cache_loc, torch.zeros_like(cache_loc[:1])]),
            seq_lens_sum=sum(LENGTHS) + 1, seq_lens_cpu=padded_lens.cpu(),
            req_to_token_pool=requests, token_to_kv_pool=kv, attn_backend=backend,
        )  # fmt: skip

    outputs = {}
    for name, backend in (("triton", triton), ("tactic", tactic)):
        batch = decode_batch(backend)
        rows = 3
        if backend is tactic:  # the TP worker hook does this before each forward
            tactic.admit(reqs, ForwardMode.DECODE, seq_lens.cpu())
            if dense_layer is not None:
                tactic.decoder.dense_layers = frozenset({dense_layer})
        if backend is tactic and graph:
            rows = 4
            tactic.graph_family = "tactic"
            tactic.graph_bound = 320  # a context bound below the model's 512, above the batch
            tactic._replay_forward_batch = batch  # as SGLang's graph runner hands it over
            decode = ForwardMode.DECODE
            tactic.init_forward_metadata_replay_cuda_graph(4, None, None, sum(LENGTHS) + 1, None,
                                                           decode, None)  # fmt: skip
            tactic.init_forward_metadata_capture_cuda_graph(4, 4, None, None, None, decode, None)
            batch = decode_batch(backend, rows=4)
        else:
            backend.init_forward_metadata(batch)
        outputs[name] = []
        for layer in layers:
            k = (torch.stack(new_k) * (layer.layer_id + 1)).to(DEVICE)
            q = torch.stack(queries).to(DEVICE).reshape(3, -1)
            v = torch.stack(new_v).to(DEVICE)
            if rows == 4:  # the padding row's query and K/V (slot 0, SGLang's dummy slot)
                q, k, v = (torch.cat([x, torch.zeros_like(x[:1])]) for x in (q, k, v))
            out = backend.forward_decode(q, k, v, layer, batch)
            outputs[name].append(out.view(rows, heads, DIM)[:3])

    for layer in range(LAYERS):
        dense, sparse = outputs["triton"][layer], outputs["tactic"][layer]
        for request, target in enumerate(targets):
            length = LENGTHS[request]
            held = requests.req_to_token[reqs[request].req_pool_idx, :length].long()
            keys, values = kv.k_buffer[layer][held], kv.v_buffer[layer][held]
            if target >= 1.0 or fallback or layer == dense_layer:
                # exact against the float32 torch reference; against SGLang's Triton decode as
                # close as its products allow: its tl.dot takes a float32 cache in tf32 on a GPU
                # (10-bit mantissas, about 1e-3 relative), exact under the interpreter
                reference = dense_attention(queries[request].to(DEVICE), keys, values)
                torch.testing.assert_close(sparse[request], reference, atol=1e-5, rtol=1e-4)
                atol, rtol = (2e-3, 1e-2) if DEVICE == "cuda" else (1e-5, 1e-4)
                torch.testing.assert_close(sparse[request], dense[request], atol=atol, rtol=rtol)
                continue
            clustered = (length - 1) // CONFIG.segment_size * CONFIG.segment_size
            index = build_cluster_index(keys[:clustered], CONFIG)
            index = type(index)(**{**index.__dict__, "seq_len": length})
            query = queries[request].to(DEVICE)
            selection = plan_tactic(query, keys, target, index, CONFIG)
            reference = sparse_attention(query, keys, values, selection)
            torch.testing.assert_close(sparse[request], reference, atol=2e-4, rtol=1e-3)
    return tactic.request_stats(request_slots)  # [3, STATS] running sums, what meta_info carries


def test_backend_decode_through_a_forward_batch_against_sglangs_triton_backend(monkeypatch):
    """The dense request equals the torch reference and SGLang's Triton decode (to its tf32 on a
    GPU), the Tactic ones (P = 0.9 and 0.999) the torch reference; the statistics land in the
    requests' slots."""
    monkeypatch.setenv("TACTIC_SEGMENT_SIZE", str(CONFIG.segment_size))
    stats = decode_on_rank()
    assert stats[:, 3].tolist() == [1.0, 1.0, 0.0]  # the dense request has no Tactic steps
    assert 0.0 < stats[0, 0] < 0.9 and 0.0 < stats[1, 0] <= 1.0  # P = 0.9 left tokens out
    assert stats[0, 1] >= 0.9 - 1e-3 and stats[1, 1] >= 0.999 - 1e-4  # estimated masses


def test_dense_fallback_decodes_the_batch_through_sglangs_dense_path(monkeypatch):
    """Where the cost model says selection does not pay, the Tactic requests of the batch
    decode through SGLang's dense path (their outputs equal its Triton decode and the dense
    reference) and count a dense-fallback step: every position read, no selected ratio."""
    monkeypatch.setenv("TACTIC_SEGMENT_SIZE", str(CONFIG.segment_size))
    stats = decode_on_rank(fallback=True)
    assert stats[:, 3].tolist() == [1.0, 1.0, 0.0]  # steps: the dense request has none
    assert stats[:, 4].tolist() == [1.0, 1.0, 0.0]  # of them dense-fallback steps
    assert stats[:2, 0].tolist() == [1.0, 1.0] and stats[:2, 2].tolist() == LENGTHS[:2]
    assert stats[:, 5].tolist() == [0.0, 0.0, 0.0]  # no selecting step measured a ratio


def test_a_flat_layer_decodes_dense_beside_selecting_layers(monkeypatch):
    """The per-layer decision in an eager batch: on the flat layer the Tactic requests equal
    dense attention (the torch reference and SGLang's Triton decode), on the other layer the
    Tactic reference; each counts one dense layer-step, and its ratio is the mean of every
    position (the flat layer) and its selection."""
    from tactic_server.decode.clusters import DENSE_LAYER_STEPS

    monkeypatch.setenv("TACTIC_SEGMENT_SIZE", str(CONFIG.segment_size))
    stats = decode_on_rank(dense_layer=0)
    assert stats[:, 3].tolist() == [1.0, 1.0, 0.0] and stats[:, 4].tolist() == [0.0, 0.0, 0.0]
    assert stats[:, DENSE_LAYER_STEPS].tolist() == [1.0, 1.0, 0.0]
    assert 0.5 < stats[0, 0] < 1.0  # (1 + a selected share under 1) / 2


def test_statistics_travel_through_sglangs_per_token_path_as_numpy_rows(monkeypatch):
    """What SGLang's scheduler does with a step's statistics (maybe_collect_customized_info:
    one row per request and token), pickled as they are sent to the tokenizer process when the
    request ends: plain numpy rows, each a fraction of the bytes of a pickled torch tensor (which
    goes through torch.save per row), and the usage read from them is the running means."""
    import pickle

    import numpy as np
    from sglang.srt.layers.logits_processor import LogitsProcessorOutput
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.managers.scheduler_output_processor_mixin import (
        SchedulerOutputProcessorMixin,
    )
    from sglang.srt.sampling.sampling_params import SamplingParams

    from tactic_server.sglang_plugin.engine import tactic_usage

    monkeypatch.setenv("TACTIC_SEGMENT_SIZE", str(CONFIG.segment_size))
    stats = decode_on_rank()
    assert isinstance(stats, np.ndarray) and stats.shape == (3, STATS)
    req = Req("r0", "", [1, 2, 3], SamplingParams())
    steps = 257
    for _ in range(steps):
        output = LogitsProcessorOutput(next_token_logits=None, customized_info={"tactic": stats})
        SchedulerOutputProcessorMixin.maybe_collect_customized_info(None, 0, req, output)
    entries = req.customized_info["tactic"]
    assert len(entries) == steps and all(isinstance(e, np.ndarray) for e in entries)
    sent = pickle.dumps(entries)
    as_tensors = pickle.dumps([torch.from_numpy(e.copy()) for e in entries])
    assert 4 * len(sent) < len(as_tensors)
    usage = tactic_usage({"tactic": pickle.loads(sent)})
    assert usage.selected_ratio == pytest.approx(stats[0, 0] / stats[0, 3])
    assert usage.estimated_mass == pytest.approx(stats[0, 1] / stats[0, 3])


def test_backend_decode_as_its_cuda_graph_records_it(monkeypatch):
    """The Tactic graph family's decode (sizes from the context bound; SGLang's padded batch)
    equals the torch reference, and the padding row adds nothing to the live request whose
    slot it names: one step each."""
    monkeypatch.setenv("TACTIC_SEGMENT_SIZE", str(CONFIG.segment_size))
    stats = decode_on_rank(graph=True)
    assert stats[:, 3].tolist() == [1.0, 1.0, 1.0]
    assert 0.0 < stats[0, 0] < 0.9 and stats[0, 1] >= 0.9 - 1e-3


def _tp_rank(rank: int, tp_size: int, init_file: str, results) -> None:
    import torch.distributed as dist

    os.environ["TACTIC_SEGMENT_SIZE"] = str(CONFIG.segment_size)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=tp_size)  # fmt: skip

    def mean_over_ranks(step):
        # gloo reduces host tensors (given CUDA ones it returned garbage on the GPU machine);
        # SGLang's own group, which the backend's tp_mean uses when serving, reduces on device
        host = step.cpu()
        dist.all_reduce(host)
        return (host / tp_size).to(step.device)

    try:
        alone = decode_on_rank(tp_size, rank)  # this rank's heads only, for the reference
        combined = decode_on_rank(tp_size, rank, mean_over_ranks)
        results.put((rank, alone.tolist(), combined.tolist()))  # lists outlive the process
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_ranks_decode_their_heads_and_combine_statistics(tmp_path):
    """Two ranks of a tp 2 model (two processes over gloo), each with half the query and KV
    heads in its pools: each rank's outputs equal SGLang's Triton decode and the Tactic
    reference on its heads (selection is per KV head, so no rank needs another's keys), and
    after the statistics' all-reduce both ranks hold the mean of the two ranks' own sums."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(_tp_rank, args=(2, str(tmp_path / "init"), results), nprocs=2,
                       start_method="spawn")  # fmt: skip
    by_rank = {rank: (torch.tensor(alone), torch.tensor(combined))
               for rank, alone, combined in (results.get() for _ in range(2))}  # fmt: skip
    assert not torch.allclose(by_rank[0][0], by_rank[1][0])  # the ranks' heads differ
    mean = (by_rank[0][0] + by_rank[1][0]) / 2
    for rank in (0, 1):
        torch.testing.assert_close(by_rank[rank][1], mean)
    assert mean[:, 3].tolist() == [1.0, 1.0, 0.0]


def test_graph_families_serve_the_batches_they_were_captured_for(monkeypatch):
    """Which decode CUDA graphs a batch may replay: SGLang's own when no request selects, the
    Tactic family's of the smallest context bound that holds the batch when every one does,
    none (eager) when mixed, longer than every bound or without Tactic graphs; a Tactic replay
    runs with the backend in the Tactic family and leaves it dense after."""
    from types import SimpleNamespace

    from sglang.srt.layers.attention import triton_backend
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    from tactic_server.sglang_plugin import backend as backend_module
    from tactic_server.sglang_plugin import hooks

    monkeypatch.setenv("TACTIC_SEGMENT_SIZE", str(CONFIG.segment_size))
    for module in (triton_backend, backend_module):  # one rank, no parallel state here
        monkeypatch.setattr(module, "get_attention_tp_size", lambda: 1)
    kv = MHATokenToKVPool(256, page_size=1, dtype=torch.float32, head_num=KV_HEADS,
                          head_dim=DIM, layer_num=LAYERS, device=DEVICE,
                          enable_memory_saver=False)  # fmt: skip
    requests = ReqToTokenPool(4, 512, DEVICE, enable_memory_saver=False)
    allocator = TokenToKVPoolAllocator(256, torch.float32, DEVICE, kv, need_sort=False)
    runner = make_runner(kv, requests, allocator, HEADS, KV_HEADS)
    hooks.init_pools_around(lambda runner: None, runner)
    backend = backend_module.TacticAttnBackend(runner)

    class Graphs:  # a CudaGraphRunner that captured every batch size, as far as routing goes
        def __init__(self, bound=None):
            self.context_bound = bound
            self.replayed_in = []

        def can_run(self, forward_batch):
            return True

        def replay(self, forward_batch):
            self.replayed_in.append(backend.graph_family)
            return "logits"

    dense, short, long = Graphs(), Graphs(128), Graphs(512)
    graphs = hooks.TacticGraphRunners(dense, [short, long], backend)

    def batch(*customs, length=100):
        reqs = [Req(f"r{i}", "", [1, 2], SamplingParams(custom_params=c))
                for i, c in enumerate(customs)]  # fmt: skip
        for req in reqs:
            requests.alloc([req])
        backend.admit(reqs)
        for req in reqs:
            requests.free(req)
        return SimpleNamespace(batch_size=len(reqs),
                               seq_lens_cpu=torch.tensor([length] * len(reqs)))  # fmt: skip

    off, on = {"tactic": {"enabled": False}}, {"tactic_target": 0.9}
    forward = batch(off, off)
    assert graphs.can_run(forward) and graphs.replay(forward) == "logits"
    assert dense.replayed_in == ["dense"] and graphs.last is dense
    forward = batch(on, on)
    assert graphs.can_run(forward) and graphs.replay(forward) == "logits"
    assert short.replayed_in == ["tactic"] and backend.graph_family == "dense"
    forward = batch(on, length=300)
    assert graphs.can_run(forward) and graphs.replay(forward) == "logits"
    assert long.replayed_in == ["tactic"] and graphs.last is long
    assert not graphs.can_run(batch(on, length=600))  # beyond every bound: eager
    assert not graphs.can_run(batch(on, off))  # mixed: eager
    without = hooks.TacticGraphRunners(dense, [], backend)  # TACTIC_CUDA_GRAPH=0, or no capture
    assert not without.can_run(batch(on)) and without.can_run(batch(off))


def test_dense_fallback_decides_per_decode_batch_from_the_ratios_observed(monkeypatch):
    """The cost model's decision in admit: a decode batch of selecting requests whose last
    selected ratios (read two steps late, from the statistics the backend hands SGLang) make
    selecting too dear replays SGLang's dense graphs; a request not seen yet selects (its first
    step measures it); prefill is never a fallback; the path not taken is probed (here the
    model's prediction decides, as with tensor parallelism)."""
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.sampling.sampling_params import SamplingParams

    from tactic_server.decode.cost import MODELS
    from tactic_server.sglang_plugin import backend as backend_module
    from tactic_server.sglang_plugin import hooks

    monkeypatch.setenv("TACTIC_SEGMENT_SIZE", str(CONFIG.segment_size))
    monkeypatch.setattr(backend_module, "get_attention_tp_size", lambda: 1)
    monkeypatch.setattr("sglang.srt.layers.attention.triton_backend.get_attention_tp_size",
                        lambda: 1)  # fmt: skip
    kv, requests, allocator, _ = make_pools()
    runner = make_runner(kv, requests, allocator, HEADS, KV_HEADS)
    hooks.init_pools_around(lambda runner: None, runner)  # the plugin's cluster side
    backend = backend_module.TacticAttnBackend(runner)
    backend.decoder.cost_model = MODELS["H200"]
    backend.decoder.measured.measure = False  # the model's prediction decides (tests of the
    # measured periods: tests/test_dense_fallback.py)
    backend.decoder.bytes_per_token = 8 * 128 * 2 * 2  # a Llama-3.1-8B layer's, in bf16
    reqs = [Req(f"r{i}", "", [1, 2], SamplingParams(custom_params={"tactic_target": 0.9}))
            for i in range(2)]  # fmt: skip
    slots = requests.alloc(reqs)
    lengths = torch.tensor([131072, 131072])
    decode, extend = ForwardMode.DECODE, ForwardMode.EXTEND

    def step(ratio, mode=decode):
        backend.admit(reqs, mode, lengths)
        if not backend.batch_fallback:  # the ratio a selecting step measures
            backend.side.stats[slots, 5] = ratio
        backend.request_stats(torch.tensor(slots, device=DEVICE))
        return backend.batch_graph_family, backend.batch_fallback

    assert step(0.99) == ("tactic", False)  # not seen yet: selects
    assert step(0.99) == ("tactic", False)  # the first step's ratio is not read yet
    assert step(0.99) == ("dense", True)  # 99% of 128k selected: dense pays
    assert backend.decoder.expected_ratio[slots[0]] == pytest.approx(0.99)
    assert step(0.99, extend) == ("tactic", False)  # prefill: no decision
    paths = [step(0.02)[1] for _ in range(16)]  # the ratio moves only when a step selects
    # the 16th decision probes the other path for 3 steps; the first probe's ratio (2%) is read
    # two steps later, and then selecting pays
    assert paths[:12] == [True] * 12 and paths[12:] == [False] * 4
    assert step(0.02) == ("tactic", False)
    backend.decoder.cost_model = None  # TACTIC_DENSE_FALLBACK=off
    assert step(0.99) == ("tactic", False)


def test_dense_backend_choice(monkeypatch):
    """TACTIC_DENSE_BACKEND: auto takes triton on the CPU and for float32 caches (FlashInfer
    runs 16-bit caches on CUDA GPUs), an explicit choice is kept, anything else is refused."""
    from types import SimpleNamespace

    from tactic_server.sglang_plugin.backend import (
        TacticAttnBackend,
        dense_backend_class,
        dense_backend_name,
    )
    from tactic_server.sglang_plugin.settings import Settings

    def runner(device, dtype, head_dim=128):
        return SimpleNamespace(device=device, kv_cache_dtype=dtype,
                               model_config=SimpleNamespace(head_dim=head_dim))  # fmt: skip

    cpu = runner("cpu", torch.bfloat16)
    assert dense_backend_name("auto", cpu) == "triton"
    assert dense_backend_name("auto", runner("cuda", torch.float32)) == "triton"
    assert dense_backend_name("auto", runner("cuda", torch.bfloat16, head_dim=32)) == "triton"
    assert dense_backend_name("flashinfer", cpu) == "flashinfer"
    assert dense_backend_class("triton") is TacticAttnBackend
    with pytest.raises(ValueError, match="unknown dense backend"):
        dense_backend_class("fa4")
    if not torch.cuda.is_available():  # FA3 needs sgl-kernel's library and a GPU
        with pytest.raises(ValueError, match="TACTIC_DENSE_BACKEND=fa3, but SGLang's FA3"):
            dense_backend_class("fa3")
    monkeypatch.setenv("TACTIC_DENSE_BACKEND", "fa3")
    assert Settings.from_env().dense_backend == "fa3"
    monkeypatch.setenv("TACTIC_DENSE_BACKEND", "sdpa")
    with pytest.raises(ValueError, match="TACTIC_DENSE_BACKEND"):
        Settings.from_env()
    monkeypatch.setenv("TACTIC_DENSE_BACKEND", "triton")
    monkeypatch.setenv("TACTIC_DENSE_FALLBACK", "never")
    with pytest.raises(ValueError, match="TACTIC_DENSE_FALLBACK"):
        Settings.from_env()


def test_graph_context_bounds_from_the_environment(monkeypatch):
    from tactic_server.sglang_plugin.settings import Settings

    assert Settings().graph_bounds(131072) == [16384, 65536, 131072]
    assert Settings().graph_bounds(8192) == [8192]
    monkeypatch.setenv("TACTIC_GRAPH_CONTEXTS", "4096,32768")
    assert Settings.from_env().graph_bounds(16384) == [4096, 16384]
    monkeypatch.setenv("TACTIC_GRAPH_CONTEXTS", "0")
    with pytest.raises(ValueError, match="TACTIC_GRAPH_CONTEXTS"):
        Settings.from_env()


def test_query_weighting_from_the_environment(monkeypatch):
    """TACTIC_QUERY_WEIGHTED turns query-weighted clustering on (off by default) and travels
    to SGLang's processes with the other settings."""
    from tactic_server.sglang_plugin.settings import Settings

    monkeypatch.delenv("TACTIC_QUERY_WEIGHTED", raising=False)
    assert not Settings.from_env().config.query_weighted
    monkeypatch.setenv("TACTIC_QUERY_WEIGHTED", "1")
    settings = Settings.from_env()
    assert settings.config.query_weighted
    monkeypatch.setattr(os, "environ", dict(os.environ))  # export writes this copy
    os.environ["TACTIC_QUERY_WEIGHTED"] = "0"
    settings.export()
    assert Settings.from_env().config.query_weighted
    monkeypatch.setenv("TACTIC_QUERY_WEIGHTED", "yes")
    with pytest.raises(ValueError, match="TACTIC_QUERY_WEIGHTED"):
        Settings.from_env()


def test_sglang_engine_refuses_options_its_kernels_do_not_compute(tmp_path):
    """serve --engine sglang --tactic-config exact_tokens=true: refused by name when the
    engine is built, before SGLang starts, instead of failing the first decode step."""
    from tactic_server.engine.config import EngineConfig
    from tactic_server.sglang_plugin.engine import SGLangEngine

    config = EngineConfig(model_dir=str(tmp_path), tactic=TacticConfig(exact_tokens=True))
    with pytest.raises(ValueError, match="exact_tokens, which the selection kernels"):
        SGLangEngine(config)


def test_the_whole_tactic_config_travels_to_sglangs_processes(monkeypatch):
    """Every TacticConfig field set on the server (--tactic-config) reaches the processes
    SGLang spawns, through TACTIC_CONFIG; a bad one is refused by the variable's name."""
    from tactic_server.sglang_plugin.settings import Settings

    monkeypatch.setattr(os, "environ", dict(os.environ))  # export writes this copy
    for name in ("TACTIC_CONFIG", "TACTIC_SEGMENT_SIZE", "TACTIC_QUERY_WEIGHTED"):
        os.environ.pop(name, None)
    band = TacticConfig(cluster_size=8, boundary_tokens=True, boundary_band=0.1, sink_tokens=2)
    dataclasses.replace(Settings.from_env(), config=band).export()
    assert Settings.from_env().config == band
    os.environ["TACTIC_CONFIG"] = "cluster_size=eight"
    with pytest.raises(ValueError, match="TACTIC_CONFIG: cluster_size wants a int"):
        Settings.from_env()


def test_dependent_launches_from_the_environment(monkeypatch):
    """The decoder's selection and attention kernels launch dependently by default (where the
    GPU has it: pdl_launch), TACTIC_PDL=0 turns it off, and the setting travels to SGLang's
    processes with the others."""
    from tactic_server.sglang_plugin.settings import Settings

    monkeypatch.delenv("TACTIC_PDL", raising=False)
    assert Settings.from_env().pdl
    monkeypatch.setenv("TACTIC_PDL", "0")
    settings = Settings.from_env()
    assert not settings.pdl
    monkeypatch.setattr(os, "environ", dict(os.environ))  # export writes this copy
    os.environ["TACTIC_PDL"] = "1"
    settings.export()
    assert not Settings.from_env().pdl
    monkeypatch.setenv("TACTIC_PDL", "yes")
    with pytest.raises(ValueError, match="TACTIC_PDL"):
        Settings.from_env()
