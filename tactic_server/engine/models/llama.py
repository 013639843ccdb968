"""The Llama family (Llama 3.x, Qwen2/2.5 with q/k/v bias, Mistral) with paged KV and Tactic
decode attention: the whole model in one file, the per-step attention metadata in one context."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tactic_server.kernels.decode_attention import sparse_decode
from tactic_server.kernels.selection import select_rows
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from tactic_server.tactic.attention import sparse_attention
from tactic_server.tactic.baselines import plan_baseline
from tactic_server.tactic.clustering import ClusterIndex
from tactic_server.tactic.config import TacticConfig
from tactic_server.tactic.selection import plan_tactic

from ..kv_pool import KVPool
from ..model_config import ModelConfig, rope_cos_sin, rope_inverse_frequencies
from ..sequence import Sequence


@dataclass
class SequenceSlice:
    """Positions [start, end) of one sequence are rows [row, row + end - start) of the batch;
    slots [end] holds the KV slot of every position up to end (on the device for the slices
    attention runs in torch; the kernels read req_to_token instead)."""

    sequence: Sequence
    start: int
    end: int
    row: int
    slots: torch.Tensor

    @property
    def is_decode(self) -> bool:
        return self.end - self.start == 1 and self.start > 0


@dataclass
class KernelDecodes:
    """Decodes of one step done by the Triton kernels, one request per slice, in the kernels'
    layout; built once per step and shared by every layer."""

    slices: list[SequenceSlice]
    rows: torch.Tensor  # [n] int64, the slices' rows in the step's batch
    seq_lens: torch.Tensor  # [n] int32
    max_seq_len: int


@dataclass
class TacticDecodes(KernelDecodes):
    """Inputs of select_rows; selections collects each layer's CSR indptr and estimated mass
    (device tensors), summarised once after the step by layer_sums."""

    pool_indices: torch.Tensor  # [n] int32, 0..n-1: request i is row i of req_to_token
    req_to_token: torch.Tensor  # [n, max_seq_len] int32
    req_to_segment: torch.Tensor  # [n, max_segments] int32 ClusterPool slots
    clustered_segments: torch.Tensor  # [n] int32
    targets: torch.Tensor  # [n] float32
    selections: list[tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=list)

    def layer_sums(self) -> list[list[float]]:
        """Per request, sums over the layers of the selected ratio, the estimated mass and the
        attended tokens (each a mean over KV heads): one host read for the whole step."""
        indptr = torch.stack([indptr for indptr, _ in self.selections])  # [L, n * H_kv + 1]
        lengths = (indptr[:, 1:] - indptr[:, :-1]).view(len(self.selections), len(self.slices), -1)
        attended = lengths.float().mean(dim=2)  # [L, n]
        mass = torch.stack([mass for _, mass in self.selections]).mean(dim=2)  # [L, n]
        ratio = attended / self.seq_lens.float()
        return torch.stack([ratio.sum(0), mass.sum(0), attended.sum(0)], dim=1).tolist()


@dataclass
class DenseDecodes(KernelDecodes):
    """Every position of every KV head as CSR rows (dense_rows): dense decode by sparse_decode."""

    indptr: torch.Tensor
    indices: torch.Tensor


@dataclass
class AttentionContext:
    """What attention needs in one step: the slot of every row's new KV (new_slots, in row
    order), where each sequence's rows and KV are, and which decodes the kernels do; the
    slices in torch_slices run through torch (prefill, and everything without the kernels)."""

    slices: list[SequenceSlice]
    pool: KVPool
    tactic: TacticConfig
    new_slots: torch.Tensor
    tactic_decodes: TacticDecodes | None = None
    dense_decodes: DenseDecodes | None = None

    @property
    def torch_slices(self) -> list[SequenceSlice]:
        kernels = [d for d in (self.tactic_decodes, self.dense_decodes) if d is not None]
        done = {id(part) for decodes in kernels for part in decodes.slices}
        return [part for part in self.slices if id(part) not in done]


def empty_index(num_kv_heads: int, head_dim: int, seq_len: int, device) -> ClusterIndex:
    """An index with no clusters: every position is tail, scored exactly."""
    long = dict(dtype=torch.long, device=device)
    return ClusterIndex(
        seq_len=seq_len,
        clustered_len=0,
        centroids=torch.zeros(num_kv_heads, 0, head_dim, device=device),
        spreads=torch.zeros(num_kv_heads, 0, device=device),
        cluster_sizes=torch.zeros(num_kv_heads, 0, **long),
        cluster_offsets=torch.zeros(num_kv_heads, 1, **long),
        token_positions=torch.zeros(num_kv_heads, 0, **long),
        token_cluster=torch.zeros(num_kv_heads, 0, **long),
    )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, context: AttentionContext) -> torch.Tensor:
        rows = x.shape[0]
        q = self.q_proj(x).view(rows, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(rows, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(rows, self.num_kv_heads, self.head_dim)
        q = q * cos[:, None] + rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + rotate_half(k) * sin[:, None]
        k_cache, v_cache = context.pool.k[self.layer], context.pool.v[self.layer]
        k_cache[context.new_slots] = k.to(k_cache.dtype)
        v_cache[context.new_slots] = v.to(v_cache.dtype)
        out = torch.empty_like(q)
        for part in context.torch_slices:
            new = slice(part.row, part.row + part.end - part.start)
            keys, values = k_cache[part.slots], v_cache[part.slots]
            tactic = part.sequence.request.tactic
            if part.is_decode and tactic.selects:
                out[new] = self._tactic(q[new][0], keys, values, part, context).to(q.dtype)
            else:
                out[new] = self._causal(q[new], keys, values, part.start)
        if context.tactic_decodes is not None:
            self._tactic_kernels(q, out, k_cache, v_cache, context)
        if (dense := context.dense_decodes) is not None:
            queries = q[dense.rows].to(k_cache.dtype).contiguous()
            out[dense.rows] = sparse_decode(queries, k_cache, v_cache, dense.indptr, dense.indices,
                                            dense.max_seq_len).to(out.dtype)  # fmt: skip
        return self.o_proj(out.reshape(rows, -1))

    def _tactic_kernels(self, q, out, k_cache, v_cache, context: AttentionContext) -> None:
        """All of the step's Tactic decodes of this layer at once: select_rows, sparse_decode;
        the statistics stay on the device until the step ends (no sync per layer)."""
        batch = context.tactic_decodes
        rows = batch.rows
        queries = q[rows].to(k_cache.dtype).contiguous()
        pool = dataclasses.replace(context.pool.segment_pools[self.layer],
                                   req_to_segment=batch.req_to_segment)  # fmt: skip
        selected = select_rows(
            queries, k_cache, pool, batch.req_to_token, batch.pool_indices, batch.seq_lens,
            batch.targets, batch.max_seq_len, context.tactic, batch.clustered_segments,
        )  # fmt: skip
        out[rows] = sparse_decode(queries, k_cache, v_cache, selected.indptr, selected.indices,
                                  batch.max_seq_len).to(out.dtype)  # fmt: skip
        batch.selections.append((selected.indptr, selected.estimated_mass))

    def _causal(self, q, keys, values, start: int) -> torch.Tensor:
        """Dense attention of the new positions start.. over the context up to each of them."""
        new, context_len = q.shape[0], keys.shape[0]
        queries = q.transpose(0, 1)[None]
        keys = keys.transpose(0, 1)[None].to(q.dtype)
        values = values.transpose(0, 1)[None].to(q.dtype)
        if q.is_cuda:  # a fused kernel (no mask tensor); it wants the heads of K/V repeated
            group = self.num_heads // self.num_kv_heads
            keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
            out = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=causal_lower_right(new, context_len)
            )
            return out[0].transpose(0, 1)
        visible = torch.arange(context_len, device=q.device)[None, :] <= (
            start + torch.arange(new, device=q.device)[:, None]
        )
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=visible,
                                             enable_gqa=True)  # fmt: skip
        return out[0].transpose(0, 1)

    def _tactic(self, query, keys, values, part: SequenceSlice, context: AttentionContext):
        sequence, seq_len = part.sequence, part.end
        index = sequence.cluster_index(self.layer, seq_len)
        if index is None:
            index = empty_index(self.num_kv_heads, self.head_dim, seq_len, keys.device)
        params = sequence.request.tactic
        if params.method == "tactic":
            plan = plan_tactic(query, keys, params.target, index, context.tactic)
        else:
            plan = plan_baseline(params.method, query, keys, params.target, params.budget)
        counts = plan.selected_counts.float()
        sequence.tally.add(
            selected_ratio=counts.mean().item() / seq_len,
            estimated_mass=plan.estimated_mass.mean().item(),
            attended_tokens=counts.mean().item(),
        )
        return sparse_attention(query, keys, values, plan)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, context):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, context)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Parameter names follow Hugging Face's, so a checkpoint's state dict loads as it is."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)

    @torch.inference_mode()
    def forward(self, input_ids, positions, context: AttentionContext, logit_rows) -> torch.Tensor:
        """Logits [len(logit_rows), vocab] for the rows whose next token is wanted."""
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.lm_head.weight.dtype)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, context)
        x = self.model.norm(x[logit_rows])
        return self.lm_head(x).float()
