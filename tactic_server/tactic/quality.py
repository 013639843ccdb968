"""Quality of a selection, measured against exact (dense) attention."""

from __future__ import annotations

import torch

from .attention import attention_probabilities, dense_attention, sparse_attention
from .plan import SelectionPlan


def recall(query: torch.Tensor, keys: torch.Tensor, plan: SelectionPlan) -> torch.Tensor:
    """[H_q]: the true attention mass of what each query head attends (its KV head's selection)."""
    probabilities = attention_probabilities(query, keys)
    group = query.shape[0] // keys.shape[1]
    kept = torch.zeros_like(probabilities, dtype=torch.bool)
    for head, positions in enumerate(plan.indices):
        kept[head * group : (head + 1) * group, positions] = True
    return (probabilities * kept).sum(dim=-1)


def overshoot(plans: list[SelectionPlan], oracle_plans: list[SelectionPlan]) -> float:
    """Positions read over those the oracle reads, summed over a workload (what bandwidth pays)."""
    selected = sum(plan.selected_counts.sum().item() for plan in plans)
    needed = sum(plan.selected_counts.sum().item() for plan in oracle_plans)
    return selected / needed


def output_error(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, plan: SelectionPlan
) -> torch.Tensor:
    """[H_q]: ||o_sparse - o_dense|| / ||o_dense||."""
    dense = dense_attention(query, keys, values)
    sparse = sparse_attention(query, keys, values, plan)
    return (sparse - dense).norm(dim=-1) / dense.norm(dim=-1).clamp_min(1e-30)


def error_bound(recalled: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """[H_q]: the paper's bound ||o - o_hat|| <= 2 (1 - recall) max_i ||v_i|| for attention
    renormalised over the selection (max over the query head's KV head)."""
    num_kv_heads = values.shape[1]
    largest_value = values.float().norm(dim=-1).amax(dim=0)  # [H_kv]
    group = recalled.shape[0] // num_kv_heads
    return 2.0 * (1.0 - recalled) * largest_value.repeat_interleave(group)
