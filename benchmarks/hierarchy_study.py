"""Would a second cluster level make scoring cheap? A study on the CPU before any kernel.

Today every decode step scores every cluster's centroid and variances (4.7% of the dense KV bytes
at 128k, 226 us of a 0.49 ms Tactic step at batch 16 on the H100). A two-level index groups each
segment's clusters (k-means over their centroids, `group` clusters a group on average) and keeps
per group its mean key, per-dimension variance and the spread of its clusters' centroids. A step
then (1) scores the groups and walks them to a first threshold, (2) expands the groups that may
hold a cluster above it (for any query head of the KV head) and (3) walks as today over the units
left: the clusters of expanded groups and every other group whole (so a group the rule wrongly
leaves can still be taken, whole: recall is kept, overshoot pays).

Per workload and rule, this reports: the share of (query head, step) meeting P - 0.01, overshoot
over the oracle, the share of clusters in expanded groups, and what scoring reads relative to
today (group records, each about 4/3 of a cluster's, plus expanded clusters). Rules:
  oracle: expand exactly the groups holding a cluster today's walk takes (the least possible);
  box m: a group's box bound on its clusters' log density (per-dimension min/max of centroids,
    largest variances) >= first threshold - m nats;
  sigma k: mean score + k sigma of its clusters' centroid scores + largest variance term
    >= first threshold.

    python benchmarks/hierarchy_study.py --captures /tmp/caps/gemma_8192.pt --out F.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import torch
from decode_attention import topic_context

from tactic_server.tactic.baselines import plan_oracle
from tactic_server.tactic.clustering import ClusterIndex, build_cluster_index, spherical_kmeans
from tactic_server.tactic.config import TacticConfig
from tactic_server.tactic.evaluation import RECALL_TOLERANCE
from tactic_server.tactic.quality import recall
from tactic_server.tactic.selection import _lognormal_estimate, plan_tactic
from tactic_server.tactic.workloads import generate_workload

GROUP_RECORD = 4 / 3  # mean, variances and centroid spread (bf16 + two 8-bit codes) per group


@dataclasses.dataclass
class Groups:
    """Per KV head: group of each cluster [H, C], and per group [H, G]: size, mean [H, G, d],
    variance [H, G, d], centroid spread (between-cluster variance) [H, G, d], box lo/hi [H, G, d],
    largest cluster variance [H, G, d]."""

    of_cluster: torch.Tensor
    sizes: torch.Tensor
    means: torch.Tensor
    variances: torch.Tensor
    spread: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    top_variance: torch.Tensor


def build_groups(index: ClusterIndex, config: TacticConfig, group: int) -> Groups:
    heads, clusters, dim = index.centroids.shape
    per_segment = math.ceil(config.segment_size / config.cluster_size)
    segments = clusters // per_segment
    groups_per_segment = max(1, per_segment // group)
    centroids = index.centroids.reshape(heads * segments, per_segment, dim)
    local = spherical_kmeans(centroids, groups_per_segment, 10)  # [H * S, per_segment]
    first = torch.arange(heads * segments).remainder(segments)[:, None] * groups_per_segment
    of_cluster = (local + first).reshape(heads, clusters)
    count = segments * groups_per_segment
    n = index.cluster_sizes.float()  # [H, C]

    def weighted_sum(values):  # [H, C, d] -> [H, G, d], weighted by cluster size
        out = torch.zeros(heads, count, values.shape[-1])
        return out.scatter_add_(1, of_cluster[..., None].expand_as(values), values * n[..., None])

    sizes = torch.zeros(heads, count).scatter_add_(1, of_cluster, n)
    safe = sizes.clamp_min(1)[..., None]
    means = weighted_sum(index.centroids) / safe
    member_mean = torch.gather(means, 1, of_cluster[..., None].expand(-1, -1, dim))
    spread = weighted_sum((index.centroids - member_mean).square()) / safe
    variances = weighted_sum(index.variances.float().expand(-1, -1, dim)) / safe + spread
    occupied = (n > 0)[..., None].expand(-1, -1, dim)
    idx = of_cluster[..., None].expand(-1, -1, dim)
    low = torch.full((heads, count, dim), math.inf).scatter_reduce(
        1, idx, torch.where(occupied, index.centroids, math.inf), "amin")
    high = torch.full((heads, count, dim), -math.inf).scatter_reduce(
        1, idx, torch.where(occupied, index.centroids, -math.inf), "amax")
    top_variance = torch.zeros(heads, count, dim).scatter_reduce(
        1, idx, index.variances.float().expand(-1, -1, dim), "amax")
    low, high = low.nan_to_num(0, 0, 0), high.nan_to_num(0, 0, 0)
    return Groups(of_cluster, sizes, means, variances, spread, low.clamp(-1e4, 1e4),
                  high.clamp(-1e4, 1e4), top_variance)


def lognormal(query, means, variances, sizes):
    """[H, g, U] log mass of units with these means, per-dimension variances and sizes: the
    reference's capped log-normal estimate (tactic.selection), fed the units as an index."""
    units = SimpleNamespace(variances=variances, cluster_sizes=sizes)
    centre = torch.einsum("hgd,hud->hgu", query, means) / math.sqrt(query.shape[-1])
    return _lognormal_estimate(query, units, centre)


