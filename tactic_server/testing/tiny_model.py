"""Tiny random Llama, Qwen2 and Mistral checkpoints written as real Hugging Face files (config,
safetensors, byte-level BPE tokenizer, chat template): the models tests, benchmarks and load runs
make, and the default model where an install left the bundled one out."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from tactic_server.models import cache_root
from tactic_server.training.tokenizer import BOS_TOKEN, EOS_TOKEN, train_tokenizer, write_tokenizer

DEFAULT_MODEL_NAME = "tactic-tiny-random"
# bump when the default model's recipe changes, so that cached copies are rebuilt
DEFAULT_MODEL_VERSION = 1
# the shape of the tiny model with peaked attention that the default model, the equality
# benchmarks, the GPU serve test and the load runs share (make_tiny_model(..., **PEAKED_LLAMA))
PEAKED_LLAMA = dict(num_layers=4, hidden_size=256, num_heads=8, num_kv_heads=2, head_dim=32,
                    intermediate_size=512, sparse_attention=True)  # fmt: skip

# name -> (the architecture in config.json, its model_type)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "mistral": ("MistralForCausalLM", "mistral"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Multiplies the q and k projections with sparse_attention: attention scores, about unit
# variance with these weights, get a standard deviation of about GAIN**2 (4), and 90% of a
# query's mass sits on about 5% of 200 keys. The keys are random (nothing for clusters to find):
# at a gain of 3 Tactic's capped log-normal estimate still misses the peak on some heads.
SPARSE_ATTENTION_GAIN = 2.0
NORM_WEIGHT_NOISE = 0.1  # norm weights are 1 + noise, so a model that ignores them is caught
QKV_BIAS_STD = 0.5  # Qwen2's biases, large enough to matter

CORPUS = """\
The quick brown fox jumps over the lazy dog. A long context holds many documents, and a question
about one of them needs only a few of its sentences. Attention reads every token of the context;
sparse attention reads the few that carry most of the attention mass.
The server streams tokens as they are generated. Each request has a prompt, a sampling
temperature, a limit on new tokens and an optional list of stop strings.
Keys are grouped into clusters by k-means. At each decoding step the query ranks the clusters,
estimates the mass of each, and takes clusters until the estimate reaches the target.
Once upon a time there was a little model that wanted to read very long books. It could not
remember every page, so it learned to look back only at the pages that mattered.
The weather today is sunny with a light breeze from the west. Tomorrow there will be rain in the
morning and clouds in the afternoon. Please remember to bring an umbrella.
How many tokens does the answer need? Short questions have short answers; long questions may
need long answers. The model stops when it writes the end of text token.

def fibonacci(n: int) -> int:
    \"\"\"Return the n-th Fibonacci number.\"\"\"
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Scheduler:
    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch
        self.waiting: list[str] = []
        self.running: list[str] = []

    def add(self, request_id: str) -> None:
        self.waiting.append(request_id)

    def step(self) -> list[str]:
        while self.waiting and len(self.running) < self.max_batch:
            self.running.append(self.waiting.pop(0))
        return list(self.running)


import torch

def attention(query, keys, values):
    scores = query @ keys.T / keys.shape[-1] ** 0.5
    weights = torch.softmax(scores, dim=-1)
    return weights @ values

if __name__ == "__main__":
    for number in range(10):
        print(number, fibonacci(number))
"""


def make_tiny_model(
    path: str | Path,
    architecture: str = "llama",
    *,
    seed: int = 0,
    dtype: str = "float32",
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    max_position_embeddings: int = 4096,
    rope_theta: float = 10_000.0,
    rope_scaling: dict | None = None,
    tie_word_embeddings: bool = False,
    shards: int = 1,
    sparse_attention: bool = False,
) -> Path:
    """Writes a checkpoint directory at path (created if needed) and returns it. Weights are
    random with unit-variance activations, seeded: the same arguments give identical files.
    vocab_size None takes the tokenizer's; a larger one pads the embedding, as real models do."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}")
    model_dir = Path(path)
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(CORPUS.splitlines(keepends=True))
    write_tokenizer(model_dir, tokenizer, max_position_embeddings)
    tokenizer_vocab = tokenizer.get_vocab_size()
    vocab_size = vocab_size or tokenizer_vocab
    if vocab_size < tokenizer_vocab:
        raise ValueError(f"vocab_size must be at least the tokenizer's, {tokenizer_vocab}")
    architecture_name, model_type = ARCHITECTURES[architecture]
    config = {
        "architectures": [architecture_name],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim or hidden_size // num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": dtype,
        "bos_token_id": tokenizer.token_to_id(BOS_TOKEN),
        "eos_token_id": tokenizer.token_to_id(EOS_TOKEN),
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if architecture == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    elif architecture == "qwen2":
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=num_layers)
    else:
        config.update(sliding_window=None)
    _write_json(model_dir / "config.json", config)
    generation = {name: config[name] for name in ("bos_token_id", "eos_token_id")}
    _write_json(model_dir / "generation_config.json", generation)
    weights = _random_weights(config, seed, sparse_attention)
    weights = {name: tensor.to(DTYPES[dtype]).contiguous() for name, tensor in weights.items()}
    _write_safetensors(model_dir, weights, shards)
    return model_dir


