"""The SGLang plugin on a model shaped like Gemma 3, against SGLang's own classes (0.5.12.post1)
on the CPU, kernels under the Triton interpreter: sliding-window layers beside global ones (their
RadixAttention windows as SGLang's gemma3 sets them, sliding_window - 1), four query heads on one
KV head, a softmax scale of query_pre_attn_scalar ** -0.5 unlike 1 / sqrt(head_dim).

A decode step (eagerly, and as the Tactic CUDA-graph family records it): sliding layers attend to
transformers' window (the last WINDOW keys, the query's own included) through SGLang's Triton
path, global layers to every key (dense requests) or to plan_tactic's selection (Tactic), all at
the layer's scale; prefill keeps transformers' window too. Cluster metadata exists for the global
layers only. SGLang's own Triton decode reads one key less than its extend (and than
transformers and FlashInfer), which the backend corrects. On a GPU: a tiny random Gemma 3
checkpoint served by SGLang, Tactic at P = 0.999 against dense requests, transformers and SGLang's
dense backends."""

import json
import math

import pytest
import torch

sglang = pytest.importorskip("sglang")

from sglang.srt.layers.attention import triton_backend  # noqa: E402
from sglang.srt.layers.radix_attention import AttentionType, RadixAttention  # noqa: E402
from sglang.srt.managers.schedule_batch import Req  # noqa: E402
from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402
from test_sglang_plugin import DIM, make_runner  # noqa: E402

from tactic_server.decode import metadata_bytes_per_token  # noqa: E402
from tactic_server.sglang_plugin import backend as backend_module  # noqa: E402
from tactic_server.sglang_plugin import hooks  # noqa: E402
from tactic_server.tactic import TacticConfig, build_cluster_index, plan_tactic  # noqa: E402
from tactic_server.tactic.attention import sparse_attention  # noqa: E402
from tactic_server.tactic.clustering import query_moments  # noqa: E402
from tactic_server.tactic.workloads import generate_workload  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIG = TacticConfig(segment_size=64)
HEADS, KV_HEADS = 4, 1  # Gemma 3 270M's grouping (its head_dim is 256; DIM here)
WINDOW = 16  # transformers' sliding_window: the keys a sliding layer's query sees
LAYER_TYPES = ("sliding", "full", "sliding", "full", "sliding")  # the last layer slides
GLOBAL = (1, 3)
SCALING = 24**-0.5  # query_pre_attn_scalar 24, head_dim 32
NUM_SLOTS = 1024
LENGTHS, KINDS = (300, 190, 250), ("topics", "needles", "topics")
CUSTOM = ({"tactic_target": 0.9}, {"tactic_target": 0.75}, {"tactic": {"enabled": False}})
TARGETS = (0.9, 0.75, 1.0)
GRAPH_CUSTOM, GRAPH_TARGETS = (*CUSTOM[:2], {"tactic_target": 0.95}), (0.9, 0.75, 0.95)
# dense attention against float64: the interpreter multiplies float32 exactly; on a GPU,
# SGLang's Triton decode multiplies float32 in tf32 (10-bit mantissas), about 1e-3 off here
DENSE_TOL = dict(atol=1e-5, rtol=1e-4) if DEVICE == "cpu" else dict(atol=3e-3, rtol=3e-3)


def gemma_layers(kinds=LAYER_TYPES) -> list[RadixAttention]:
    """The attention modules as SGLang's gemma3 builds them (window None on global layers)."""
    return [RadixAttention(HEADS, DIM, SCALING, KV_HEADS, layer_id=i,
                           sliding_window_size=WINDOW - 1 if kind == "sliding" else None,
                           attn_type=AttentionType.DECODER_BIDIRECTIONAL)
            for i, kind in enumerate(kinds)]  # fmt: skip


