"""How well each cluster-mass estimate serves the walk: share of (query head, step) meeting
P - 0.01, overshoot over the oracle and selected tokens, per Gemma layer (captured attention of
benchmarks/accuracy.py) and per synthetic workload kind; plus why the isotropic variance
overestimates (its s^2 against the true variance of each cluster's scores along the query).

    python benchmarks/estimator_study.py \
        --capture-model ~/.cache/tactic-server/models/gemma-3-270m \
        --capture-lengths 4096 8192 --captures gemma_4096.pt gemma_8192.pt

(--capture-model first records the captures, one per length, then the study reads them; the
recorded run: 7 prompts of the RULER tasks in turn a length, the last 8 positions of each, on
this CPU machine's standard library as haystack; about 1 and 2 minutes for 4k and 8k on 2
cores. Captures made before 2026-12-07 lack the prompt's query moments: query-weighted
variants cluster unweighted on them.) Query-weighted clustering, as recorded in
benchmarks/results/estimator_study_query_weighted.md:

    python benchmarks/estimator_study.py --captures gemma_4096.pt gemma_8192.pt --only-given \\
        --variant query_weighted=true --variant exact_fraction=1.0 \\
        --variant query_weighted=true,exact_fraction=1.0 \\
        --variant query_weighted=true,cluster_size=8 \\
        --output benchmarks/results/estimator_study_query_weighted.json

A capture is a dict prompt -> {"queries": [(position, q [H_q, d])], "keys", "values",
"query_moments" (clustering.query_moments of the prompt's queries)} whose prompt names start
with "layer N ". Variants differ in TacticConfig fields; a variance weight w
scales every cluster's variances (the log-normal term's s^2) by w, 0 leaving the centroid alone.
Computed in float32 on whatever device runs it (the recorded run: CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import torch

from tactic_server.tactic.baselines import plan_oracle
from tactic_server.tactic.clustering import build_cluster_index, rank_one_variances
from tactic_server.tactic.config import WORKLOAD_KINDS, TacticConfig
from tactic_server.tactic.evaluation import RECALL_TOLERANCE
from tactic_server.tactic.quality import recall
from tactic_server.tactic.selection import plan_tactic
from tactic_server.tactic.workloads import generate_workload

# the built-in variants cluster unweighted, as they were measured (whatever the defaults);
# --variant builds on today's defaults
ISOTROPIC = TacticConfig(variance="isotropic", query_weighted=False)
DIAGONAL = TacticConfig(variance="diagonal", query_weighted=False)
VARIANTS = {
    "isotropic (before)": (ISOTROPIC, 1.0),
    "isotropic w=0": (ISOTROPIC, 0.0),
    "isotropic w=0.25": (ISOTROPIC, 0.25),
    "isotropic w=0.5": (ISOTROPIC, 0.5),
    "diagonal (after)": (DIAGONAL, 1.0),
    "diagonal cluster_size=8": (dataclasses.replace(DIAGONAL, cluster_size=8), 1.0),
    "diagonal boundary_tokens": (dataclasses.replace(DIAGONAL, boundary_tokens=True), 1.0),
    "diagonal cluster_size=8 boundary_tokens": (
        dataclasses.replace(DIAGONAL, cluster_size=8, boundary_tokens=True), 1.0),
    "diagonal cluster_size=8 exact_fraction=0.02": (
        dataclasses.replace(DIAGONAL, cluster_size=8, exact_fraction=0.02), 1.0),
    "isotropic exact_fraction=1": (dataclasses.replace(ISOTROPIC, exact_fraction=1.0), 1.0),
}


def capture_workloads(path: Path, steps: int):
    """(layer, query [H_q, d], keys [n, H_kv, d], the prompt's query moments or None) of the
    first `steps` steps of each prompt."""
    store = torch.load(path)
    for prompt, entry in store.items():
        layer = prompt.split(" prompt")[0]
        for position, query in entry["queries"][:steps]:
            yield layer, query, entry["keys"][: position + 1], entry.get("query_moments")


def synthetic_workloads(seq_len: int, seeds: tuple[int, ...]):
    for kind in WORKLOAD_KINDS:
        for seed in seeds:
            workload = generate_workload(kind, seq_len, 16, 4, 128, seed)
            yield kind, workload.query, workload.keys, None  # no prompt queries


def score_variance_ratios(query, keys, index) -> dict[str, float]:
    """Mass-weighted mean over clusters of the estimated s^2 over the true variance of the
    cluster's scores along the query (isotropic and diagonal), and how far the log-normal total
    mass lies from the exact one (nats), one query head at a time, averaged over the heads."""
    num_kv_heads, dim = keys.shape[1], keys.shape[2]
    clustered = keys[: index.clustered_len].float().transpose(0, 1)  # [H_kv, n, d]
    grouped = query.float().reshape(num_kv_heads, -1, dim)
    member_cluster = index.token_cluster  # [H_kv, n]
    means = torch.gather(index.centroids, 1, member_cluster[..., None].expand(-1, -1, dim))
    deviation = clustered - means
    sizes = index.cluster_sizes.float().clamp_min(1)
    group = grouped.shape[1]
    spread_of = member_cluster[:, None].expand(-1, group, -1)

    def per_cluster(values):  # [H_kv, group, n] -> [H_kv, group, C] means over members
        sums = torch.zeros(num_kv_heads, group, index.num_clusters)
        return sums.scatter_add_(2, spread_of, values) / sizes[:, None]

    score_deviation = torch.einsum("hgd,hnd->hgn", grouped, deviation) / math.sqrt(dim)
    true_variance = per_cluster(score_deviation.square())
    diagonal = torch.zeros_like(index.centroids).scatter_add_(
        1, member_cluster[..., None].expand(-1, -1, dim), deviation.square()
    ) / sizes[..., None]
    estimates = {
        "isotropic": grouped.square().sum(-1, keepdim=True) * diagonal.mean(-1)[:, None] / dim,
        "diagonal": torch.einsum("hgd,hcd->hgc", grouped.square(), diagonal) / dim,
    }
    scores = torch.einsum("hgd,hnd->hgn", grouped, clustered) / math.sqrt(dim)
    peak = scores.amax(-1, keepdim=True)
    exact = per_cluster(torch.exp(scores - peak)).mul(sizes[:, None]).log() + peak
    weight = torch.softmax(exact, dim=-1)
    centroid = torch.einsum("hgd,hcd->hgc", grouped, index.centroids) / math.sqrt(dim)
    log_sizes = sizes.log()[:, None]
    result = {}
    for name, variance in {**estimates, "true": true_variance}.items():
        capped = torch.minimum(variance / 2, (variance * 2 * log_sizes).sqrt())
        error = torch.logsumexp(log_sizes + centroid + capped, -1) - torch.logsumexp(exact, -1)
        result[f"total_error_{name}_nats"] = error.mean().item()
        if name != "true":
            ratio = (variance * weight).sum(-1) / (true_variance * weight).sum(-1)
            result[f"s2_over_true_{name}"] = ratio.mean().item()
    return result


def group_means(variances: torch.Tensor, size: int) -> torch.Tensor:
    """[..., d] per-dimension variances -> each dimension's mean over its group of `size`
    consecutive dimensions: the estimate a cluster keeping d / size values would give
    (s^2 = sum over groups of the group's q_i^2 times its mean variance, / d)."""
    shape = variances.shape
    means = variances.reshape(*shape[:-1], shape[-1] // size, size).mean(dim=-1, keepdim=True)
    return means.expand(*shape[:-1], shape[-1] // size, size).reshape(shape)


def segment_profile(variances: torch.Tensor, clusters: int) -> torch.Tensor:
    """[H_kv, C, d] per-dimension variances (C: whole segments of `clusters`) -> their rank-one
    form per (segment, KV head) (clustering.rank_one_variances, what variance "profile" keeps),
    from the variances as the index holds them (already on the float8 grid)."""
    heads, count, dim = variances.shape
    segments = variances.reshape(heads, count // clusters, clusters, dim)
    return rank_one_variances(segments).reshape(heads, count, dim)


def low_rank_centroids(centroids: torch.Tensor, variances: torch.Tensor, keys: torch.Tensor,
                       rank: int, segments: int, quantize: bool = True, own: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """What scoring would read if a cluster kept `rank` coordinates of its centroid instead of d
    values: per (KV head, basis) the keys' mean mu and their top `rank` principal directions U
    (one basis for the clustered keys of each of `segments` equal segments; 1: one for them
    all), each centroid m replaced by mu + U round(U^T (m - mu)) (coordinates on float8 e4m3's
    grid when quantize), and what the basis leaves out of the centroids, the mean over the
    basis's clusters of each dimension's squared residual, added to every cluster's variances
    (the estimate then counts it as spread of the scores, not as their mean); own: that mean
    scaled, for each cluster, by its own squared residual over the mean one (a cluster far off
    the basis, a needle's, keeps a wide spread and so a high estimate: one more value a cluster).
    centroids, variances [H_kv, C, d] (C a multiple of segments), keys [n, H_kv, d] (n the
    clustered positions, a multiple of segments) -> the new centroids and variances."""
    heads, count, dim = centroids.shape
    points = keys.float().transpose(0, 1).reshape(heads, segments, -1, dim)
    means = centroids.reshape(heads, segments, count // segments, dim)
    mu = points.mean(2, keepdim=True)
    _, _, directions = torch.linalg.svd(points - mu, full_matrices=False)
    basis = directions[..., :rank, :].transpose(-1, -2)  # [H_kv, segments, d, rank]
    coordinates = (means - mu) @ basis
    if quantize:
        coordinates = coordinates.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    kept = mu + coordinates @ basis.transpose(-1, -2)
    residual = (means - mu) - ((means - mu) @ basis) @ basis.transpose(-1, -2)
    spread = residual.square().mean(2, keepdim=True).expand_as(residual)
    if own:
        energy = residual.square().sum(-1, keepdim=True)
        spread = spread * energy / energy.mean(2, keepdim=True).clamp_min(1e-30)
    return kept.reshape(heads, count, dim), variances + spread.reshape(heads, count, dim)


def evaluate(workloads, target: float, variants: dict) -> tuple[dict, dict]:
    """Per (variant, group): heads meeting target, tokens selected and needed; and per group
    the variance diagnostics, averaged over its workloads. variants: name -> (TacticConfig,
    variance weight[, dimensions a kept variance covers[, (centroid rank, bases: 0 one per
    segment, 1 one for the context)]]), "diagonal (after)" among them."""
    tallies, diagnostics = {}, {}
    for group, query, keys, moments in workloads:
        oracle = plan_oracle(query, keys, target).selected_counts
        indexes = {}
        for name, (config, weight, *groups) in variants.items():
            if config not in indexes:
                indexes[config] = build_cluster_index(keys, config, query_moments=moments)
            index = indexes[config]
            if weight != 1.0:
                index = dataclasses.replace(index, variances=index.variances * weight)
            segment_clusters = config.segment_size // config.cluster_size
            if len(groups) > 1 and index.clustered_len:  # centroids of `rank` coordinates
                rank, bases, own = groups[1]
                segments = bases or index.num_clusters // segment_clusters
                centroids, variances = low_rank_centroids(
                    index.centroids, index.variances, keys[: index.clustered_len], rank,
                    segments, own=own)  # fmt: skip
                index = dataclasses.replace(index, centroids=centroids, variances=variances)
            if groups and groups[0] > 0:  # variances per group of dimensions: their mean
                index = dataclasses.replace(index, variances=group_means(index.variances,
                                                                         groups[0]))
            elif groups:  # one profile over the dimensions per segment, one scale per cluster
                index = dataclasses.replace(index, variances=segment_profile(
                    index.variances, segment_clusters))
            plan = plan_tactic(query, keys, target, index, config)
            recalled = recall(query, keys, plan)
            tally = tallies.setdefault((name, group), [0, 0, 0, 0, 0, 0])
            tally[0] += (recalled >= target - RECALL_TOLERANCE).sum().item()
            tally[1] += recalled.numel()
            tally[2] += plan.selected_counts.sum().item()
            tally[3] += oracle.sum().item()
            tally[4] += plan.selected_counts.numel()
            tally[5] += plan.keys_scored.sum().item()
        ratios = score_variance_ratios(query, keys, indexes[DIAGONAL])
        for key, value in ratios.items():
            diagnostics.setdefault(group, {}).setdefault(key, []).append(value)
    rows = {
        name: {
            group: {"meeting": a / b, "overshoot": s / o, "selected_tokens": s / n,
                    "oracle_tokens": o / n, "keys_scored_over_oracle": k / o}
            for (variant, group), (a, b, s, o, n, k) in tallies.items()
            if variant == name
        }  # fmt: skip
        for name in variants
    }
    diagnostics = {group: {key: statistics.fmean(values) for key, values in by_key.items()}
                   for group, by_key in diagnostics.items()}  # fmt: skip
    return rows, diagnostics


def markdown(title: str, rows: dict, diagnostics: dict) -> str:
    groups = list(next(iter(rows.values())))
    lines = [f"### {title}", "",
             "meeting P-0.01 / overshoot over the oracle / mean selected tokens per KV head / "
             "keys read to score clusters exactly, over the oracle's tokens", "",
             "| variant | " + " | ".join(groups) + " | mean |",
             "|---|" + "---|" * (len(groups) + 1)]  # fmt: skip
    for name, by_group in rows.items():
        cells = [f"{c['meeting']:.1%} / {c['overshoot']:.2f}x / {c['selected_tokens']:.0f} / "
                 f"{c['keys_scored_over_oracle']:.2f}" for c in by_group.values()]  # fmt: skip
        meeting = statistics.fmean(c["meeting"] for c in by_group.values())
        over = statistics.fmean(c["overshoot"] for c in by_group.values())
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {meeting:.1%} / {over:.2f}x |")
    keys = list(next(iter(diagnostics.values())))
    lines += ["", "| " + title.split(",")[0] + " diagnostics | " + " | ".join(keys) + " |",
              "|---|" + "---|" * len(keys)]  # fmt: skip
    for group, values in diagnostics.items():
        lines.append(f"| {group} | " + " | ".join(f"{values[k]:.2f}" for k in keys) + " |")
    return "\n".join(lines)


def record_captures(model_dir: str, lengths: list[int], paths: list[Path], prompts: int,
                    steps: int) -> None:  # fmt: skip
    """The global layers' queries (the last `steps` positions), keys and values of `prompts`
    sequences per length (the RULER tasks in turn, teacher-forced on their answers), as
    benchmarks/accuracy.py captures them, saved to the matching path."""
    from accuracy import attention_prompts
    from accuracy import capture_workloads as capture

    from tactic_server.engine.tokenizer import Tokenizer
    from tactic_server.training.ruler import RULER_TASKS, Haystack, haystack_files

    tokenizer = Tokenizer.from_dir(model_dir)
    for length, path in zip(lengths, paths, strict=True):
        started = time.perf_counter()
        sequences = attention_prompts(list(RULER_TASKS), prompts, length, tokenizer,
                                      Haystack(haystack_files(), 0), length)  # fmt: skip
        store: dict[str, dict] = {}
        for _, workload in capture(model_dir, sequences, "cpu", steps, 1):
            prompt = workload.name.split(" position")[0]
            entry = store.setdefault(prompt, {"keys": workload.keys, "values": workload.values,
                                              "query_moments": workload.query_moments,
                                              "queries": []})  # fmt: skip
            if workload.keys.shape[0] > entry["keys"].shape[0]:
                entry["keys"], entry["values"] = workload.keys, workload.values
            entry["queries"].append((workload.keys.shape[0] - 1, workload.query.clone()))
        for entry in store.values():
            entry["keys"], entry["values"] = entry["keys"].clone(), entry["values"].clone()
        torch.save(store, path)
        print(f"captured {len(store)} (layer, prompt) of {length} tokens into {path} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captures", nargs="*", type=Path, default=[])
    parser.add_argument("--steps", type=int, default=8, help="decode steps per captured prompt")
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--synthetic-len", type=int, default=4096)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--output", type=Path,
                        default=Path("benchmarks/results/estimator_study.json"))  # fmt: skip
    parser.add_argument("--capture-model", help="record --captures from this model first")
    parser.add_argument("--capture-lengths", type=int, nargs="*", default=[])
    parser.add_argument("--capture-prompts", type=int, default=7)
    parser.add_argument("--variant", action="append", default=[], metavar="FIELD=VALUE,...",
                        help="also this TacticConfig (fields changed from the defaults, as "
                        "accuracy.py's --tactic-variant), named by its spec")  # fmt: skip
    parser.add_argument("--variance-groups", type=int, nargs="*", default=[],
                        help="also the default config with its variances kept per group of "
                        "this many consecutive dimensions (their mean); 0: one profile over the "
                        "dimensions per segment times one scale per cluster")  # fmt: skip
    parser.add_argument("--centroid-ranks", type=int, nargs="*", default=[],
                        help="also the default config with each centroid kept as this many "
                        "coordinates in a basis of the keys' principal directions (float8), "
                        "what the basis leaves out counted as variance, and the variances as "
                        "a segment profile x scale (the compact form): scoring's bytes "
                        "(low_rank_centroids)")  # fmt: skip
    parser.add_argument("--rank-bases", choices=("segment", "context"), nargs="+",
                        default=["segment", "context"],
                        help="a basis per segment, or one for the whole clustered context")
    parser.add_argument("--rank-residuals", choices=("mean", "own"), nargs="+",
                        default=["mean"],
                        help="what the basis leaves out, as variance: the mean over the "
                        "clusters, or scaled by each cluster's own")  # fmt: skip
    parser.add_argument("--only-given", action="store_true",
                        help="of the built-in variants keep only 'diagonal (after)'")
    args = parser.parse_args()
    variants = {name: value for name, value in VARIANTS.items()
                if not args.only_given or name == "diagonal (after)"}  # fmt: skip
    if args.variant:
        from accuracy import variant

        variants.update({spec: (variant(spec), 1.0) for spec in args.variant})
    variants.update({f"variances per {size} dimensions" if size else "segment profile x scale":
                     (TacticConfig(), 1.0, size) for size in args.variance_groups})  # fmt: skip
    variants.update({f"rank {rank} ({basis} basis{', own residual' if own == 'own' else ''})":
                     (TacticConfig(), 1.0, 0, (rank, int(basis == "context"), own == "own"))
                     for rank in args.centroid_ranks for basis in args.rank_bases
                     for own in args.rank_residuals})  # fmt: skip
    if args.capture_model:
        if len(args.capture_lengths) != len(args.captures):
            parser.error("--capture-lengths needs one length per --captures path")
        record_captures(args.capture_model, args.capture_lengths, args.captures,
                        args.capture_prompts, args.steps)  # fmt: skip
    torch.set_num_threads(1)  # the recorded run shared a 2-core machine
    report = {"device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
              "target": args.target, "variants": {name: {"config": dataclasses.asdict(config),
              "variance_weight": weight, "variance_group": (groups or [1])[0],
              "centroid_rank": groups[1][0] if len(groups) > 1 else None}
              for name, (config, weight, *groups) in variants.items()},
              "tables": {}}  # fmt: skip
    sections = [(f"{path.name}, P={args.target}", capture_workloads(path, args.steps))
                for path in args.captures]  # fmt: skip
    sections.append((f"synthetic {args.synthetic_len} tokens, 16 q / 4 kv heads, d=128, seeds "
                     f"{args.seeds}, P={args.target}",
                     synthetic_workloads(args.synthetic_len, tuple(args.seeds))))  # fmt: skip
    texts = [f"# Cluster-mass estimators ({report['device']}, float32; "
             "benchmarks/estimator_study.py)"]  # fmt: skip
    for title, workloads in sections:
        started = time.perf_counter()
        rows, diagnostics = evaluate(workloads, args.target, variants)
        report["tables"][title] = {"rows": rows, "diagnostics": diagnostics}
        texts.append(markdown(title, rows, diagnostics))
        print(texts[-1], f"\n({time.perf_counter() - started:.0f} s)\n", flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1))
    args.output.with_suffix(".md").write_text("\n\n".join(texts) + "\n")


if __name__ == "__main__":
    main()
