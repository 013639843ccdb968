"""What the engine needs from a Hugging Face checkpoint's config.json (and generation_config.json),
validated against what our model files support (the Llama family, Gemma 3), and the rotary
embeddings it implies."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "Gemma3ForCausalLM",
)  # fmt: skip
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# transformers' defaults where a config.json leaves a key out
DEFAULT_ROPE_THETA = 10_000.0
DEFAULT_SLIDING_WINDOW = 4096  # Mistral and Qwen2
DEFAULT_QWEN2_MAX_WINDOW_LAYERS = 28
# Gemma3TextConfig's defaults, for the keys a saved config.json may leave out (save_pretrained
# drops tie_word_embeddings=True, the base class's default too)
GEMMA3_DEFAULTS = {
    "tie_word_embeddings": True,
    "hidden_activation": "gelu_pytorch_tanh",
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "sliding_window_pattern": 6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 131_072,
}
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class ModelConfig:
    """rope_scaling is None (plain RoPE) or a dict with its "rope_type" ("linear" or "llama3") and
    that type's parameters. attention_bias: q/k/v projections have a bias (always for Qwen2).
    torch_dtype is the checkpoint's dtype name ("bfloat16", ...) or None where unstated.
    sliding_window: the keys a sliding layer's query sees, itself included (transformers'
    convention: position p sees p - sliding_window + 1 .. p), for the layers in sliding_layers;
    None where no window binds. Gemma 3's sliding layers rotate with their own RoPE base,
    local_rope_theta (no scaling); its scores are q.k / sqrt(query_pre_attn_scalar)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    sliding_window: int | None
    torch_dtype: str | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    hidden_act: str = "silu"
    sliding_layers: tuple[int, ...] = ()
    local_rope_theta: float | None = None
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None

    @property
    def global_layers(self) -> tuple[int, ...]:
        """The layers that attend to every position: those Tactic selects on."""
        return tuple(i for i in range(self.num_hidden_layers) if i not in self.sliding_layers)

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        model_dir = Path(path)
        config_file = model_dir / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in {model_dir}")
        raw = json.loads(config_file.read_text())
        architecture = _architecture(raw)
        if architecture == "Gemma3ForCausalLM":
            raw = GEMMA3_DEFAULTS | raw
            family = _gemma3(raw)
        else:
            family = _llama_family(raw, architecture)
        num_heads = raw["num_attention_heads"]
        num_kv_heads = raw.get("num_key_value_heads") or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_attention_heads {num_heads} is not a multiple of "
                f"num_key_value_heads {num_kv_heads}"
            )
        max_positions = raw.get("max_position_embeddings", 2048)
        rope_theta, rope_scaling = _rope(family.pop("full_rope", raw), max_positions)
        generation = read_generation_config(model_dir)
        return cls(
            architecture=architecture,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_positions,
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            attention_bias=architecture == "Qwen2ForCausalLM" or raw.get("attention_bias", False),
            # transformers 5 writes "dtype", earlier versions "torch_dtype"
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            bos_token_id=_first_set(generation.get("bos_token_id"), raw.get("bos_token_id")),
            eos_token_ids=eos_token_ids(model_dir),
            **family,
        )


def _llama_family(raw: dict, architecture: str) -> dict[str, Any]:
    """Llama, Qwen2 and Mistral: checked against what models/llama.py runs (no window binds)."""
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {raw['hidden_act']!r} is not supported (only silu)")
    if raw.get("mlp_bias", False):
        raise ValueError("mlp_bias is not supported")
    sliding_window = _sliding_window(raw, architecture)
    max_positions = raw.get("max_position_embeddings", 2048)
    if sliding_window is not None and sliding_window < max_positions:
        raise ValueError(
            f"sliding-window attention is not supported (window {sliding_window} < "
            f"max_position_embeddings {max_positions})"
        )
    return {"sliding_window": sliding_window}