def gemma_runner(layers):
    """SGLang's ModelRunner as the backend sees it once the model is loaded: its modules, and
    the model's window (gemma3's get_attention_sliding_window_size: sliding_window - 1)."""
    kv = MHATokenToKVPool(NUM_SLOTS, page_size=1, dtype=torch.float32, head_num=KV_HEADS,
                          head_dim=DIM, layer_num=len(layers), device=DEVICE,
                          enable_memory_saver=False)  # fmt: skip
    requests = ReqToTokenPool(4, 512, DEVICE, enable_memory_saver=False)
    allocator = TokenToKVPoolAllocator(NUM_SLOTS, torch.float32, DEVICE, kv, need_sort=False)
    runner = make_runner(kv, requests, allocator, HEADS, KV_HEADS)
    runner.sliding_window_size, runner.model = WINDOW - 1, torch.nn.ModuleList(layers)
    runner.kv_cache_dtype = torch.float32
    hooks.init_pools_around(lambda runner: None, runner)  # the plugin's pool hook
    return runner


def on_one_rank(monkeypatch) -> None:
    monkeypatch.setenv("TACTIC_SEGMENT_SIZE", str(CONFIG.segment_size))
    # every Tactic step selects: on a GPU the cost model would decode these short contexts
    # dense (no clustering, dense outputs; the H100 run of 2026-12-06 failed so), on the CPU
    # there is none
    monkeypatch.setenv("TACTIC_DENSE_FALLBACK", "off")
    for module in (triton_backend, backend_module):  # no parallel state here
        monkeypatch.setattr(module, "get_attention_tp_size", lambda: 1)


@pytest.fixture
def one_rank(monkeypatch):
    on_one_rank(monkeypatch)


