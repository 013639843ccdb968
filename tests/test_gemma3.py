"""Gemma 3 in the embedded engine against transformers' own Gemma3ForCausalLM on a tiny random
checkpoint that transformers writes (sliding layers of a window of 8 beside a global one,
head_dim above hidden / heads, query_pre_attn_scalar unlike head_dim, untied head): greedy
tokens over a prompt much longer than the window, dense and with Tactic on the global layer;
the kernels' decode against the torch path at head_dim 256."""

import asyncio
import dataclasses

import pytest
import torch

from tactic_server.engine.config import EngineConfig
from tactic_server.engine.engine import Engine
from tactic_server.engine.model_config import ModelConfig
from tactic_server.engine.types import GenerationRequest, SamplingParams, TacticParams
from tactic_server.tactic.config import TacticConfig
from tactic_server.testing.tiny_model import CORPUS
from tactic_server.training.tokenizer import train_tokenizer, write_tokenizer

transformers = pytest.importorskip("transformers")

WINDOW = 8
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def make_tiny_gemma3(path, seed: int, head_dim: int = 32, tied: bool = False):
    """A Gemma3ForCausalLM saved by transformers, weights redrawn so that activations keep unit
    variance, norms are not the identity, and attention is peaked (q/k norm weights near 1, so
    (1 + w) doubles q and k: scores of standard deviation about 4). tied: the output layer is
    the embedding, as in Gemma 3 270M (SGLang's Gemma 3 serves only such checkpoints); else its
    own matrix, which an engine that loaded the wrong one would show at the first token."""
    tokenizer = train_tokenizer(CORPUS.splitlines(keepends=True))
    write_tokenizer(path, tokenizer, 4096)
    config = transformers.Gemma3TextConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128,
        num_hidden_layers=len(LAYER_TYPES), num_attention_heads=4, num_key_value_heads=2,
        head_dim=head_dim, sliding_window=WINDOW, layer_types=LAYER_TYPES,
        max_position_embeddings=4096, query_pre_attn_scalar=24, tie_word_embeddings=tied,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(config)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                weight.copy_(1 + 0.1 * torch.randn_like(weight))
            elif "norm" in name:
                weight.copy_(0.1 * torch.randn_like(weight))
            else:  # linear layers and the embedding (scaled by sqrt(hidden) in the model)
                weight.copy_(torch.randn_like(weight) / weight.shape[1] ** 0.5)
    model.save_pretrained(path)
    return path


def prompt_ids(length: int, seed: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(5, 400, (length,), generator=generator).tolist())


def transformers_greedy(model_dir, prompt, new_tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    output = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                            pad_token_id=0)  # fmt: skip
    return output[0, len(prompt) :].tolist()


def make_engine(model_dir, **overrides) -> Engine:
    # chunks of 37 prompt tokens: chunk edges fall inside windows
    config = EngineConfig(model_dir=str(model_dir), max_model_len=1024, max_batch=4,
                          prefill_chunk=37, tactic=TacticConfig(segment_size=64))  # fmt: skip
    return Engine.from_config(dataclasses.replace(config, **overrides))


async def collect(engine, request):
    outputs = [output async for output in engine.generate(request)]
    return [t for output in outputs for t in output.token_ids], outputs[-1]


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    return make_tiny_gemma3(tmp_path_factory.mktemp("gemma3"), seed=1)


def test_config_reads_gemma3(gemma_dir):
    config = ModelConfig.from_dir(gemma_dir)
    assert config.architecture == "Gemma3ForCausalLM" and config.hidden_act == "gelu_pytorch_tanh"
    assert config.sliding_window == WINDOW and config.sliding_layers == (0, 1, 3)
    assert config.global_layers == (2,)
    assert config.rope_theta == 1e6 and config.local_rope_theta == 1e4
    assert config.rope_scaling is None and config.query_pre_attn_scalar == 24
    assert config.head_dim == 32 and not config.tie_word_embeddings


def test_config_reads_older_gemma3_keys(tmp_path):
    """transformers 4.5x wrote the layer pattern and the local RoPE base as their own keys, and
    save_pretrained leaves tie_word_embeddings out when it is true."""
    (tmp_path / "config.json").write_text(
        '{"architectures": ["Gemma3ForCausalLM"], "vocab_size": 100, "hidden_size": 64, '
        '"intermediate_size": 128, "num_hidden_layers": 12, "num_attention_heads": 4, '
        '"num_key_value_heads": 1, "sliding_window_pattern": 6, "rope_theta": 1000000.0, '
        '"rope_local_base_freq": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}'
    )
    config = ModelConfig.from_dir(tmp_path)
    assert config.global_layers == (5, 11) and config.tie_word_embeddings
    assert config.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert config.local_rope_theta == 1e4 and config.head_dim == 256


def test_dense_greedy_equals_transformers(gemma_dir):
    prompt = prompt_ids(300, seed=1)
    tokens, last = asyncio.run(
        collect(make_engine(gemma_dir), GenerationRequest("r", prompt, GREEDY, TacticParams(False)))
    )
    assert tokens == transformers_greedy(gemma_dir, prompt, GREEDY.max_tokens)
    assert last.tactic is None


def test_tactic_on_the_global_layer_at_p_near_one_equals_transformers(gemma_dir):
    prompt = prompt_ids(300, seed=1)
    request = GenerationRequest("r", prompt, GREEDY, TacticParams(True, 0.999))
    tokens, last = asyncio.run(collect(make_engine(gemma_dir), request))
    assert tokens == transformers_greedy(gemma_dir, prompt, GREEDY.max_tokens)
    # statistics are the global layer's: it read less than everything, over clustered segments
    assert last.tactic is not None and 0 < last.tactic.selected_ratio < 0.95
    assert last.tactic.estimated_mass >= 0.999 - 1e-4


def test_clusters_are_kept_for_global_layers_only(gemma_dir):
    engine = make_engine(gemma_dir)
    assert len(engine.runner.side.pools) == 1


def test_triton_backend_equals_torch_backend_at_head_dim_256(tmp_path):
    """Gemma 3's head_dim: the kernels' Tactic decode (select_rows, sparse_decode on the global
    layer) and their windowed dense decode on the sliding layers, under the interpreter on the
    CPU, give the torch path's tokens and statistics; a dense request decodes beside it."""
    model_dir = make_tiny_gemma3(tmp_path, seed=2, head_dim=256)
    sampling = dataclasses.replace(GREEDY, max_tokens=6)
    requests = [
        GenerationRequest("k", prompt_ids(140, seed=4), sampling, TacticParams(True, 0.9)),
        GenerationRequest("d", prompt_ids(100, seed=6), sampling, TacticParams(False)),
    ]
    outputs = {}
    for backend in ("torch", "triton"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        engine = make_engine(model_dir, device=device, attention_backend=backend)

        async def both(engine=engine):
            return await asyncio.gather(*(collect(engine, r) for r in requests))

        outputs[backend] = asyncio.run(both())
    for torch_output, triton_output in zip(outputs["torch"], outputs["triton"], strict=True):
        assert triton_output[0] == torch_output[0]
    torch_usage, triton_usage = outputs["torch"][0][1].tactic, outputs["triton"][0][1].tactic
    assert triton_usage.selected_ratio == pytest.approx(torch_usage.selected_ratio, rel=1e-6)
    assert outputs["triton"][1][1].tactic is None
