"""The embedded engine's attention backend: what one step's layers read (StepContext, planned once
by the runner) and the attention module every model file wires its layers to. Decodes the
kernels can run go through the shared Tactic decoder (tactic_server.decode); prefill, and every
decode without the kernels (CPU, the evaluation's baselines), run here in torch over the same
cluster store. A sliding-window layer (Gemma 3's local layers) attends densely to the last
`window` positions, itself included, in prefill and decode; Tactic selects on the other layers
only, whose clusters are the store's (a sliding layer has none). Its KV stays full length."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tactic_server.kernels.decode_attention import sparse_decode
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from tactic_server.decode import ClusterSide, DecodePlan, TacticDecoder
from tactic_server.decode.decoder import DenseRows
from tactic_server.tactic.attention import sparse_attention
from tactic_server.tactic.baselines import plan_baseline
from tactic_server.tactic.clustering import ClusterIndex
from tactic_server.tactic.selection import plan_tactic

from .sequence import Sequence


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
    # a torch-path Tactic decode's clustered segments in the store, found once for all layers
    segments: torch.Tensor | None = None

    @property
    def is_decode(self) -> bool:
        return self.end - self.start == 1 and self.start > 0

    @property
    def selects(self) -> bool:
        return self.is_decode and self.sequence.request.tactic.selects


@dataclass
class StepContext:
    """What attention needs in one step: the slot of every row's new KV (new_slots, in row
    order), the pool, and how each slice attends. `plan` holds the decodes the kernels run (the
    shared decoder's plan); `torch_slices` everything else, whose selections add their
    statistics per layer to `torch_attended` / `torch_mass` (device tensors, read once when the
    step ends). `window_plan`: the rows of `plan`'s decodes over their last `window` positions,
    which the kernels read on sliding-window layers."""

    slices: list[SequenceSlice]
    k_cache: list[torch.Tensor]
    v_cache: list[torch.Tensor]
    new_slots: torch.Tensor
    side: ClusterSide
    decoder: TacticDecoder
    req_to_token: torch.Tensor
    plan: DecodePlan | None = None
    window_plan: DenseRows | None = None
    torch_slices: list[SequenceSlice] = field(default_factory=list)
    torch_attended: list[list[torch.Tensor]] = field(default_factory=list)  # per layer, slice
    torch_mass: list[list[torch.Tensor]] = field(default_factory=list)

    @property
    def torch_selecting(self) -> list[SequenceSlice]:
        return [part for part in self.torch_slices if part.selects]


def empty_index(num_kv_heads: int, head_dim: int, seq_len: int, device) -> ClusterIndex:
    """An index with no clusters: every position is tail, scored exactly."""
    long = dict(dtype=torch.long, device=device)
    return ClusterIndex(
        seq_len=seq_len,
        clustered_len=0,
        centroids=torch.zeros(num_kv_heads, 0, head_dim, device=device),
        variances=torch.zeros(num_kv_heads, 0, 1, device=device),
        cluster_sizes=torch.zeros(num_kv_heads, 0, **long),
        cluster_offsets=torch.zeros(num_kv_heads, 1, **long),
        token_positions=torch.zeros(num_kv_heads, 0, **long),
        token_cluster=torch.zeros(num_kv_heads, 0, **long),
    )


class PagedAttention(nn.Module):
    """Attention of one layer over the paged KV: writes the step's new K and V, then attends
    each row as the step's context says (q, k, v [rows, heads, d] after RoPE, scores scaled by
    1/sqrt(d)). window: the positions a sliding-window layer sees (None: all of them);
    cluster_layer: this layer's place among the cluster store's layers (default: layer)."""

    def __init__(self, layer: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 window: int | None = None, cluster_layer: int | None = None) -> None:  # fmt: skip
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.window = window
        self.cluster_layer = layer if cluster_layer is None else cluster_layer

    def forward(self, q, k, v, context: StepContext) -> torch.Tensor:
        k_cache, v_cache = context.k_cache[self.layer], context.v_cache[self.layer]
        k_cache[context.new_slots] = k.to(k_cache.dtype)
        v_cache[context.new_slots] = v.to(v_cache.dtype)
        out = torch.empty_like(q)
        attended, mass = [], []
        for part in context.torch_slices:
            new = slice(part.row, part.row + part.end - part.start)
            if self.window is not None:
                first = max(0, part.start - self.window + 1)
                keys, values = k_cache[part.slots[first:]], v_cache[part.slots[first:]]
                out[new] = self._causal(q[new], keys, values, part.start, first)
                continue
            keys, values = k_cache[part.slots], v_cache[part.slots]
            if not part.is_decode and context.side.query_moments is not None:
                # a prompt's queries, which its segments are clustered by (query_weighted)
                slots = torch.full((part.end - part.start,), part.sequence.request_slot,
                                   device=q.device)  # fmt: skip
                context.side.record_queries(self.cluster_layer, q[new], slots)
            if part.selects:
                plan = self._select(q[new][0], keys, part, context)
                out[new] = sparse_attention(q[new][0], keys, values, plan).to(q.dtype)
                attended.append(plan.selected_counts.float().mean())
                mass.append(plan.estimated_mass.mean())
            else:
                out[new] = self._causal(q[new], keys, values, part.start, 0)
        if attended:
            context.torch_attended.append(attended)
            context.torch_mass.append(mass)
        if context.plan is not None and self.window is not None:
            rows = context.window_plan
            queries = q[rows.rows].to(k_cache.dtype).contiguous()
            out[rows.rows] = sparse_decode(queries, k_cache, v_cache, rows.indptr, rows.indices,
                                           rows.max_seq_len).to(q.dtype)  # fmt: skip
        elif context.plan is not None:
            context.decoder.attend(context.plan, q, k_cache, v_cache, self.cluster_layer, out=out)
        return out

    def _select(self, query, keys, part: SequenceSlice, context: StepContext):
        """The torch reference of the kernels' selection, over the same cluster store (or a
        baseline of the evaluation)."""
        params = part.sequence.request.tactic
        if params.method != "tactic":
            return plan_baseline(params.method, query, keys, params.target, params.budget)
        index = context.side.cluster_index(self.cluster_layer, part.segments, part.end)
        if index is None:
            index = empty_index(self.num_kv_heads, self.head_dim, part.end, keys.device)
        return plan_tactic(query, keys, params.target, index, context.side.config)

    def _causal(self, q, keys, values, start: int, first: int) -> torch.Tensor:
        """Dense attention of the new positions start.. over the keys of positions first..
        that each sees: every one up to itself, or within the layer's window."""
        new, context_len = q.shape[0], keys.shape[0]
        queries = q.transpose(0, 1)[None]
        keys = keys.transpose(0, 1)[None].to(q.dtype)
        values = values.transpose(0, 1)[None].to(q.dtype)
        if q.is_cuda and self.window is None:  # a fused kernel (no mask tensor); it wants the
            group = self.num_heads // self.num_kv_heads  # heads of K/V repeated
            keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
            out = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=causal_lower_right(new, context_len)
            )
            return out[0].transpose(0, 1)
        key_positions = first + torch.arange(context_len, device=q.device)[None, :]
        query_positions = start + torch.arange(new, device=q.device)[:, None]
        visible = key_positions <= query_positions
        if self.window is not None:
            visible &= key_positions > query_positions - self.window
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=visible,
                                             enable_gqa=True)  # fmt: skip
        return out[0].transpose(0, 1)