@pytest.fixture(scope="module")
def eager_step():
    """The eager decode step of CUSTOM's requests, which several tests read."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        on_one_rank(monkeypatch)
        yield Step(CUSTOM, graph=False)


def attention(query, keys, values, scale, window=None):
    """Softmax attention [H_q, d] in float64 of one query over its keys [n, H_kv, d] (the last
    `window` of them; None: all), query heads grouped on KV heads."""
    if window is not None:
        keys, values = keys[-window:], values[-window:]
    group = query.shape[0] // keys.shape[1]
    keys, values = (x.double().repeat_interleave(group, dim=1) for x in (keys, values))
    scores = torch.einsum("hd,nhd->hn", query.double(), keys) * scale
    return torch.einsum("hn,nhd->hd", scores.softmax(-1), values)


class Step:
    """One decode step of three requests through the tactic backend and SGLang's own Triton
    backend on the same pools: each layer's outputs [3, H_q, d], the queries, and what the
    references need."""

    def __init__(self, custom, graph: bool):
        self.runner = runner = gemma_runner(gemma_layers())
        self.layers = list(runner.model)
        self.kv, self.requests = runner.token_to_kv_pool, runner.req_to_token_pool
        self.tactic = backend_module.TacticAttnBackend(runner)
        self.triton = triton_backend.TritonAttnBackend(runner)
        self.reqs, self.queries, new_kv, self.slots = [], [], [], []
        for index, (length, kind) in enumerate(zip(LENGTHS, KINDS, strict=True)):
            req = Req(f"r{index}", "", [1] * (length - 1),
                      SamplingParams(custom_params=custom[index]))  # fmt: skip
            request_slot = self.requests.alloc([req])[0]
            held = runner.token_to_kv_pool_allocator.alloc(length)
            queries, step_kv = [], []
            for layer in self.layers:  # each layer its own keys, so that their clusters differ
                workload = generate_workload(kind, length, HEADS, KV_HEADS, DIM,
                                             seed=10 * index + layer.layer_id)  # fmt: skip
                generator = torch.Generator().manual_seed(10 * index + layer.layer_id)
                values = torch.randn(length, KV_HEADS, DIM, generator=generator)
                self.kv.k_buffer[layer.layer_id][held[:-1]] = workload.keys[:-1].to(DEVICE)
                self.kv.v_buffer[layer.layer_id][held[:-1]] = values[:-1].to(DEVICE)
                queries.append(workload.query)
                step_kv.append((workload.keys[-1], values[-1]))  # the new token's, in the batch
            self.requests.req_to_token[request_slot, :length] = held.int()
            self.reqs.append(req)
            self.queries.append(queries)
            new_kv.append(step_kv)
            self.slots.append(held)
        self.outputs = {"tactic": self.decode(self.tactic, new_kv, graph),
                        "triton": self.decode(self.triton, new_kv, False)}  # fmt: skip

    def batch(self, backend, rows: int) -> ForwardBatch:
        """The decode batch, padded as SGLang pads a graph's batch when rows is 4: a row of
        length 1 whose stale request slot is a live request's."""
        slots = torch.tensor([r.req_pool_idx for r in self.reqs], device=DEVICE)
        lens = torch.tensor(LENGTHS, device=DEVICE)
        cache_loc = torch.stack([s[-1] for s in self.slots]).to(DEVICE)
        if rows == 4:
            slots = torch.cat([slots, slots[:1]])
            cache_loc = torch.cat([cache_loc, torch.zeros_like(cache_loc[:1])])
            lens = torch.cat([lens, torch.ones(1, dtype=lens.dtype, device=DEVICE)])
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE, batch_size=rows,
            input_ids=torch.zeros(rows, dtype=torch.long), req_pool_indices=slots, seq_lens=lens,
            out_cache_loc=cache_loc, seq_lens_sum=int(lens.sum()), seq_lens_cpu=lens.cpu(),
            req_to_token_pool=self.requests, token_to_kv_pool=self.kv, attn_backend=backend,
        )  # fmt: skip

    def decode(self, backend, new_kv, graph: bool) -> list[torch.Tensor]:
        rows = 4 if graph else 3
        batch = self.batch(backend, rows)
        if backend is self.tactic:  # the TP worker hook does this before each forward
            backend.admit(self.reqs, ForwardMode.DECODE, batch.seq_lens_cpu[:3])
        if graph:
            # as SGLang runs it: the dense family's graph state, then the Tactic family's capture
            # (on the capture's dummy batch), then each replay's metadata before the recorded
            # forward (the forward below stands for the graph it recorded)
            decode = ForwardMode.DECODE
            backend.init_cuda_graph_state(4, 4)
            backend.graph_family, backend.graph_bound = "tactic", 320
            dummy = torch.zeros(4, dtype=torch.long, device=DEVICE)
            backend.init_forward_metadata_capture_cuda_graph(4, 4, dummy, dummy + 1, None, decode,
                                                             None)  # fmt: skip
            backend._replay_forward_batch = self.batch(backend, 3)  # SGLang's, not padded
            backend.init_forward_metadata_replay_cuda_graph(
                4, batch.req_pool_indices, batch.seq_lens, batch.seq_lens_sum, None, decode, None,
                seq_lens_cpu=batch.seq_lens_cpu,
            )  # fmt: skip
        else:
            backend.init_forward_metadata(batch)
        outputs = []
        for layer in self.layers:
            q = torch.stack([queries[layer.layer_id] for queries in self.queries])
            k, v = (torch.stack([step[layer.layer_id][i] for step in new_kv]) for i in (0, 1))
            if rows == 4:  # the padding row's query and K/V
                q, k, v = (torch.cat([x, torch.zeros_like(x[:1])]) for x in (q, k, v))
            out = backend.forward_decode(q.reshape(rows, -1).to(DEVICE), k.to(DEVICE),
                                         v.to(DEVICE), layer, batch)  # fmt: skip
            outputs.append(out.view(rows, HEADS, DIM)[:3])
        return outputs

    def context(self, request: int, layer: int):
        """The request's keys and values [length, H_kv, d] of a layer, its new token's included."""
        held = self.slots[request].to(DEVICE)
        return self.kv.k_buffer[layer][held], self.kv.v_buffer[layer][held]

    def tactic_reference(self, request: int, layer: int, target: float) -> torch.Tensor:
        """plan_tactic + sparse_attention on the query scaled to Tactic's 1/sqrt(d) scores."""
        keys, values = self.context(request, layer)
        length = keys.shape[0]
        query = self.queries[request][layer].to(DEVICE) * SCALING * math.sqrt(DIM)
        clustered = (length - 1) // CONFIG.segment_size * CONFIG.segment_size
        index = build_cluster_index(keys[:clustered], CONFIG)
        index = type(index)(**{**index.__dict__, "seq_len": length})
        plan = plan_tactic(query, keys, target, index, CONFIG)
        return sparse_attention(query, keys, values, plan)