def default_model_dir() -> Path:
    """Where the bundled default model lives: $TACTIC_SERVER_CACHE, else ~/.cache/tactic-server."""
    return cache_root() / f"{DEFAULT_MODEL_NAME}-v{DEFAULT_MODEL_VERSION}"


def ensure_default_model() -> Path:
    """The default model's directory, written on first use (about 5 MB): a random Llama with
    Llama 3.1's RoPE scaling and peaked attention, so Tactic has something to select."""
    model_dir = default_model_dir()
    if (model_dir / "model.safetensors").is_file():
        return model_dir
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    # build beside it and rename, so that a concurrent or interrupted build never leaves half a
    # model where the server looks
    staging = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}-", dir=model_dir.parent))
    try:
        make_tiny_model(
            staging,
            "llama",
            seed=0,
            dtype="bfloat16",
            max_position_embeddings=32768,
            rope_theta=500_000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            **PEAKED_LLAMA,
        )
        try:
            staging.rename(model_dir)
        except OSError:
            if not (model_dir / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model_dir


def _random_weights(config: dict, seed: int, sparse_attention: bool) -> dict[str, torch.Tensor]:
    """Tensors under their Hugging Face names, drawn so that every projection keeps unit
    variance (weights of std 1/sqrt(fan_in), embeddings of std 1)."""
    generator = torch.Generator().manual_seed(seed)
    hidden, head_dim = config["hidden_size"], config["head_dim"]
    q_size = config["num_attention_heads"] * head_dim
    kv_size = config["num_key_value_heads"] * head_dim
    qk_gain = SPARSE_ATTENTION_GAIN if sparse_attention else 1.0

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * std

    def linear(out_features: int, in_features: int, gain: float = 1.0) -> torch.Tensor:
        return normal(out_features, in_features, std=gain / in_features**0.5)

    def norm() -> torch.Tensor:
        return 1.0 + normal(hidden, std=NORM_WEIGHT_NOISE)

    weights = {"model.embed_tokens.weight": normal(config["vocab_size"], hidden, std=1.0)}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        weights[f"{prefix}.input_layernorm.weight"] = norm()
        projections = {
            "q_proj": (q_size, qk_gain),
            "k_proj": (kv_size, qk_gain),
            "v_proj": (kv_size, 1.0),
        }
        for name, (size, gain) in projections.items():
            weights[f"{prefix}.self_attn.{name}.weight"] = linear(size, hidden, gain)
            if config["model_type"] == "qwen2":
                weights[f"{prefix}.self_attn.{name}.bias"] = normal(size, std=QKV_BIAS_STD * gain)
        weights[f"{prefix}.self_attn.o_proj.weight"] = linear(hidden, q_size)
        weights[f"{prefix}.post_attention_layernorm.weight"] = norm()
        weights[f"{prefix}.mlp.gate_proj.weight"] = linear(config["intermediate_size"], hidden)
        weights[f"{prefix}.mlp.up_proj.weight"] = linear(config["intermediate_size"], hidden)
        weights[f"{prefix}.mlp.down_proj.weight"] = linear(hidden, config["intermediate_size"])
    weights["model.norm.weight"] = norm()
    if not config["tie_word_embeddings"]:
        weights["lm_head.weight"] = linear(config["vocab_size"], hidden)
    return weights


def _write_safetensors(model_dir: Path, weights: dict[str, torch.Tensor], shards: int) -> None:
    """model.safetensors, or `shards` files of consecutive tensors with the index transformers
    writes (model-0000i-of-0000n.safetensors, model.safetensors.index.json)."""
    if shards == 1:
        save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(weights)
    if not 1 <= shards <= len(names):
        raise ValueError(f"shards must be between 1 and the number of tensors, {len(names)}")
    weight_map = {}
    for shard in range(shards):
        file_name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        shard_names = names[shard * len(names) // shards : (shard + 1) * len(names) // shards]
        save_file(
            {name: weights[name] for name in shard_names},
            str(model_dir / file_name),
            metadata={"format": "pt"},
        )
        weight_map.update(dict.fromkeys(shard_names, file_name))
    total_size = sum(tensor.numel() * tensor.element_size() for tensor in weights.values())
    _write_json(
        model_dir / "model.safetensors.index.json",
        {"metadata": {"total_size": total_size}, "weight_map": weight_map},
    )


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
