"""The engine's reading of Hugging Face checkpoints: config and RoPE against transformers, the
safetensors loader, the tokenizer and chat template, streaming detokenization, and the tiny
random checkpoints, which transformers itself must load."""

import json
import shutil

import jinja2
import pytest
import torch
from safetensors.torch import load_file

from tactic_server.engine.loader import load_state_dict
from tactic_server.engine.model_config import ModelConfig, rope_cos_sin, rope_inverse_frequencies
from tactic_server.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from tactic_server.testing.tiny_model import (
    DEFAULT_MODEL_NAME,
    default_model_dir,
    ensure_default_model,
    make_tiny_model,
)

transformers = pytest.importorskip("transformers")

ARCHITECTURES = ["llama", "qwen2", "mistral"]
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "Crème brûlée, naïve façade — Ærøskøbing; 日本語のテキスト 🦊🚀👍🏽!",
]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("llama"), "llama", seed=1)


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    return Tokenizer.from_dir(llama_dir)


def write_config(model_dir, generation=None, **config):
    model_dir.mkdir(exist_ok=True)
    base = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 1000,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "max_position_embeddings": 8192,
    }
    (model_dir / "config.json").write_text(json.dumps(base | config))
    if generation is not None:
        (model_dir / "generation_config.json").write_text(json.dumps(generation))
    return model_dir


# --- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_config_matches_transformers_reading_of_the_same_file(tmp_path, architecture):
    model_dir = make_tiny_model(
        tmp_path,
        architecture,
        num_heads=4,
        num_kv_heads=1,
        head_dim=24,
        rope_theta=500_000.0,
        rope_scaling=LLAMA3_SCALING,
        tie_word_embeddings=True,
        dtype="bfloat16",
    )
    config = ModelConfig.from_dir(model_dir)
    reference = transformers.AutoConfig.from_pretrained(model_dir)
    assert config.architecture == reference.architectures[0]
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
    ):
        assert getattr(config, name) == getattr(reference, name), name
    assert (config.head_dim, config.num_key_value_heads) == (24, 1)
    assert config.attention_bias == (architecture == "qwen2")
    assert config.rope_theta == 500_000.0 and config.rope_scaling == LLAMA3_SCALING
    assert config.torch_dtype == "bfloat16" and config.sliding_window is None
    assert config.eos_token_ids == (1,)


def test_config_defaults_and_eos_from_generation_config(tmp_path):
    model_dir = write_config(
        tmp_path, eos_token_id=7, bos_token_id=5, generation={"eos_token_id": [7, 9]}
    )
    config = ModelConfig.from_dir(model_dir)
    assert config.num_key_value_heads == 8 and config.head_dim == 32
    assert config.rope_theta == 10_000.0 and config.rope_scaling is None
    assert config.eos_token_ids == (7, 9) and config.bos_token_id == 5
    assert not config.attention_bias and not config.tie_word_embeddings
    write_config(tmp_path, eos_token_id=[3, 4], attention_bias=True)
    (tmp_path / "generation_config.json").unlink()
    config = ModelConfig.from_dir(model_dir)
    assert config.eos_token_ids == (3, 4) and config.attention_bias


