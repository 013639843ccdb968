"""The embedded engine against Hugging Face transformers on the same checkpoints (an independent
implementation), and its batching, prefix cache, sampling, stops and cancellation."""

import asyncio
import dataclasses

import pytest
import torch

from tactic_server.engine.config import EngineConfig
from tactic_server.engine.engine import Engine
from tactic_server.engine.sampler import sample
from tactic_server.engine.types import (
    GenerationRequest,
    PromptTooLong,
    QueueFull,
    SamplingParams,
    TacticParams,
)
from tactic_server.tactic.config import TacticConfig
from tactic_server.testing.tiny_model import make_tiny_model

transformers = pytest.importorskip("transformers")

SEGMENT = 32
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
DENSE = TacticParams(enabled=False)


def make_engine(model_dir, **overrides) -> Engine:
    config = EngineConfig(model_dir=str(model_dir), max_model_len=1024, max_batch=4,
                          tactic=TacticConfig(segment_size=SEGMENT))  # fmt: skip
    return Engine.from_config(dataclasses.replace(config, **overrides))


def prompt_ids(length: int, seed: int = 0, vocab: int = 400) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(5, vocab, (length,), generator=generator).tolist())


async def collect(engine, request):
    outputs = [output async for output in engine.generate(request)]
    tokens = [t for output in outputs for t in output.token_ids]
    return tokens, "".join(o.text for o in outputs), outputs[-1]


def run(engine, request):
    return asyncio.run(collect(engine, request))


def transformers_greedy(model_dir, prompt, new_tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    output = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                            pad_token_id=0)  # fmt: skip
    return output[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("llama"), "llama", seed=1)


@pytest.fixture(scope="module")
def engine(llama_dir):
    return make_engine(llama_dir)


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "mistral"])
def test_greedy_equals_transformers(tmp_path, architecture):
    model_dir = make_tiny_model(tmp_path, architecture, seed=3, shards=2)
    prompt = prompt_ids(70, seed=1)
    engine = make_engine(model_dir)
    tokens, _, last = run(engine, GenerationRequest("r", prompt, GREEDY, DENSE))
    assert tokens == transformers_greedy(model_dir, prompt, GREEDY.max_tokens)
    assert last.finish_reason == "length" and last.tactic is None


def test_tactic_at_p_near_one_equals_transformers_on_sparse_attention(tmp_path):
    model_dir = make_tiny_model(tmp_path, "llama", seed=5, sparse_attention=True)
    prompt = prompt_ids(300, seed=2)
    # segments of 64: four clusters each, one of them an outlier singleton
    engine = make_engine(model_dir, tactic=TacticConfig(segment_size=64))
    tactic = TacticParams(enabled=True, target=0.999)
    tokens, _, last = run(engine, GenerationRequest("r", prompt, GREEDY, tactic))
    assert tokens == transformers_greedy(model_dir, prompt, GREEDY.max_tokens)
    # Tactic really ran, over clustered segments, and read less than everything
    assert last.tactic is not None and 0 < last.tactic.selected_ratio < 1.0
    assert last.tactic.estimated_mass >= 0.999 - 1e-4


def test_targets_change_the_selected_ratio(engine):
    prompt = prompt_ids(150, seed=3)
    ratios = []
    for target in (0.5, 0.99):
        request = GenerationRequest(f"t{target}", prompt, GREEDY, TacticParams(True, target))
        ratios.append(run(engine, request)[2].tactic.selected_ratio)
    assert 0 < ratios[0] < ratios[1] <= 1


def test_a_target_of_one_is_dense_attention(engine):
    """The rule both engines share (tactic.config.selects): a target of 1 attends to every
    token, as a request with Tactic off does; no selection runs, so no Tactic usage."""
    prompt = prompt_ids(150, seed=7)
    dense = run(engine, GenerationRequest("d", prompt, GREEDY, DENSE))
    one = run(engine, GenerationRequest("o", prompt, GREEDY, TacticParams(True, 1.0)))
    assert one[0] == dense[0]
    assert one[2].tactic is None and dense[2].tactic is None


def test_chunked_prefill_and_batching_change_nothing(llama_dir, engine):
    prompts = [prompt_ids(n, seed=n) for n in (5, 40, 130, 77)]
    alone = [run(engine, GenerationRequest(f"a{i}", p, GREEDY, DENSE))[0]
             for i, p in enumerate(prompts)]  # fmt: skip
    chunked = make_engine(llama_dir, prefill_chunk=7, max_batch=3)

    async def together():
        requests = [GenerationRequest(f"b{i}", p, GREEDY, DENSE) for i, p in enumerate(prompts)]
        return await asyncio.gather(*(collect(chunked, r) for r in requests))

    assert [tokens for tokens, _, _ in asyncio.run(together())] == alone
    assert chunked.stats().kv_slots_in_use == 0


