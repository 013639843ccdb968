"""Baselines behind the same interface as Tactic: (query [H_q, d], keys [seq_len, H_kv, d], ...)
-> SelectionPlan. Every claim about Tactic is made against these."""

from __future__ import annotations

import math

import torch

from .attention import grouped_scores
from .inputs import check_query_keys, check_target
from .plan import SelectionPlan, plan_from_mask


def _check_budget(budget: int, seq_len: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive number of tokens, got {budget!r}")
    return min(budget, seq_len)


def plan_dense(query: torch.Tensor, keys: torch.Tensor) -> SelectionPlan:
    """Every position, for every KV head."""
    check_query_keys(query, keys)
    seq_len, num_kv_heads = keys.shape[:2]
    group = query.shape[0] // num_kv_heads
    everything = torch.ones(num_kv_heads, group, seq_len, dtype=torch.bool, device=keys.device)
    return plan_from_mask(everything[:, 0], everything, torch.ones(query.shape[0]))


def plan_oracle(query: torch.Tensor, keys: torch.Tensor, target: float) -> SelectionPlan:
    """Per query head, positions in descending exact score until their mass reaches target;
    union per KV head. The fewest tokens any token-level method can read."""
    check_query_keys(query, keys)
    target = check_target(target)
    probabilities = torch.softmax(grouped_scores(query, keys), dim=-1)
    sorted_probabilities, order = probabilities.sort(dim=-1, descending=True)
    cumulative = sorted_probabilities.cumsum(dim=-1)
    taken = (cumulative < target * cumulative[..., -1:]).sum(dim=-1, keepdim=True) + 1
    taken = taken.clamp_max(keys.shape[0])
    if target >= 1.0:
        taken = torch.full_like(taken, keys.shape[0])
    in_order = torch.arange(keys.shape[0], device=keys.device) < taken
    selected = torch.zeros_like(in_order).scatter_(2, order, in_order)
    mass = torch.gather(cumulative, 2, taken - 1)
    return plan_from_mask(selected.any(dim=1), selected, mass)


def plan_topk(query: torch.Tensor, keys: torch.Tensor, budget: int) -> SelectionPlan:
    """A fixed budget of positions per KV head: those with the largest attention weight summed
    over the KV head's query heads (exact scores, so an upper bound on any fixed-budget method)."""
    check_query_keys(query, keys)
    budget = _check_budget(budget, keys.shape[0])
    probabilities = torch.softmax(grouped_scores(query, keys), dim=-1)
    top = probabilities.sum(dim=1).topk(budget, dim=-1).indices
    selected = torch.zeros(
        probabilities.shape[0], keys.shape[0], dtype=torch.bool, device=keys.device
    )
    selected.scatter_(1, top, True)
    return plan_from_mask(selected, selected[:, None, :].expand_as(probabilities))


def plan_quest(
    query: torch.Tensor, keys: torch.Tensor, budget: int, page_size: int = 16
) -> SelectionPlan:
    """Quest: pages of page_size consecutive positions, each bounded by sum_j max(q_j min_j,
    q_j max_j) over its keys' per-dimension min and max; the top pages per KV head (bound maxed over
    its query heads) up to budget tokens. The last, possibly partial, page is always read."""
    check_query_keys(query, keys)
    budget = _check_budget(budget, keys.shape[0])
    seq_len, num_kv_heads, dim = keys.shape
    num_pages = math.ceil(seq_len / page_size)
    padded = torch.nn.functional.pad(keys.float(), (0, 0, 0, 0, 0, num_pages * page_size - seq_len))
    pages = padded.reshape(num_pages, page_size, num_kv_heads, dim)
    valid = (torch.arange(num_pages * page_size, device=keys.device) < seq_len).reshape(
        num_pages, page_size, 1, 1
    )
    page_min = torch.where(valid, pages, math.inf).amin(dim=1)  # [pages, H_kv, d]
    page_max = torch.where(valid, pages, -math.inf).amax(dim=1)
    grouped_query = query.float().reshape(num_kv_heads, -1, dim)
    bound = torch.maximum(
        torch.einsum("hgd,phd->hgpd", grouped_query, page_min),
        torch.einsum("hgd,phd->hgpd", grouped_query, page_max),
    ).sum(dim=-1)
    page_bound = bound.amax(dim=1)  # [H_kv, pages]
    page_bound[:, -1] = math.inf
    num_selected_pages = min(num_pages, math.ceil(budget / page_size))
    top_pages = page_bound.topk(num_selected_pages, dim=-1).indices
    page_selected = torch.zeros(num_kv_heads, num_pages, dtype=torch.bool, device=keys.device)
    page_selected.scatter_(1, top_pages, True)
    selected = page_selected.repeat_interleave(page_size, dim=1)[:, :seq_len]
    group = query.shape[0] // num_kv_heads
    return plan_from_mask(selected, selected[:, None, :].expand(-1, group, -1))


def plan_baseline(
    method: str, query: torch.Tensor, keys: torch.Tensor, target: float, budget: float | None
) -> SelectionPlan:
    """A baseline by name: "oracle" at the target mass, "quest" or "topk" at budget, a share of
    the context (at least one token)."""
    if method == "oracle":
        return plan_oracle(query, keys, target)
    tokens = max(1, round(budget * keys.shape[0]))
    if method == "quest":
        return plan_quest(query, keys, tokens)
    if method == "topk":
        return plan_topk(query, keys, tokens)
    raise ValueError(f"unknown baseline {method!r}")