def _gemma3(raw: dict) -> dict[str, Any]:
    """Gemma 3's own fields, checked: its layer types (from layer_types, or every
    sliding_window_pattern-th layer full as older configs say), the RoPE of each type (from
    transformers 5's rope_parameters per layer type, or rope_theta / rope_scaling and
    rope_local_base_freq), and its scalars. "full_rope" is what _rope reads for full layers."""
    activation = raw.get("hidden_activation") or raw.get("hidden_act")
    if activation != "gelu_pytorch_tanh":
        raise ValueError(f"hidden_activation {activation!r} is not supported (gelu_pytorch_tanh)")
    for refused in ("attn_logit_softcapping", "use_bidirectional_attention"):
        if raw.get(refused):
            raise ValueError(f"{refused} is not supported")
    layers = raw["num_hidden_layers"]
    pattern = raw["sliding_window_pattern"]
    layer_types = raw.get("layer_types") or [
        FULL if (i + 1) % pattern == 0 else SLIDING for i in range(layers)
    ]
    unknown = set(layer_types) - {SLIDING, FULL}
    if unknown or len(layer_types) != layers:
        raise ValueError(f"layer_types {layer_types} must name {layers} layers, each "
                         f"{SLIDING!r} or {FULL!r}")  # fmt: skip
    parameters = raw.get("rope_parameters") or {}
    if FULL in parameters:
        full_rope = {"rope_parameters": parameters[FULL]}
        local_theta, local_scaling = _rope(
            {"rope_parameters": parameters[SLIDING]}, raw["max_position_embeddings"]
        )
        if local_scaling is not None:
            raise ValueError("RoPE scaling on sliding layers is not supported")
    else:
        full_rope, local_theta = raw, float(raw["rope_local_base_freq"])
    return {
        "hidden_act": activation,
        "sliding_window": raw["sliding_window"],
        "sliding_layers": tuple(i for i, kind in enumerate(layer_types) if kind == SLIDING),
        "local_rope_theta": local_theta,
        "query_pre_attn_scalar": float(raw["query_pre_attn_scalar"]),
        "final_logit_softcapping": raw.get("final_logit_softcapping"),
        "full_rope": full_rope,
    }


def read_generation_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "generation_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def eos_token_ids(model_dir: str | Path) -> tuple[int, ...]:
    """The end-of-sequence ids of a checkpoint: generation_config.json's where it names any (as
    transformers' generate() does), else config.json's; an int or a list in either."""
    config_file = Path(model_dir) / "config.json"
    raw = json.loads(config_file.read_text()) if config_file.is_file() else {}
    eos = _first_set(read_generation_config(model_dir).get("eos_token_id"), raw.get("eos_token_id"))
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (eos,)


def _first_set(*values):
    return next((value for value in values if value is not None), None)


def _architecture(raw: dict) -> str:
    architectures = raw.get("architectures") or []
    supported = [name for name in architectures if name in SUPPORTED_ARCHITECTURES]
    if not supported:
        named, known = ", ".join(architectures) or "none", ", ".join(SUPPORTED_ARCHITECTURES)
        raise ValueError(f"architecture {named} is not supported; supported: {known}")
    return supported[0]


def _rope(raw: dict, max_positions: int) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and the scaling, from the old keys (rope_theta, rope_scaling) or from
    transformers 5's rope_parameters, which holds both."""
    parameters = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
    rope_theta = _first_set(raw.get("rope_theta"), parameters.get("rope_theta"), DEFAULT_ROPE_THETA)
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope scaling {rope_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    rope_theta = float(rope_theta)
    if rope_type == "default":
        return rope_theta, None
    if rope_type == "linear":
        return rope_theta, {"rope_type": "linear", "factor": float(parameters["factor"])}
    return rope_theta, {
        "rope_type": "llama3",
        "factor": float(parameters["factor"]),
        "low_freq_factor": float(parameters["low_freq_factor"]),
        "high_freq_factor": float(parameters["high_freq_factor"]),
        "original_max_position_embeddings": int(
            parameters.get("original_max_position_embeddings", max_positions)
        ),
    }


def _sliding_window(raw: dict, architecture: str) -> int | None:
    """The attention window transformers would apply, or None where every layer is full."""
    if architecture == "MistralForCausalLM":
        return raw.get("sliding_window", DEFAULT_SLIDING_WINDOW)
    if architecture == "Qwen2ForCausalLM" and raw.get("use_sliding_window", False):
        window = raw.get("sliding_window", DEFAULT_SLIDING_WINDOW)
        layer_types = raw.get("layer_types")
        if layer_types is not None:
            slides = "sliding_attention" in layer_types
        else:
            first_sliding = raw.get("max_window_layers", DEFAULT_QWEN2_MAX_WINDOW_LAYERS)
            slides = first_sliding < raw["num_hidden_layers"]
        return window if slides else None
    return None


def rope_inverse_frequencies(config: ModelConfig, local: bool = False) -> torch.Tensor:
    """[head_dim / 2] float32: the rotary frequency of each pair of dimensions, as transformers
    computes it for plain, "linear" and "llama3" RoPE; local: that of Gemma 3's sliding layers
    (plain RoPE of base local_rope_theta)."""
    dim = config.head_dim
    theta = config.local_rope_theta if local else config.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (theta**exponents)
    scaling = None if local else config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: long wavelengths are divided by factor, short ones kept, those between blended
    original_context = scaling["original_max_position_embeddings"]
    low_freq_factor, high_freq_factor = scaling["low_freq_factor"], scaling["high_freq_factor"]
    low_freq_wavelen = original_context / low_freq_factor
    high_freq_wavelen = original_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [len(positions), head_dim] in transformers' rotate_half layout (the angles
    repeated over both halves), computed in float32 and then cast, as transformers does."""
    angles = positions.float()[:, None] * inv_freq.float()[None, :]  # [n, head_dim / 2]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)