def test_prefix_cache_reuses_kv_and_clusters(llama_dir):
    engine = make_engine(llama_dir)
    shared = prompt_ids(4 * SEGMENT, seed=7)
    first = GenerationRequest("p1", shared + prompt_ids(10, seed=8), GREEDY)
    second = GenerationRequest("p2", shared + prompt_ids(20, seed=9), GREEDY)
    run(engine, first)
    clustered, reused = engine.runner.clustered_segments, engine.scheduler.reused_tokens
    tokens, _, _ = run(engine, second)
    assert engine.scheduler.reused_tokens - reused == 4 * SEGMENT
    # the shared segments were not clustered again (the second prompt's own have no full one)
    assert engine.runner.clustered_segments == clustered
    assert tokens == run(make_engine(llama_dir), dataclasses.replace(second, request_id="x"))[0]
    assert engine.stats().kv_slots_in_use == 0


def test_sampling_seed_top_k_and_stop_strings(engine):
    prompt = prompt_ids(30, seed=11)
    sampled = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True)
    first = run(engine, GenerationRequest("s1", prompt, sampled))[0]
    assert run(engine, GenerationRequest("s2", prompt, sampled))[0] == first
    top1 = dataclasses.replace(sampled, top_k=1, seed=None)
    assert (
        run(engine, GenerationRequest("s3", prompt, top1))[0]
        == run(engine, GenerationRequest("s4", prompt, GREEDY))[0][:10]
    )
    _, text, _ = run(engine, GenerationRequest("s5", prompt, GREEDY))
    stop = text[4:7]
    assert stop and stop in text
    with_stop = dataclasses.replace(GREEDY, stop=(stop,))
    _, stopped, last = run(engine, GenerationRequest("s6", prompt, with_stop))
    assert stopped == text[: text.index(stop)] and last.finish_reason == "stop"


@pytest.mark.parametrize("extreme", [dict(temperature=1e-38), dict(temperature=1e-6),
                                     dict(top_p=1e-45), dict(top_p=5e-324),
                                     dict(temperature=2.0, top_p=1e-30, top_k=1)])
def test_extreme_sampling_values_are_greedy_and_fail_no_one(engine, extreme):
    """A temperature near 0 is greedy and a top_p near 0 keeps the top token, as in vLLM and
    SGLang; decoded in the same steps as an ordinary request, neither fails the other."""
    prompt = prompt_ids(40, seed=12)
    odd = dataclasses.replace(GREEDY, **({"temperature": 1.0} | extreme))
    assert sample(torch.tensor([0.5, 3.0, -1.0, float("-inf")]), odd, None, []).token_id == 1

    async def together():
        return await asyncio.gather(collect(engine, GenerationRequest("x", prompt, odd)),
                                    collect(engine, GenerationRequest("g", prompt, GREEDY)))

    (odd_tokens, _, odd_last), (greedy_tokens, _, greedy_last) = asyncio.run(together())
    assert odd_last.finish_reason == greedy_last.finish_reason == "length"
    assert odd_tokens == greedy_tokens  # greedy either way on this model's peaked logits


def test_cancellation_frees_kv(engine):
    async def cancel_after_two():
        request = GenerationRequest(
            "c", prompt_ids(50), dataclasses.replace(GREEDY, max_tokens=500)
        )
        stream = engine.generate(request)
        for _ in range(2):
            await stream.__anext__()
        assert engine.stats().kv_slots_in_use > 0
        await stream.aclose()
        for _ in range(200):
            if engine.stats().kv_slots_in_use == 0 and engine.stats().running_requests == 0:
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(cancel_after_two())


def test_refusals(llama_dir):
    engine = make_engine(llama_dir, max_model_len=64, max_batch=1, max_waiting=0)
    with pytest.raises(PromptTooLong, match="context is 64"):
        run(engine, GenerationRequest("long", prompt_ids(64), GREEDY))

    async def overflow():
        long_generation = dataclasses.replace(GREEDY, max_tokens=50)
        busy = engine.generate(GenerationRequest("busy", prompt_ids(5), long_generation))
        await busy.__anext__()
        with pytest.raises(QueueFull):
            await engine.generate(GenerationRequest("extra", prompt_ids(5), GREEDY)).__anext__()
        await busy.aclose()

    asyncio.run(overflow())


