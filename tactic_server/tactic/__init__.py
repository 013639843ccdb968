"""Tactic (arXiv 2502.12216) in plain torch: per query head, the fewest tokens that carry a target
share P of the attention mass, found by clustering keys and estimating each cluster's mass.

Plan/run split: `plan_tactic` (and the baselines) decide what to read and return a SelectionPlan;
`sparse_attention` reads it.

The names below are imported on first use, so that `tactic_server.tactic.config` (what the CLI
and the engines' configuration read) loads without torch.
"""

from __future__ import annotations

import importlib

_SOURCES = {
    "attention": ("attention_probabilities", "dense_attention", "grouped_scores",
                  "sparse_attention"),
    "baselines": ("plan_dense", "plan_oracle", "plan_quest", "plan_topk"),
    "clustering": ("ClusterIndex", "build_cluster_index", "spherical_kmeans"),
    "config": ("WHOLE_CONTEXT", "TacticConfig"),
    "plan": ("SelectionPlan",),
    "quality": ("error_bound", "output_error", "overshoot", "recall"),
    "selection": ("plan_tactic", "select_tokens"),
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _SOURCES.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