def check_step(step: Step, targets) -> None:
    for layer, kind in enumerate(LAYER_TYPES):
        out = step.outputs["tactic"][layer]
        for request, target in enumerate(targets):
            keys, values = step.context(request, layer)
            query = step.queries[request][layer].to(DEVICE)
            if kind == "sliding" or target >= 1.0:
                window = WINDOW if kind == "sliding" else None
                expected = attention(query, keys, values, SCALING, window)
                torch.testing.assert_close(out[request].double(), expected, **DENSE_TOL)
            else:
                expected = step.tactic_reference(request, layer, target)
                torch.testing.assert_close(out[request], expected, atol=2e-4, rtol=1e-3)


def test_decode_step_slides_on_local_layers_and_selects_on_global_ones(eager_step):
    """Dense request: every key on the global layers; Tactic requests (P = 0.9, 0.75): the
    reference plan; sliding layers: transformers' window of WINDOW keys, for all three. One
    Tactic step each in the statistics (summed once, at the last global layer)."""
    step = eager_step
    check_step(step, TARGETS)
    stats = step.tactic.side.stats[[r.req_pool_idx for r in step.reqs]].tolist()
    assert [row[3] for row in stats] == [1.0, 1.0, 0.0]
    assert all(0.0 < row[0] < 1.0 for row in stats[:2])


def test_decode_step_as_the_tactic_graph_family_records_it(one_rank):
    """Every request selects, SGLang's padded batch: the sliding layers read the dense backend's
    graph buffers, which the Tactic family's capture and replay set up beside its own plan."""
    step = Step(GRAPH_CUSTOM, graph=True)
    check_step(step, GRAPH_TARGETS)
    slots = [r.req_pool_idx for r in step.reqs]
    assert step.tactic.side.stats[slots, 3].tolist() == [1.0, 1.0, 1.0]


def test_sglangs_triton_decode_reads_one_key_less_than_the_window(eager_step):
    """SGLang's gemma3 gives a sliding layer sliding_window - 1 (the keys before the query);
    Triton's extend masks to sliding_window keys, as transformers and FlashInfer attend, but its
    decode reads only the last sliding_window - 1. Ours reads sliding_window; both agree on the
    global layers of the dense request."""
    step = eager_step
    dense_request = 2
    for layer, kind in enumerate(LAYER_TYPES):
        ours, sglangs = (step.outputs[name][layer][dense_request] for name in ("tactic", "triton"))
        if kind == "full":
            torch.testing.assert_close(ours, sglangs, **DENSE_TOL)
            continue
        keys, values = step.context(dense_request, layer)
        query = step.queries[dense_request][layer].to(DEVICE)
        short = attention(query, keys, values, SCALING, WINDOW - 1)
        full = attention(query, keys, values, SCALING, WINDOW)
        assert (short - full).abs().max() > 1e-2  # one key is visible in the outputs
        torch.testing.assert_close(sglangs.double(), short, **DENSE_TOL)
        torch.testing.assert_close(ours.double(), full, **DENSE_TOL)