@pytest.mark.parametrize("tactic", [
    TacticConfig(segment_size=64),
    TacticConfig(segment_size=64, cluster_size=8, boundary_tokens=True, boundary_band=0.1),
])  # fmt: skip
def test_triton_backend_equals_torch_backend(tmp_path, tactic):
    """Decode through the kernels (select_rows + sparse_decode for Tactic, sparse_decode over
    every position for dense; under the interpreter on the CPU) gives the torch reference's
    tokens and statistics, with a Tactic and a dense request decoding in the same steps and a
    segment completed while decoding (scored with the tail until it is clustered); by default
    and with the boundary band (8-token clusters, 0.1 nats)."""
    model_dir = make_tiny_model(tmp_path, "llama", seed=5, sparse_attention=True)
    sampling = dataclasses.replace(GREEDY, max_tokens=16)
    requests = [
        GenerationRequest("k", prompt_ids(180, seed=4), sampling, TacticParams(True, 0.9)),
        GenerationRequest("d", prompt_ids(150, seed=6), sampling, DENSE),
    ]
    outputs = {}
    for backend in ("torch", "triton"):
        # the kernels run on the GPU where there is one, else under the Triton interpreter
        device = "cuda" if torch.cuda.is_available() else "cpu"
        engine = make_engine(model_dir, tactic=tactic, device=device, attention_backend=backend)

        async def both(engine=engine):
            return await asyncio.gather(*(collect(engine, r) for r in requests))

        outputs[backend] = asyncio.run(both())
        assert engine.stats().kv_slots_in_use == 0
    for torch_output, triton_output in zip(outputs["torch"], outputs["triton"], strict=True):
        assert triton_output[0] == torch_output[0]
    torch_usage, triton_usage = outputs["torch"][0][2].tactic, outputs["triton"][0][2].tactic
    assert triton_usage.selected_ratio == pytest.approx(torch_usage.selected_ratio, rel=1e-6)
    assert triton_usage.estimated_mass == pytest.approx(torch_usage.estimated_mass, rel=1e-4)
    assert outputs["triton"][1][2].tactic is None


def test_prompt_queries_weight_the_clustering_of_its_segments(llama_dir):
    """query_weighted: a prompt's queries on every layer (what the attention modules got in
    prefill) are the moments its request slot keeps, and the segments it completed are clustered
    scaled by them, as build_cluster_index does; the answer is still the model's at P near 1."""
    from tactic_server.engine.attention import PagedAttention
    from tactic_server.tactic.clustering import build_cluster_index, query_moments

    config = TacticConfig(segment_size=SEGMENT, query_weighted=True)
    engine = make_engine(llama_dir, tactic=config)
    prefill_queries = {}

    def record(module, args):
        q, context = args[0], args[3]
        if any(not part.is_decode for part in context.slices):
            prefill_queries.setdefault(module.cluster_layer, []).append(q.detach().clone())

    attention = [m for m in engine.runner.model.modules() if isinstance(m, PagedAttention)]
    hooks = [module.register_forward_pre_hook(record) for module in attention]
    prompt = prompt_ids(3 * SEGMENT + 7, seed=4)
    request = GenerationRequest("w", prompt, dataclasses.replace(GREEDY, max_tokens=4),
                                TacticParams(True, 0.999))  # fmt: skip
    tokens, _, _ = run(engine, request)
    for hook in hooks:
        hook.remove()
    assert tokens == transformers_greedy(llama_dir, prompt, 4)
    side, runner = engine.runner.side, engine.runner
    slot = 0  # the only request's
    heads = side.pools[0].centroids.shape[1]
    for layer, pool_layer in enumerate(side.layer_ids):
        recorded = query_moments(torch.cat(prefill_queries[layer]), heads).sum(0)
        torch.testing.assert_close(side.query_moments[layer, slot], recorded)
        segments = side.leading_segments(runner.req_to_token, slot, len(prompt) + 1)
        got = side.cluster_index(layer, segments, len(prompt) + 1)
        keys = engine.runner.pool.k[pool_layer][runner.req_to_token[slot, : 3 * SEGMENT].long()]
        want = build_cluster_index(keys, config, query_moments=recorded)
        assert got.clustered_len == 3 * SEGMENT
        assert torch.equal(got.token_positions, want.token_positions)
        unweighted = build_cluster_index(keys, TacticConfig(segment_size=SEGMENT))
        assert not torch.equal(got.token_positions, unweighted.token_positions)


def test_reference_only_options_serve_on_the_cpu_and_the_kernels_refuse_them(llama_dir):
    """exact_tokens (the exact top's clusters taken token by token): the torch reference the
    CPU engine decodes through computes it; an engine decoding through the kernels refuses it
    when it is built, naming the option, not at its first decode step."""
    exact = TacticConfig(segment_size=SEGMENT, exact_fraction=0.1, exact_tokens=True)
    engine = make_engine(llama_dir, tactic=exact)
    request = GenerationRequest("exact", prompt_ids(300, seed=3), GREEDY, TacticParams(True, 0.9))
    tokens, _, last = run(engine, request)
    assert len(tokens) == GREEDY.max_tokens
    assert 0.0 < last.tactic.selected_ratio <= 1.0 and last.tactic.estimated_mass >= 0.9 - 1e-6
    assert engine.stats().kv_slots_in_use == 0
    with pytest.raises(ValueError, match="exact_tokens, which only the torch reference"):
        make_engine(llama_dir, tactic=exact, attention_backend="triton")