def test_config_reads_transformers_5_rope_parameters(tmp_path):
    write_config(
        tmp_path, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}
    )
    config = ModelConfig.from_dir(tmp_path)
    assert config.rope_theta == 1e6
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"architectures": ["GPT2LMHeadModel"]},
            r"GPT2LMHeadModel is not supported; supported: LlamaForCausalLM, Qwen2ForCausalLM",
        ),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic' is not supported"),
        (
            {"architectures": ["MistralForCausalLM"], "sliding_window": 4096},
            "sliding-window attention is not supported",
        ),
        # transformers' Mistral default window (4096) applies where the key is absent
        (
            {"architectures": ["MistralForCausalLM"], "max_position_embeddings": 32768},
            "sliding-window attention is not supported",
        ),
        (
            {
                "architectures": ["Qwen2ForCausalLM"],
                "use_sliding_window": True,
                "sliding_window": 4096,
                "max_window_layers": 0,
            },
            "sliding-window attention is not supported",
        ),
        ({"mlp_bias": True}, "mlp_bias is not supported"),
    ],
)
def test_config_rejects_what_the_model_cannot_run(tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dir(write_config(tmp_path, **config))


def test_config_accepts_windows_that_never_bind(tmp_path):
    write_config(tmp_path, architectures=["MistralForCausalLM"], sliding_window=8192)
    assert ModelConfig.from_dir(tmp_path).architecture == "MistralForCausalLM"
    write_config(
        tmp_path, architectures=["Qwen2ForCausalLM"], use_sliding_window=False, sliding_window=4096
    )
    assert ModelConfig.from_dir(tmp_path).attention_bias


# --- RoPE -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rope_theta", "rope_scaling"),
    [
        (10_000.0, None),
        (1_000_000.0, {"rope_type": "linear", "factor": 4.0}),
        # Llama 3.1's parameters: head_dim 128 puts frequencies in all three llama3 bands
        (500_000.0, LLAMA3_SCALING),
    ],
)
def test_rope_equals_transformers(tmp_path, rope_theta, rope_scaling):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model_dir = make_tiny_model(
        tmp_path,
        head_dim=128,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=131072,
    )
    config = ModelConfig.from_dir(model_dir)
    reference = LlamaRotaryEmbedding(transformers.AutoConfig.from_pretrained(model_dir))
    inv_freq = rope_inverse_frequencies(config)
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == (64,)
    torch.testing.assert_close(inv_freq, reference.inv_freq, rtol=1e-7, atol=0)
    plain = 1.0 / rope_theta ** (torch.arange(0, 128, 2) / 128)
    assert torch.allclose(inv_freq, plain) == (rope_scaling is None)
    positions = torch.tensor([0, 1, 17, 4095, 8191, 65_000, 131_071])
    for dtype in (torch.float32, torch.bfloat16):
        cos, sin = rope_cos_sin(positions, inv_freq, dtype)
        cos_ref, sin_ref = reference(torch.zeros(1, dtype=dtype), positions[None])
        assert cos.dtype == dtype and cos.shape == (len(positions), 128)
        torch.testing.assert_close(cos, cos_ref[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(sin, sin_ref[0], rtol=0, atol=1e-6)


# --- loader -----------------------------------------------------------------------------------


def test_single_file_and_shards_load_the_same_tensors(tmp_path):
    single = make_tiny_model(tmp_path / "single", "qwen2", seed=4)
    sharded = make_tiny_model(tmp_path / "sharded", "qwen2", seed=4, shards=3)
    assert len(list(sharded.glob("model-*-of-00003.safetensors"))) == 3
    calls = []
    from_single = load_state_dict(single, torch.float32, "cpu")
    from_shards = load_state_dict(sharded, torch.float32, "cpu", lambda *a: calls.append(a))
    stored = load_file(single / "model.safetensors")
    assert from_single.keys() == from_shards.keys() == stored.keys()
    assert "model.layers.1.self_attn.k_proj.bias" in stored
    for name, tensor in stored.items():
        assert torch.equal(from_single[name], tensor) and torch.equal(from_shards[name], tensor)
    total = sum(t.numel() * t.element_size() for t in stored.values())
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == total
    assert len(calls) == len(stored) and calls[-1] == (total, total)
    assert all(earlier[0] < later[0] for earlier, later in zip(calls, calls[1:], strict=False))
    assert {total_bytes for _, total_bytes in calls} == {total}


def test_loader_casts_floating_tensors_to_the_wanted_dtype(tmp_path):
    model_dir = make_tiny_model(tmp_path, dtype="bfloat16", seed=2)
    stored = load_file(model_dir / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    loaded = load_state_dict(model_dir, torch.float32, torch.device("cpu"))
    for name, tensor in stored.items():
        assert loaded[name].dtype == torch.float32
        assert torch.equal(loaded[name], tensor.float())  # bf16 -> fp32 is exact


def test_loader_errors_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_state_dict(tmp_path / "absent", torch.float32, "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index"):
        load_state_dict(tmp_path / "empty", torch.float32, "cpu")
    model_dir = make_tiny_model(tmp_path / "sharded", shards=2)
    index_file = model_dir / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.extra.weight"] = "model-00001-of-00002.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model.extra.weight in model-00001-of-00002"):
        load_state_dict(model_dir, torch.float32, "cpu")
    (model_dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing: model-00002-of-00002.safetensors"):
        load_state_dict(model_dir, torch.float32, "cpu")


# --- tokenizer --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.encode(text, add_special_tokens=True) == [tokenizer.bos_token_id, *ids]


def test_special_tokens_in_text_become_their_ids_and_decode_skips_them(tokenizer):
    ids = tokenizer.encode("<|user|>\nhi<|end_of_text|>")
    assert ids[0] == 2 and ids[-1] == 1 and tokenizer.eos_token_ids == (1,)
    assert tokenizer.decode(ids) == "\nhi"


def test_chat_template_renders_the_expected_prompt(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    prompt = tokenizer.apply_chat_template(messages)
    assert prompt == (
        "<|begin_of_text|><|system|>\nBe brief.<|end_of_text|>\n"
        "<|user|>\nWhat is 2+2?<|end_of_text|>\n<|assistant|>\n"
    )
    without_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert without_prompt == prompt.removesuffix("<|assistant|>\n")
    assert tokenizer.encode(prompt)[:2] == [tokenizer.bos_token_id, 4]  # BOS, <|system|>
    with pytest.raises(jinja2.TemplateError, match="not tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}])


def test_chat_template_renders_as_transformers_does(tmp_path, llama_dir):
    """A template using what real ones use: whitespace control, tojson (no ASCII or HTML
    escaping), loop controls, raise_exception, namespaces, eos_token, a {% generation %} block."""
    model_dir = tmp_path / "model"
    shutil.copytree(llama_dir, model_dir)
    (model_dir / "chat_template.jinja").write_text(
        "{%- set ns = namespace(count=0) %}\n"
        "{%- for message in messages %}\n"
        "    {%- if message.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}\n"
        "    {%- if message.role == 'system' %}{% continue %}{% endif %}\n"
        "    {%- set ns.count = ns.count + 1 %}\n"
        "    {{ ns.count }}: {{ message | tojson }}\n"
        "    {%- if message.role == 'assistant' %}{% generation %}{{ message.content }}"
        "{% endgeneration %}{{ eos_token }}{% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}\n<|assistant|>\n{% endif %}"
    )
    messages = [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": "Ça va? <b>&</b> 🦊"},
        {"role": "assistant", "content": "Oui."},
    ]
    ours = Tokenizer.from_dir(model_dir)
    reference = transformers.AutoTokenizer.from_pretrained(model_dir)
    for add_generation_prompt in (True, False):
        expected = reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert ours.apply_chat_template(messages, add_generation_prompt) == expected
    assert '"Ça va? <b>&</b> 🦊"' in expected


def test_no_chat_template_is_a_clear_error(tmp_path, llama_dir):
    model_dir = tmp_path / "model"
    shutil.copytree(llama_dir, model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_dir(model_dir).apply_chat_template([{"role": "user", "content": "hi"}])


def test_incremental_detokenizer_streams_exactly_the_decoded_text(tokenizer):
    ids = tokenizer.encode(TEXTS[1]) + list(tokenizer.eos_token_ids) + tokenizer.encode(TEXTS[0])
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add(token) for token in ids]
    assert "".join(pieces) == tokenizer.decode(ids) == TEXTS[1] + TEXTS[0]
    assert not any("\ufffd" in piece for piece in pieces)
    # the byte-level vocabulary splits emoji over several tokens: some steps had to wait
    assert pieces.count("") >= 3


# --- tiny models ------------------------------------------------------------------------------


def test_tiny_models_are_deterministic_per_seed(tmp_path):
    first = make_tiny_model(tmp_path / "a", "qwen2", seed=7, shards=2)
    second = make_tiny_model(tmp_path / "b", "qwen2", seed=7, shards=2)
    other_seed = make_tiny_model(tmp_path / "c", "qwen2", seed=8, shards=2)
    names = sorted(path.name for path in first.iterdir())
    assert names == sorted(path.name for path in second.iterdir())
    assert "tokenizer.json" in names and "generation_config.json" in names
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    shard = "model-00001-of-00002.safetensors"
    assert (first / shard).read_bytes() != (other_seed / shard).read_bytes()
    assert 400 <= Tokenizer.from_dir(first).vocab_size <= 512


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("tie_word_embeddings", [False, True])
def test_transformers_loads_tiny_models(tmp_path, architecture, tie_word_embeddings):
    model_dir = make_tiny_model(
        tmp_path, architecture, seed=3, shards=2, tie_word_embeddings=tie_word_embeddings
    )
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, output_loading_info=True
    )
    assert type(model).__name__ == ModelConfig.from_dir(model_dir).architecture
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    stored = load_state_dict(model_dir, torch.float32, "cpu")
    assert torch.equal(
        model.model.layers[1].self_attn.k_proj.weight,
        stored["model.layers.1.self_attn.k_proj.weight"],
    )
    lm_head = stored["model.embed_tokens.weight" if tie_word_embeddings else "lm_head.weight"]
    assert torch.equal(model.lm_head.weight, lm_head)
    ids = Tokenizer.from_dir(model_dir).encode(TEXTS[0], add_special_tokens=True)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size)
    assert torch.isfinite(logits).all() and logits.std() > 0.5  # not a near-uniform output


def keys_for_mass(model_dir, target_mass: float, seq_len: int = 200) -> float:
    """Mean share of the keys a query needs to cover target_mass of its attention, over the
    heads, layers and the last 20 queries of a random prompt, as transformers computes it."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation="eager"
    )
    ids = torch.randint(5, 400, (1, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    weights = torch.stack(attentions)[:, 0, :, -20:, :]  # [layers, heads, queries, keys]
    ordered = weights.sort(dim=-1, descending=True).values.cumsum(dim=-1)
    needed = (ordered < target_mass).sum(dim=-1) + 1
    return (needed.float() / seq_len).mean().item()


def test_sparse_attention_concentrates_the_attention_mass(tmp_path):
    flat = keys_for_mass(make_tiny_model(tmp_path / "flat", seed=5), 0.9)
    sparse = keys_for_mass(make_tiny_model(tmp_path / "sparse", seed=5, sparse_attention=True), 0.9)
    assert flat > 0.4 and sparse < 0.1


def test_default_model_is_built_once_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TACTIC_SERVER_CACHE", str(tmp_path))
    model_dir = ensure_default_model()
    assert model_dir == default_model_dir() and model_dir.parent == tmp_path
    assert DEFAULT_MODEL_NAME in model_dir.name
    assert list(tmp_path.iterdir()) == [model_dir]  # no staging folder left behind
    written = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert ensure_default_model() == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == written
    assert sum(path.stat().st_size for path in model_dir.iterdir()) < 10 * 2**20
    config = ModelConfig.from_dir(model_dir)
    assert (
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    ) == (4, 256, 8, 2, 32)
    assert config.rope_scaling["rope_type"] == "llama3"
    assert Tokenizer.from_dir(model_dir).apply_chat_template([{"role": "user", "content": "hi"}])
