"""The plain data object between deciding what to read (planning) and reading it (attention)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SelectionPlan:
    """One decode step's selection for one request.

    indices: H_kv int64 tensors, the selected positions of each KV head, ascending and unique
        (the union over the KV head's query heads, always-attended positions included).
    seq_len: context length the positions index into.
    query_head_counts: [H_q] int64, positions each query head selected on its own, before the union.
    estimated_mass: [H_q] float32, the share of the estimated total attention mass that each query
        head's own selection covers (NaN for methods that do not estimate, e.g. fixed budgets).
    keys_scored: [H_kv] int64, positions of clusters scored exactly (their keys read beside the
        centroids: the exact top, boundary clusters), None for methods that score no cluster.
    """

    indices: list[torch.Tensor]
    seq_len: int
    query_head_counts: torch.Tensor
    estimated_mass: torch.Tensor
    keys_scored: torch.Tensor | None = None

    @property
    def selected_counts(self) -> torch.Tensor:
        """[H_kv] int64: positions read per KV head."""
        return torch.tensor([positions.numel() for positions in self.indices], dtype=torch.long)

    @property
    def selected_ratio(self) -> float:
        """Mean share of the context read per KV head (what bandwidth pays for)."""
        return self.selected_counts.float().mean().item() / self.seq_len


def plan_from_mask(
    selected: torch.Tensor,
    query_head_selected: torch.Tensor,
    estimated_mass: torch.Tensor | None = None,
    keys_scored: torch.Tensor | None = None,
) -> SelectionPlan:
    """Build a plan from boolean masks: selected [H_kv, seq_len] (what each KV head reads) and
    query_head_selected [H_kv, group, seq_len] (each query head's own choice)."""
    num_kv_heads, group, seq_len = query_head_selected.shape
    counts = query_head_selected.sum(dim=-1).reshape(num_kv_heads * group).cpu()
    if estimated_mass is None:
        estimated_mass = torch.full((num_kv_heads * group,), float("nan"))
    return SelectionPlan(
        indices=[row.nonzero().flatten() for row in selected],
        seq_len=seq_len,
        query_head_counts=counts,
        estimated_mass=estimated_mass.reshape(-1).float().cpu(),
        keys_scored=None if keys_scored is None else keys_scored.long().cpu(),
    )