def test_prefill_keeps_the_window_through_sglangs_extend(one_rank, monkeypatch):
    """A chunk of 24 tokens after 40 cached ones (chunked prefill) through the tactic backend's
    extend, SGLang's Triton one with its decode window raised: each new query still sees the
    last WINDOW keys up to itself on a sliding layer, every key up to itself on a global one.
    With TACTIC_QUERY_WEIGHTED=1 the global layers' queries are kept for clustering."""
    monkeypatch.setenv("TACTIC_QUERY_WEIGHTED", "1")
    runner = gemma_runner(gemma_layers())
    backend = backend_module.TacticAttnBackend(runner)
    kv, prefix, chunk = runner.token_to_kv_pool, 40, 24
    req = Req("r", "", [1] * (prefix + chunk), SamplingParams())
    request_slot = runner.req_to_token_pool.alloc([req])[0]
    held = runner.token_to_kv_pool_allocator.alloc(prefix + chunk)
    runner.req_to_token_pool.req_to_token[request_slot, : prefix + chunk] = held.int()
    generator = torch.Generator().manual_seed(5)
    keys, values, queries = (torch.randn(prefix + chunk, n, DIM, generator=generator).to(DEVICE)
                             for n in (KV_HEADS, KV_HEADS, HEADS))  # fmt: skip
    lens, prefix_lens, chunk_lens, slots = (
        torch.tensor([n], device=DEVICE) for n in (prefix + chunk, prefix, chunk, request_slot)
    )  # fmt: skip
    batch = ForwardBatch(
        forward_mode=ForwardMode.EXTEND, batch_size=1,
        input_ids=torch.zeros(chunk, dtype=torch.long), req_pool_indices=slots, seq_lens=lens,
        out_cache_loc=held[prefix:].to(DEVICE),
        seq_lens_sum=prefix + chunk, seq_lens_cpu=lens.cpu(), extend_prefix_lens=prefix_lens,
        extend_prefix_lens_cpu=[prefix], extend_seq_lens=chunk_lens, extend_seq_lens_cpu=[chunk],
        extend_start_loc=torch.zeros(1, dtype=torch.int32, device=DEVICE),
        req_to_token_pool=runner.req_to_token_pool, token_to_kv_pool=kv, attn_backend=backend,
    )  # fmt: skip
    backend.init_forward_metadata(batch)
    for layer in runner.model:
        kv.k_buffer[layer.layer_id][held[:prefix]] = keys[:prefix]
        kv.v_buffer[layer.layer_id][held[:prefix]] = values[:prefix]
        out = backend.forward_extend(queries[prefix:].reshape(chunk, -1), keys[prefix:],
                                     values[prefix:], layer, batch)  # fmt: skip
        out = out.view(chunk, HEADS, DIM)
        window = WINDOW if layer.sliding_window_size > -1 else None
        for i in range(chunk):
            position = prefix + i
            expected = attention(queries[position], keys[: position + 1], values[: position + 1],
                                 SCALING, window)  # fmt: skip
            torch.testing.assert_close(out[i].double(), expected, **DENSE_TOL)
    # and the chunk's queries on the global layers are kept for query-weighted clustering
    kept = query_moments(queries[prefix:], KV_HEADS).sum(0)
    for cluster_layer in range(len(GLOBAL)):
        torch.testing.assert_close(backend.side.query_moments[cluster_layer, request_slot], kept)


def test_cluster_metadata_only_for_global_layers(eager_step, one_rank, monkeypatch):
    """The pool's ClusterSide holds the global layers (cluster layer i describes SGLang layer
    GLOBAL[i]), the pool's sizing counts their bytes only, and a model without a global layer
    is refused."""
    step = eager_step
    side = step.tactic.side
    assert side.layer_ids == GLOBAL and len(side.pools) == len(GLOBAL)
    assert step.tactic.cluster_layer == {1: 0, 3: 1}
    # the decode clustered request 0's full segments, each global layer from its own keys
    length = LENGTHS[0]
    segments = side.leading_segments(step.requests.req_to_token, step.reqs[0].req_pool_idx, length)
    clustered = (length - 1) // CONFIG.segment_size
    assert segments.numel() == clustered
    for cluster_layer, layer in enumerate(GLOBAL):
        stored = side.cluster_index(cluster_layer, segments, length)
        keys, _ = step.context(0, layer)
        expected = build_cluster_index(keys[: clustered * CONFIG.segment_size], CONFIG)
        assert torch.equal(stored.token_positions, expected.token_positions)
        torch.testing.assert_close(stored.centroids, expected.centroids.float())
        other, _ = step.context(0, layer - 1)  # the sliding layer before it
        elsewhere = build_cluster_index(other[: clustered * CONFIG.segment_size], CONFIG)
        assert not torch.equal(stored.token_positions, elsewhere.token_positions)

    monkeypatch.setattr("sglang.srt.layers.dp_attention.get_attention_tp_size", lambda: 1)
    cell = hooks.cell_size_around(lambda self, runner, num_layers: 0, None, step.runner,
                                  len(LAYER_TYPES))  # fmt: skip
    assert cell == math.ceil(metadata_bytes_per_token(KV_HEADS, DIM, torch.float32, CONFIG,
                                                      len(GLOBAL), DEVICE))  # fmt: skip

    sliding_only = gemma_runner(gemma_layers(("sliding",) * 3))
    assert sliding_only.token_to_kv_pool.tactic_side.layer_ids == ()
    with pytest.raises(ValueError, match="sliding-window attention on every layer"):
        backend_module.TacticAttnBackend(sliding_only)


