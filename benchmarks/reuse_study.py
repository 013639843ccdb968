"""Could a selection serve several decode steps? A study on captured attention before any kernel.

Scoring every cluster each step is most of Tactic's decode time (benchmarks/decode_attention.py:
74-89% at 128k). If the tokens a head needs change slowly from one step to the next, a selection
made at step s could be read again at steps s+1 .. s+R-1 (plus the positions added since, which
are always attended), dividing the selection's cost by R. This measures what that costs in mass:
for each captured prompt (the last 8 positions of each, consecutive), the reference plan at the
earliest position is reused at each later one, and its true attention mass there is compared with
the target, beside a fresh plan at that position (today's behaviour).

Per age k (steps since the plan was made): the share of (query head, step) meeting P - 0.01, the
mean and the 1st percentile of the mass covered, and the tokens read over a fresh plan's.

    python benchmarks/reuse_study.py --captures /tmp/caps2/gemma_4096.pt /tmp/caps2/gemma_8192.pt \\
        --output benchmarks/results/reuse_study_cpu.json

(captures: benchmarks/estimator_study.py --capture-model ... records them.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import torch

from tactic_server.tactic.attention import attention_probabilities
from tactic_server.tactic.clustering import build_cluster_index
from tactic_server.tactic.config import TacticConfig
from tactic_server.tactic.evaluation import RECALL_TOLERANCE
from tactic_server.tactic.selection import plan_tactic


def covered_mass(query, keys, kept_positions: list[torch.Tensor], extra: range) -> torch.Tensor:
    """[H_q]: the true attention mass, at this query over these keys, of each KV head's kept
    positions plus the positions in `extra` (those added since the plan was made)."""
    probabilities = attention_probabilities(query, keys)
    group = query.shape[0] // keys.shape[1]
    kept = torch.zeros_like(probabilities, dtype=torch.bool)
    for head, positions in enumerate(kept_positions):
        kept[head * group : (head + 1) * group, positions] = True
    kept[:, extra.start : extra.stop] = True
    return (probabilities * kept).sum(dim=-1)


def study(paths: list[Path], target: float, config: TacticConfig) -> dict:
    """Per capture file and age: meeting share, mean and 1st percentile mass, tokens over fresh."""
    results = {}
    for path in paths:
        store = torch.load(path)
        by_age: dict[int, dict[str, list]] = {}
        for entry in store.values():
            steps = sorted(entry["queries"], key=lambda item: item[0])  # oldest first
            first_position, first_query = steps[0]
            keys = entry["keys"]
            index = build_cluster_index(keys[: first_position + 1], config,
                                        query_moments=entry.get("query_moments"))  # fmt: skip
            plan = plan_tactic(first_query, keys[: first_position + 1], target, index, config)
            for position, query in steps:
                age = position - first_position
                visible = keys[: position + 1]
                reused = covered_mass(query, visible, plan.indices,
                                      range(first_position + 1, position + 1))  # fmt: skip
                # the 8 positions share their full segments, so the clusters are the same
                fresh = plan_tactic(query, visible, target,
                                    dataclasses.replace(index, seq_len=position + 1), config)
                tally = by_age.setdefault(age, {"mass": [], "fresh_mass": [], "tokens": [],
                                                "fresh_tokens": []})  # fmt: skip
                tally["mass"] += reused.tolist()
                tally["fresh_mass"] += covered_mass(query, visible, fresh.indices,
                                                    range(0)).tolist()  # fmt: skip
                tally["tokens"].append(plan.selected_counts.sum().item() + age * keys.shape[1])
                tally["fresh_tokens"].append(fresh.selected_counts.sum().item())
        rows = {}
        for age, tally in sorted(by_age.items()):
            ordered = sorted(tally["mass"])
            rows[age] = {
                "meeting": sum(m >= target - RECALL_TOLERANCE for m in tally["mass"])
                / len(tally["mass"]),
                "fresh_meeting": sum(m >= target - RECALL_TOLERANCE for m in tally["fresh_mass"])
                / len(tally["fresh_mass"]),
                "mean_mass": statistics.fmean(tally["mass"]),
                "p1_mass": ordered[len(ordered) // 100],
                "tokens_over_fresh": sum(tally["tokens"]) / sum(tally["fresh_tokens"]),
                "pairs": len(tally["mass"]),
            }
        results[path.name] = rows
    return results


def markdown(results: dict, target: float) -> str:
    lines = [f"P = {target}; a plan made at the earliest captured position, read again k steps "
             "later with the positions added since; fresh: a new plan at that step", "",
             "| capture | age k | meeting P-0.01 (fresh) | mean mass | 1st pct mass "
             "| tokens / fresh |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, rows in results.items():
        for age, row in rows.items():
            lines.append(f"| {name} | {age} | {row['meeting']:.1%} ({row['fresh_meeting']:.1%}) "
                         f"| {row['mean_mass']:.3f} | {row['p1_mass']:.3f} "
                         f"| {row['tokens_over_fresh']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captures", nargs="+", type=Path, required=True)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--output", type=Path, default=None, help="JSON; a .md beside it")
    args = parser.parse_args()
    results = study(args.captures, args.target, TacticConfig())
    text = markdown(results, args.target)
    print(text)
    if args.output:
        args.output.write_text(json.dumps({"target": args.target, "results": results}, indent=1))
        args.output.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