def first_threshold(query, keys, index, groups, target):
    """Per query head [H, g, 1]: the log density of the last unit (group or tail position) that a
    walk over group estimates takes to reach target."""
    heads, dim = keys.shape[1], keys.shape[2]
    grouped = query.float().reshape(heads, -1, dim)
    est = lognormal(grouped, groups.means, groups.variances, groups.sizes)
    tail = keys[index.clustered_len:].float().transpose(0, 1)  # [H, t, d]
    tail_scores = torch.einsum("hgd,htd->hgt", grouped, tail) / math.sqrt(dim)
    log_mass = torch.cat([est, tail_scores], -1)
    sizes = torch.cat([groups.sizes, torch.ones(heads, tail.shape[1])], -1)[:, None, :]
    density = log_mass - sizes.clamp_min(1).log()
    order = density.argsort(-1, descending=True)
    sorted_mass = torch.exp(log_mass - log_mass.amax(-1, keepdim=True)).gather(-1, order)
    cumulative = sorted_mass.cumsum(-1)
    stop = (cumulative < target * cumulative[..., -1:]).sum(-1, keepdim=True)
    stop = stop.clamp_max(order.shape[-1] - 1)
    return density.gather(-1, order).gather(-1, stop), grouped


def expanded_groups(rule, value, query, keys, index, groups, target, flat_taken):
    """[H, G] bool: the groups whose clusters are scored one by one."""
    dim = keys.shape[-1]
    if rule == "oracle":  # groups holding a cluster that today's walk takes
        taken = torch.zeros_like(groups.sizes, dtype=torch.long)
        held = flat_taken.long()
        return taken.scatter_reduce(1, groups.of_cluster, held, "amax") > 0
    threshold, grouped = first_threshold(query, keys, index, groups, target)
    scale = 1 / math.sqrt(dim)
    top_term = torch.einsum("hgd,hud->hgu", grouped.square(), groups.top_variance) / dim / 2
    if rule == "box":
        bound = (torch.maximum(grouped[:, :, None] * groups.low[:, None],
                               grouped[:, :, None] * groups.high[:, None]).sum(-1) * scale)
        optimistic = bound + top_term
        slack = value
    else:  # sigma
        centre = torch.einsum("hgd,hud->hgu", grouped, groups.means) * scale
        sigma = (torch.einsum("hgd,hud->hgu", grouped.square(), groups.spread) / dim).sqrt()
        optimistic = centre + value * sigma + top_term
        slack = 0.0
    return ((optimistic >= threshold - slack) & (groups.sizes[:, None] > 0)).any(dim=1)


def mixed_index(index: ClusterIndex, groups: Groups, expanded: torch.Tensor) -> ClusterIndex:
    """The units a two-level step walks: clusters of expanded groups, other groups whole."""
    heads, clusters, dim = index.centroids.shape
    count = groups.sizes.shape[1]
    units = []
    for h in range(heads):
        keep = expanded[h, groups.of_cluster[h]]  # clusters scored one by one
        cluster_ids = keep.nonzero().flatten()
        group_ids = (~expanded[h]).nonzero().flatten()
        unit_of_cluster = torch.empty(clusters, dtype=torch.long)
        unit_of_cluster[cluster_ids] = torch.arange(cluster_ids.numel())
        group_unit = torch.empty(count, dtype=torch.long)
        group_unit[group_ids] = cluster_ids.numel() + torch.arange(group_ids.numel())
        unit_of_cluster[~keep] = group_unit[groups.of_cluster[h][~keep]]
        units.append((
            torch.cat([index.centroids[h, cluster_ids], groups.means[h, group_ids]]),
            torch.cat([index.variances[h, cluster_ids].float().expand(-1, dim),
                       groups.variances[h, group_ids]]),
            torch.cat([index.cluster_sizes[h, cluster_ids].float(), groups.sizes[h, group_ids]]),
            unit_of_cluster[index.token_cluster[h]],
        ))
    width = max(u[0].shape[0] for u in units)

    def padded(tensors, fill_shape):
        return torch.stack([torch.cat([t, torch.zeros(width - t.shape[0], *fill_shape)])
                            for t in tensors])

    return dataclasses.replace(
        index,
        centroids=padded([u[0] for u in units], (dim,)),
        variances=padded([u[1] for u in units], (dim,)),
        cluster_sizes=padded([u[2] for u in units], ()).long(),
        token_cluster=torch.stack([u[3] for u in units]),
    )