def test_query_scale_is_the_layers_not_one_over_sqrt_head_dim(eager_step):
    """Tactic's kernels score q . k / sqrt(d); the layer's scale (query_pre_attn_scalar ** -0.5)
    reaches them through the query: the dense request's global layers equal attention at
    SCALING, visibly apart from attention at 1 / sqrt(d), and a P = 1 plan in the reference
    equals them too."""
    step = eager_step
    dense_request = 2
    for layer in GLOBAL:
        out = step.outputs["tactic"][layer][dense_request].double()
        keys, values = step.context(dense_request, layer)
        query = step.queries[dense_request][layer].to(DEVICE)
        at_scale = attention(query, keys, values, SCALING)
        unscaled = attention(query, keys, values, DIM**-0.5)
        assert (at_scale - unscaled).abs().max() > 1e-2
        torch.testing.assert_close(out, at_scale, **DENSE_TOL)
        everything = step.tactic_reference(dense_request, layer, 1.0)
        torch.testing.assert_close(out, everything.double(), **DENSE_TOL)


NEW_TOKENS = 12
SERVED = {"dense": (None, None), "select": (0.999, 0.999), "mixed": (0.999, None)}


def serve_greedy(model_dir, backend: str, dtype: str, prompts, runs=SERVED) -> dict:
    """Per run of `runs` (a target per prompt, None: dense), one batch of the prompts through an
    sglang.Engine: each prompt's greedy tokens and its Tactic usage (None without)."""
    import sglang

    from tactic_server.sglang_plugin.engine import model_override_args, tactic_usage

    engine = sglang.Engine(model_path=str(model_dir), skip_tokenizer_init=True,
                           **model_override_args(model_dir),
                           attention_backend=backend, dtype=dtype, context_length=1024,
                           sampling_backend="pytorch", grammar_backend="none",
                           mem_fraction_static=0.3, max_running_requests=4,
                           # the batches hold the two prompts at most: graphs for 1 and 2 only
                           # (a third size added 2-14 s a graph family to each engine's start)
                           cuda_graph_max_bs=2,
                           disable_piecewise_cuda_graph=True)  # fmt: skip
    results = {}
    try:
        for name, targets in runs.items():
            params = [dict(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True,
                           custom_params={"tactic": {"enabled": False} if target is None
                                          else {"target": target}})
                      for target in targets]  # fmt: skip
            outputs = engine.generate(input_ids=[list(p) for p in prompts], sampling_params=params)
            results[name] = [(o["output_ids"], tactic_usage(o["meta_info"])) for o in outputs]
    finally:
        engine.shutdown()
    return results


