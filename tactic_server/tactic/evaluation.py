"""Side-by-side quality of Tactic and its baselines on the synthetic workloads: recall, share of
query heads meeting the target, selected ratio, overshoot over the oracle, and output error."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .baselines import plan_oracle, plan_quest, plan_topk
from .clustering import build_cluster_index
from .config import TARGETS, WHOLE_CONTEXT, TacticConfig
from .plan import SelectionPlan
from .quality import output_error, overshoot, recall
from .selection import plan_tactic
from .workloads import WORKLOAD_KINDS, Workload, generate_workload

RECALL_TOLERANCE = 0.01
"""A query head meets the target P when its recall is at least P - RECALL_TOLERANCE."""

METHODS = ("tactic_segment", "tactic_whole", "tactic_inverse_fit", "oracle", "quest", "topk")


@dataclass(frozen=True)
class EvaluationSetup:
    seq_len: int = 8192
    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    seeds: tuple[int, ...] = (0, 1)
    targets: tuple[float, ...] = TARGETS
    kinds: tuple[str, ...] = WORKLOAD_KINDS
    tactic_variants: dict[str, TacticConfig] = field(
        default_factory=lambda: {
            "tactic_segment": TacticConfig(),
            "tactic_whole": WHOLE_CONTEXT,
            "tactic_inverse_fit": TacticConfig(estimator="inverse_fit"),
        }
    )
    budget_from: str = "tactic_segment"
    """Quest and top-k get the mean per-KV-head budget of this variant."""


@dataclass
class _Tally:
    """Per (workload kind, target, method): what the table averages over seeds."""

    plans: list[SelectionPlan] = field(default_factory=list)
    oracle_plans: list[SelectionPlan] = field(default_factory=list)
    recalls: list[torch.Tensor] = field(default_factory=list)
    errors: list[torch.Tensor] = field(default_factory=list)


def _plans_for(workload: Workload, target: float, indexes: dict, setup: EvaluationSetup):
    """All methods' plans for one workload and target; budget methods get Tactic's mean budget."""
    plans = {
        name: plan_tactic(workload.query, workload.keys, target, indexes[name], config)
        for name, config in setup.tactic_variants.items()
    }
    budget = max(1, round(plans[setup.budget_from].selected_counts.float().mean().item()))
    plans["oracle"] = plan_oracle(workload.query, workload.keys, target)
    plans["quest"] = plan_quest(workload.query, workload.keys, budget)
    plans["topk"] = plan_topk(workload.query, workload.keys, budget)
    return plans


def evaluate(
    setup: EvaluationSetup, progress: Callable[[str], None] = lambda _: None
) -> list[dict]:
    """Run every method on every synthetic workload (kind x seed) and target; one record per
    (kind, target, method)."""
    workloads = (
        (kind, dataclasses.replace(
            generate_workload(kind, setup.seq_len, setup.num_q_heads, setup.num_kv_heads,
                              setup.head_dim, seed), name=f"{kind} seed {seed}"))  # fmt: skip
        for kind in setup.kinds
        for seed in setup.seeds
    )
    return evaluate_workloads(workloads, setup, progress)


def evaluate_workloads(
    workloads: Iterable[tuple[str, Workload]],
    setup: EvaluationSetup,
    progress: Callable[[str], None] = lambda _: None,
    per_head: list | None = None,
) -> list[dict]:
    """Every method on each (group, workload) and target; one record per (group, target,
    method), averaged over the group's workloads (e.g. the seeds of a kind, or the prompts seen
    by one layer of a real model). per_head, when given, receives one record per query head."""
    tallies: dict[tuple[str, float, str], _Tally] = {}
    for kind, workload in workloads:
        started = time.perf_counter()
        indexes = {
            name: build_cluster_index(workload.keys, config, query_moments=workload.query_moments)
            for name, config in setup.tactic_variants.items()
        }
        for target in setup.targets:
            plans = _plans_for(workload, target, indexes, setup)
            for method, plan in plans.items():
                tally = tallies.setdefault((kind, target, method), _Tally())
                tally.plans.append(plan)
                tally.oracle_plans.append(plans["oracle"])
                recalled = recall(workload.query, workload.keys, plan)
                tally.recalls.append(recalled)
                tally.errors.append(
                    output_error(workload.query, workload.keys, workload.values, plan)
                )
                if per_head is not None:
                    per_head.extend(_head_records(kind, target, method, plan, recalled,
                                                  plans["oracle"]))  # fmt: skip
        progress(f"{workload.name}: {time.perf_counter() - started:.1f} s")
    return [
        _summarise(kind, target, method, tally) for (kind, target, method), tally in tallies.items()
    ]


def _head_records(kind, target, method, plan: SelectionPlan, recalled, oracle: SelectionPlan):
    """Per query head: its recall, its KV head's selected ratio and overshoot over the oracle."""
    group = recalled.shape[0] // plan.selected_counts.shape[0]
    counts, oracle_counts = plan.selected_counts.float(), oracle.selected_counts.float()
    over = counts / oracle_counts.clamp(min=1)
    return [{"group": kind, "target": target, "method": method, "q_head": head,
             "kv_head": head // group, "recall": recalled[head].item(),
             "selected_ratio": (counts[head // group] / plan.seq_len).item(),
             "overshoot": over[head // group].item()}
            for head in range(recalled.shape[0])]  # fmt: skip


def _summarise(kind: str, target: float, method: str, tally: _Tally) -> dict:
    recalls = torch.cat(tally.recalls)
    return {
        "workload": kind,
        "target": target,
        "method": method,
        "mean_recall": recalls.mean().item(),
        "share_meeting_target": (recalls >= target - RECALL_TOLERANCE).float().mean().item(),
        "share_meeting_target_strict": (recalls >= target).float().mean().item(),
        "selected_ratio": statistics.fmean(plan.selected_ratio for plan in tally.plans),
        "overshoot": overshoot(tally.plans, tally.oracle_plans),
        "output_error": torch.cat(tally.errors).mean().item(),
    }


COLUMNS = (
    ("workload", "workload", "{}"),
    ("P", "target", "{:.2f}"),
    ("method", "method", "{}"),
    ("recall", "mean_recall", "{:.3f}"),
    ("heads >= P-0.01", "share_meeting_target", "{:.1%}"),
    ("heads >= P", "share_meeting_target_strict", "{:.1%}"),
    ("selected", "selected_ratio", "{:.2%}"),
    ("overshoot", "overshoot", "{:.2f}x"),
    ("output error", "output_error", "{:.4f}"),
)


def markdown_table(records: Sequence[dict]) -> str:
    """The records as a GitHub markdown table, one row per (workload, target, method)."""
    header = "| " + " | ".join(title for title, _, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    rows = [
        "| " + " | ".join(fmt.format(record[key]) for _, key, fmt in COLUMNS) + " |"
        for record in records
    ]
    return "\n".join([header, rule, *rows])


def summary_table(records: Sequence[dict]) -> str:
    """Per method and target, over all non-flat workloads: the numbers the README leads with."""
    lines = [
        "| method | P | heads >= P-0.01 (all workloads) | overshoot (structured workloads) "
        "| selected |",
        "|---|---|---|---|---|",
    ]
    structured = {"topics", "needles", "recency_sink"}
    methods = dict.fromkeys(record["method"] for record in records)
    targets = sorted({record["target"] for record in records})
    for method in methods:
        for target in targets:
            rows = [r for r in records if r["method"] == method and r["target"] == target]
            shown = [r for r in rows if r["workload"] in structured] or rows
            lines.append(
                f"| {method} | {target:.2f} "
                f"| {statistics.fmean(r['share_meeting_target'] for r in rows):.1%} "
                f"| {statistics.fmean(r['overshoot'] for r in shown):.2f}x "
                f"| {statistics.fmean(r['selected_ratio'] for r in rows):.2%} |"
            )
    return "\n".join(lines)