RULES = [("oracle", None), ("box", 0.0), ("box", 1.0), ("sigma", 1.0), ("sigma", 2.0),
         ("sigma", 3.0)]


def study(workloads, target, config, group_sizes):
    tallies = {}
    for name, query, keys in workloads:
        index = build_cluster_index(keys, config)
        if index.num_clusters == 0:
            continue
        oracle = plan_oracle(query, keys, target).selected_counts.sum().item()
        flat = plan_tactic(query, keys, target, index, config)
        flat_taken = torch.zeros(keys.shape[1], index.num_clusters, dtype=torch.bool)
        for h, positions in enumerate(flat.indices):  # clusters holding a taken position
            clustered = positions[positions < index.clustered_len]
            flat_taken[h, index.token_cluster[h, clustered]] = True
        rows = [("flat", None, None, flat, 1.0)]
        for group in group_sizes:
            groups = build_groups(index, config, group)
            for rule, value in RULES:
                expanded = expanded_groups(rule, value, query, keys, index, groups, target,
                                           flat_taken)  # fmt: skip
                plan = plan_tactic(query, keys, target, mixed_index(index, groups, expanded),
                                   config)  # fmt: skip
                cluster_share = torch.gather(expanded, 1, groups.of_cluster).float().mean().item()
                reads = cluster_share + GROUP_RECORD * groups.sizes.shape[1] / index.num_clusters
                rows.append((f"G={group} {rule}" + ("" if value is None else f" {value:g}"),
                             cluster_share, reads, plan, None))
        for label, cluster_share, reads, plan, _ in rows:
            recalled = recall(query, keys, plan)
            t = tallies.setdefault((label, name), [0, 0, 0, 0, 0.0, 0.0, 0])
            t[0] += (recalled >= target - RECALL_TOLERANCE).sum().item()
            t[1] += recalled.numel()
            t[2] += plan.selected_counts.sum().item()
            t[3] += oracle
            t[4] += 1.0 if cluster_share is None else cluster_share
            t[5] += 1.0 if reads is None else reads
            t[6] += 1
    return {f"{label} | {name}": {"meeting": a / b, "overshoot": s / o, "expanded": e / n,
                                  "scoring_reads": r / n}
            for (label, name), (a, b, s, o, e, r, n) in tallies.items()}  # fmt: skip


def topic_workload(context: int, fraction: float, seed: int):
    """decode_attention.py's workload (one request, a Llama-3.1-8B layer's heads) on the CPU:
    query [H_q, d] and keys [context, H_kv, d] in float32."""
    keys, _, queries = topic_context(1, context, fraction, torch.Generator().manual_seed(seed))
    return queries[0].float(), keys.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captures", nargs="*", default=[])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--topic-context", type=int, default=16384)
    parser.add_argument("--synthetic-context", type=int, default=8192)
    parser.add_argument("--groups", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    config = TacticConfig()
    workloads = []
    for path in args.captures:
        store = torch.load(path)
        for prompt, entry in store.items():
            layer = prompt.split(" prompt")[0]
            for position, query in entry["queries"][: args.steps]:
                workloads.append((f"{Path(path).stem} {layer}", query.float(),
                                  entry["keys"][: position + 1].float()))  # fmt: skip
    for fraction in (0.01, 0.03, 0.1, 0.3):
        query, keys = topic_workload(args.topic_context, fraction, 0)
        workloads.append((f"topic {args.topic_context} need {fraction:g}", query, keys))
    for kind in ("topics", "mixed_topics", "anisotropic_topics", "needles", "flat"):
        w = generate_workload(kind, args.synthetic_context, 16, 4, 128, 0)
        workloads.append((f"{kind} {args.synthetic_context}", w.query, w.keys))
    print(f"{len(workloads)} workloads", flush=True)
    results = study(workloads, args.target, config, args.groups)
    args.out.write_text(json.dumps(results, indent=1))
    args.out.with_suffix(".md").write_text(markdown(results, args.target))
    print(markdown(results, args.target))


def markdown(results: dict, target: float) -> str:
    """One row per rule, one column per workload: expanded clusters / scoring reads against
    today / (query head, step) meeting P - 0.01 / overshoot."""
    labels = list(dict.fromkeys(key.split(" | ")[0] for key in results))
    names = list(dict.fromkeys(key.split(" | ")[1] for key in results))
    lines = [f"P = {target}; cell: clusters in expanded groups / scoring reads against today's / "
             "meeting P - 0.01 / overshoot over the oracle", "",
             "| rule | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label in labels:
        cells = []
        for name in names:
            row = results[f"{label} | {name}"]
            cells.append(f"{row['expanded']:.0%} / {row['scoring_reads']:.0%} / "
                         f"{row['meeting']:.0%} / {row['overshoot']:.2f}x")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
