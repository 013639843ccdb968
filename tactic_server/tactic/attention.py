"""Decode attention in plain torch: exact scores, dense attention, and sparse attention over a
selection. This is the function the Triton kernels must match."""

from __future__ import annotations

import math

import torch

from .plan import SelectionPlan


def grouped_scores(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Scaled scores q.k / sqrt(d) in float32, [H_kv, group, seq_len] for query [H_q, d] and
    keys [seq_len, H_kv, d]; query head h belongs to KV head h // group."""
    num_kv_heads, dim = keys.shape[1], keys.shape[2]
    grouped_query = query.float().reshape(num_kv_heads, -1, dim)
    return torch.einsum("hgd,nhd->hgn", grouped_query, keys.float()) / math.sqrt(dim)


def attention_probabilities(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Exact softmax attention weights [H_q, seq_len] in float32."""
    scores = grouped_scores(query, keys)
    return torch.softmax(scores, dim=-1).reshape(query.shape[0], -1)


def dense_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Exact attention output [H_q, d_v] in float32."""
    num_kv_heads = keys.shape[1]
    weights = attention_probabilities(query, keys).reshape(num_kv_heads, -1, keys.shape[0])
    output = torch.einsum("hgn,nhd->hgd", weights, values.float())
    return output.reshape(query.shape[0], -1)


def sparse_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, plan: SelectionPlan
) -> torch.Tensor:
    """Attention restricted to each KV head's selected positions, softmax renormalised over the
    selection; output [H_q, d_v] float32. An empty selection gives a zero output."""
    num_kv_heads, dim = keys.shape[1], keys.shape[2]
    grouped_query = query.float().reshape(num_kv_heads, -1, dim)
    outputs = []
    for head, positions in enumerate(plan.indices):
        selected_keys = keys[positions, head].float()
        selected_values = values[positions, head].float()
        scores = grouped_query[head] @ selected_keys.T / math.sqrt(dim)
        weights = torch.softmax(scores, dim=-1) if positions.numel() else scores
        outputs.append(weights @ selected_values)
    return torch.cat(outputs, dim=0)
