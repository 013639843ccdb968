"""Gemma 3, text only (Gemma3ForCausalLM: google/gemma-3-270m, -1b): the whole model in one file,
its layers wired to the engine's paged attention as the Llama family's are. Where it differs
from Llama: embeddings are scaled by sqrt(hidden_size); every RMSNorm scales by (1 + weight);
each layer normalises both before and after its attention and its MLP; q and k are
RMS-normalised per head before RoPE; the MLP is gated by tanh-approximated GELU; sliding layers
see only the last sliding_window positions and rotate with their own RoPE base; scores are
scaled by 1/sqrt(query_pre_attn_scalar)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import PagedAttention, StepContext
from ..model_config import ModelConfig, rope_cos_sin, rope_inverse_frequencies
from .llama import rotate_half


class RMSNorm(nn.Module):
    """Gemma's: in float32, scaled by (1 + weight), so a zero weight is the identity."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.sliding = layer in config.sliding_layers
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        # paged attention scales scores by 1/sqrt(head_dim), Gemma by 1/sqrt(query_pre_attn_scalar)
        self.query_scale = (self.head_dim / config.query_pre_attn_scalar) ** 0.5
        self.attn = PagedAttention(
            layer, self.num_heads, self.num_kv_heads, self.head_dim,
            window=config.sliding_window if self.sliding else None,
            cluster_layer=None if self.sliding else config.global_layers.index(layer),
        )  # fmt: skip

    def forward(self, x, rotary, context: StepContext) -> torch.Tensor:
        """rotary: (cos, sin) of the full layers, then of the sliding ones."""
        cos, sin = rotary[self.sliding]
        rows = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(rows, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(rows, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(rows, self.num_kv_heads, self.head_dim)
        q = q * cos[:, None] + rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + rotate_half(k) * sin[:, None]
        if self.query_scale != 1.0:
            q = q * self.query_scale
        return self.o_proj(self.attn(q, k, v, context).reshape(rows, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(size, eps)
        self.post_attention_layernorm = RMSNorm(size, eps)
        self.pre_feedforward_layernorm = RMSNorm(size, eps)
        self.post_feedforward_layernorm = RMSNorm(size, eps)

    def forward(self, x, rotary, context):
        attended = self.self_attn(self.input_layernorm(x), rotary, context)
        x = x + self.post_attention_layernorm(attended)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Gemma3ForCausalLM(nn.Module):
    """Parameter names follow Hugging Face's, so a checkpoint's state dict loads as it is."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)
        self.register_buffer("local_inv_freq", rope_inverse_frequencies(config, local=True),
                             persistent=False)  # fmt: skip

    def reset_rotary(self, device) -> None:
        """The RoPE frequencies of the full and the sliding layers, computed again on device
        (a model built on the meta device has none)."""
        self.inv_freq = rope_inverse_frequencies(self.config).to(device)
        self.local_inv_freq = rope_inverse_frequencies(self.config, local=True).to(device)

    @torch.inference_mode()
    def forward(self, input_ids, positions, context: StepContext, logit_rows) -> torch.Tensor:
        """Logits [len(logit_rows), vocab] for the rows whose next token is wanted."""
        dtype = self.lm_head.weight.dtype
        rotary = (rope_cos_sin(positions, self.inv_freq, dtype),
                  rope_cos_sin(positions, self.local_inv_freq, dtype))  # fmt: skip
        x = self.model.embed_tokens(input_ids)
        # the scale is rounded to the weights' dtype, as transformers rounds it
        x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)
        for layer in self.model.layers:
            x = layer(x, rotary, context)
        logits = self.lm_head(self.model.norm(x[logit_rows])).float()
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