@pytest.mark.gpu
def test_sglang_serves_a_tiny_gemma3_with_tactic_on_its_global_layer(tmp_path, monkeypatch):
    """A tiny random Gemma 3 (test_gemma3's: a window of 8, one global layer of four,
    query_pre_attn_scalar 24, here head_dim 64 and the output layer tied to the embedding, as
    SGLang's Gemma 3 needs) served by SGLang on a GPU, prompts of 300 tokens,
    segments of 64, every decode of a Tactic request selecting (TACTIC_DENSE_FALLBACK=off).
    float32 (the tactic backend over Triton): dense requests and Tactic at P = 0.999, alone (the
    Tactic graph family) and beside a dense request (eager), give transformers' greedy tokens.
    float16 (over FlashInfer): each run gives the tokens of the same run through SGLang's
    FlashInfer backend (on the H100, 2026-12-07, Tactic's second run, a radix-cache hit, differed
    from FlashInfer's first, a cold prefill, from the first token on, which only the extend
    decides: the runs are compared over the same cache states)."""
    from test_gemma3 import make_tiny_gemma3, prompt_ids, transformers_greedy

    model_dir = make_tiny_gemma3(tmp_path, seed=1, head_dim=64, tied=True)
    prompts = [prompt_ids(300, seed=seed) for seed in (1, 2)]
    expected = [transformers_greedy(model_dir, prompt, NEW_TOKENS) for prompt in prompts]
    monkeypatch.setenv("TACTIC_SEGMENT_SIZE", "64")
    monkeypatch.setenv("TACTIC_DENSE_FALLBACK", "off")
    monkeypatch.setenv("TACTIC_DENSE_BACKEND", "auto")  # triton for float32, else flashinfer

    def check_usage(run, targets):
        for (_, usage), target in zip(run, targets, strict=True):
            if target is None:
                assert usage is None
            else:  # Tactic decoded every step after the first token, none of them dense
                assert usage.decode_steps >= NEW_TOKENS // 2 and usage.dense_fallback_steps == 0
                assert 0.0 < usage.selected_ratio <= 1.0

    float32 = serve_greedy(model_dir, "tactic", "float32", prompts)
    for name, run in float32.items():
        assert [tokens for tokens, _ in run] == expected, name
        check_usage(run, SERVED[name])

    # the same runs in the same order through SGLang's FlashInfer backend (which ignores the
    # Tactic parameters): a run after the first finds its prompts in the radix cache and
    # extends only their last token, over FlashInfer's paged-prefix path, in both engines
    flashinfer = serve_greedy(model_dir, "flashinfer", "float16", prompts)
    float16 = serve_greedy(model_dir, "tactic", "float16", prompts)
    print("flashinfer float16, run by run:",
          {name: [tokens for tokens, _ in run] for name, run in flashinfer.items()})
    for name, run in float16.items():
        assert [tokens for tokens, _ in run] == [tokens for tokens, _ in flashinfer[name]], name
        check_usage(run, SERVED[name])


def test_gemma3_without_rope_scaling_loads_in_sglang(tmp_path):
    """SGLang 0.5.12's Gemma 3 reads rope_parameters["full_attention"]["factor"], which a
    checkpoint without RoPE scaling (Gemma 3 270M, this tiny one) lacks: the engine's override
    gives it factor 1.0 (plain RoPE) as SGLang's own config loader applies it; other models get
    none."""
    from sglang.srt.utils.hf_transformers.config import get_config
    from test_gemma3 import make_tiny_gemma3

    from tactic_server.sglang_plugin.engine import model_override_args
    from tactic_server.testing.tiny_model import make_tiny_model

    (tmp_path / "gemma").mkdir()
    model_dir = make_tiny_gemma3(tmp_path / "gemma", seed=1, tied=True)
    assert "factor" not in get_config(str(model_dir), False).rope_parameters["full_attention"]
    override = model_override_args(model_dir)
    config = get_config(str(model_dir), False,
                        model_override_args=json.loads(override["json_model_override_args"]))
    assert config.rope_parameters["full_attention"] == {"rope_type": "default",
                                                        "rope_theta": 1e6, "factor": 1.0}
    assert config.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert model_override_args(make_tiny_model(tmp_path / "llama")) == {}


def test_untied_gemma3_is_refused_for_sglang(tmp_path):
    """SGLang's Gemma 3 skips lm_head.weight and takes its logits from the embedding, so a
    Gemma 3 with its own output layer would be served other tokens than its own (H100,
    2026-12-07): refused before SGLang starts, naming the engine that serves it."""
    from test_gemma3 import make_tiny_gemma3

    from tactic_server.sglang_plugin.engine import model_override_args

    model_dir = make_tiny_gemma3(tmp_path, seed=1, tied=False)
    with pytest.raises(ValueError, match="lm_head.weight.*--engine embedded"):
        model_override_args(model_dir)
