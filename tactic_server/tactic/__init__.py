"""Tactic (arXiv 2502.12216) in plain torch: per query head, the fewest tokens that carry a target
share P of the attention mass, found by clustering keys and estimating each cluster's mass.

Plan/run split: `plan_tactic` (and the baselines) decide what to read and return a SelectionPlan;
`sparse_attention` reads it.
"""

from .attention import attention_probabilities, dense_attention, grouped_scores, sparse_attention
from .baselines import plan_dense, plan_oracle, plan_quest, plan_topk
from .clustering import ClusterIndex, build_cluster_index, spherical_kmeans
from .config import WHOLE_CONTEXT, TacticConfig
from .plan import SelectionPlan
from .quality import error_bound, output_error, overshoot, recall
from .selection import plan_tactic, select_tokens

__all__ = [
    "WHOLE_CONTEXT",
    "ClusterIndex",
    "SelectionPlan",
    "TacticConfig",
    "attention_probabilities",
    "build_cluster_index",
    "dense_attention",
    "error_bound",
    "grouped_scores",
    "output_error",
    "overshoot",
    "plan_dense",
    "plan_oracle",
    "plan_quest",
    "plan_tactic",
    "plan_topk",
    "recall",
    "select_tokens",
    "sparse_attention",
    "spherical_kmeans",
]
