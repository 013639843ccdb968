"""Planning one Tactic decode step: rank clusters by the query, estimate each cluster's share of the
attention mass, and select clusters until the estimated share reaches the target P.

A *unit* is what selection takes or leaves whole: a cluster of the index, or a single tail position
(positions after the last full segment are not clustered and are scored exactly).
"""

from __future__ import annotations

import math

import torch

from .attention import grouped_scores
from .clustering import ClusterIndex, build_cluster_index, leading_segments
from .config import TacticConfig
from .inputs import check_query_keys, check_target
from .plan import SelectionPlan, plan_from_mask


def _log(tensor: torch.Tensor) -> torch.Tensor:
    """log that maps 0 to -inf without a warning-prone division."""
    return torch.where(
        tensor > 0, tensor.clamp_min(1e-38).log(), torch.full_like(tensor, -math.inf)
    )


FP16_MAX = 65504.0  # the largest finite float16


def _lognormal_estimate(grouped_query, index: ClusterIndex, centroid_scores):
    """log of n * exp(q.mu/sqrt(d) + min(s^2 / 2, s sqrt(2 ln n))) per cluster, [H_kv, group, C],
    with s^2 = sum_i q_i^2 var_i / d (|q|^2 var / d for isotropic variances): the mean of
    exp(score) when a cluster's scores are normal (exp is convex, so q.mu alone underestimates),
    capped where wide clusters would claim more mass than their largest score carries."""
    dim = grouped_query.shape[-1]
    weights = grouped_query.float().square()  # [H_kv, group, d]
    if index.variances.shape[-1] == 1:
        weights = weights.sum(dim=-1, keepdim=True)
    else:  # fp16 q_i^2 (clamped into its range), as the scoring kernel's tensor-core dot takes
        weights = weights.clamp_max(FP16_MAX).to(torch.float16).float()
    score_variance = torch.einsum("hgv,hcv->hgc", weights, index.variances.float()) / dim
    sizes = index.cluster_sizes[:, None, :].float()
    # n samples of a normal score rarely exceed mean + sigma sqrt(2 ln n): the log-normal mean
    # exp(sigma^2 / 2) would claim more mass than the cluster's largest score could carry
    ceiling = (score_variance * 2 * sizes.clamp_min(1).log()).sqrt()
    log_density = centroid_scores + torch.minimum(score_variance / 2, ceiling)
    return _log(sizes) + log_density


def _inverse_fit_estimate(scores, peak, unit_of_position, list_rank_key, unit_sizes, config):
    """The paper's estimator: list the tokens in unit order (clusters by centroid score), fit
    y = a/x + b to the exact exp-scores of two sampled stretches at 10% and 60% down the list,
    and sum the fit over each unit. Returns log-mass per unit [H_kv, group, U]."""
    num_kv_heads, group, seq_len = scores.shape
    order = torch.argsort(list_rank_key, dim=-1, descending=True)
    sorted_sizes = torch.gather(unit_sizes[:, None, :].expand_as(list_rank_key), 2, order)
    sorted_starts = sorted_sizes.cumsum(dim=-1) - sorted_sizes
    unit_start = torch.empty_like(sorted_starts).scatter_(2, order, sorted_starts)
    # x of a token: 1 + its unit's start in the list + its rank inside the unit
    expanded_units = unit_of_position[:, None, :].expand(-1, group, -1)
    within_unit = _rank_within_unit(unit_of_position).float()[:, None, :]
    x = 1.0 + torch.gather(unit_start, 2, expanded_units) + within_unit

    exp_scores = torch.exp(scores - peak)
    width = max(1.0, config.sample_fraction * seq_len)

    def stretch_mean(at: float) -> tuple[torch.Tensor, float]:
        start = 1.0 + at * seq_len
        inside = (x >= start) & (x < start + width)
        mean = (exp_scores * inside).sum(-1) / inside.sum(-1).clamp_min(1)
        return mean, start + (width - 1) / 2

    near, near_x = stretch_mean(0.1)
    far, far_x = stretch_mean(0.6)
    slope = (
        (near - far) / (1.0 / near_x - 1.0 / far_x) if far_x != near_x else torch.zeros_like(near)
    )
    intercept = near - slope / near_x
    fitted = (slope[..., None] / x + intercept[..., None]).clamp_min(0.0)
    unit_mass = torch.zeros_like(list_rank_key).scatter_add_(2, expanded_units, fitted)
    return _log(unit_mass) + peak


def _rank_within_unit(unit_of_position: torch.Tensor) -> torch.Tensor:
    """[H_kv, seq_len]: how many earlier positions share each position's unit."""
    num_units = int(unit_of_position.max().item()) + 1
    order = torch.argsort(
        unit_of_position * unit_of_position.shape[1]
        + torch.arange(unit_of_position.shape[1], device=unit_of_position.device),
        dim=-1,
    )
    sorted_units = torch.gather(unit_of_position, 1, order)
    counts = torch.zeros(
        unit_of_position.shape[0], num_units, dtype=torch.long, device=unit_of_position.device
    )
    counts.scatter_add_(1, unit_of_position, torch.ones_like(unit_of_position))
    starts = counts.cumsum(dim=-1) - counts
    rank_sorted = torch.arange(
        unit_of_position.shape[1], device=unit_of_position.device
    ) - torch.gather(starts, 1, sorted_units)
    return torch.empty_like(rank_sorted).scatter_(1, order, rank_sorted)


def density_bin(log_mass: torch.Tensor, sizes: torch.Tensor, config: TacticConfig):
    """int64 bin of each unit's log mass per token (clamped into the end bins), as the kernels
    compute it: floor((log_mass - log size - lowest) / width)."""
    density = log_mass - sizes.clamp_min(1).log()
    bins = ((density - config.lowest_density) * (1.0 / config.density_bin_width)).floor()
    return bins.nan_to_num(0.0).clamp(0, config.density_bins - 1).long()


MAX_RELATIVE_LOG_MASS = 80.0
"""A unit's mass is summed relative to its bin's lower edge, exp(log_mass - edge): at most
size * exp(width) inside the range; capped for densities clamped into the top bin."""


def bin_relative_mass(log_mass: torch.Tensor, bins: torch.Tensor, config: TacticConfig):
    """exp(log_mass - lower edge of the unit's bin), what a bin's histogram entry sums."""
    edge = config.lowest_density + bins.float() * config.density_bin_width
    return torch.exp((log_mass - edge).clamp_max(MAX_RELATIVE_LOG_MASS)).nan_to_num(0.0)


def _suffix_sums(values: torch.Tensor) -> torch.Tensor:
    """[..., b] -> sum of values[..., b:], as total - exclusive prefix (the kernels' formula)."""
    return values.sum(dim=-1, keepdim=True) - (values.cumsum(dim=-1) - values)


def segments_before_recent(seq_lens, config: TacticConfig):
    """Full segments that end before the recent window starts (seq_lens: an int or a tensor of
    them): only these are selected by cluster. A segment the window reaches into is left to the
    tail, scored token by token, so recent positions are forced one by one, never through a
    whole cluster (and the kernels look up the clusters of sinks only)."""
    if isinstance(seq_lens, torch.Tensor):
        return (seq_lens - config.recent_window).clamp_min(0) // config.segment_size
    return max(0, seq_lens - config.recent_window) // config.segment_size


def plan_tactic(
    query: torch.Tensor,
    keys: torch.Tensor,
    target: float,
    index: ClusterIndex | None = None,
    config: TacticConfig | None = None,
) -> SelectionPlan:
    """Select, per KV head, the clusters whose estimated mass reaches `target` for each of its
    query heads (union over the group). query [H_q, d], keys [seq_len, H_kv, d]."""
    check_query_keys(query, keys)
    target = check_target(target)
    config = config or TacticConfig()
    if index is None:
        index = build_cluster_index(keys, config)
    elif index.seq_len != keys.shape[0]:
        raise ValueError(
            f"cluster index covers {index.seq_len} positions, keys have {keys.shape[0]}"
        )
    seq_len, num_kv_heads, dim = keys.shape
    device = keys.device
    if config.segment_size is not None and config.recent_window > 0:
        usable = segments_before_recent(seq_len, config) * config.segment_size
        index = leading_segments(index, min(index.clustered_len, usable))
    scores = grouped_scores(query, keys)  # [H_kv, group, seq_len]
    group = scores.shape[1]
    num_clusters, tail_len = index.num_clusters, seq_len - index.clustered_len
    num_units = num_clusters + tail_len

    tail_units = torch.arange(num_clusters, num_units, device=device).expand(num_kv_heads, tail_len)
    unit_of_position = torch.cat([index.token_cluster, tail_units], dim=1)  # [H_kv, seq_len]
    unit_sizes = torch.cat(
        [index.cluster_sizes, torch.ones(num_kv_heads, tail_len, dtype=torch.long, device=device)],
        dim=1,
    ).float()
    expanded_units = unit_of_position[:, None, :].expand(-1, group, -1)

    # exact log-mass of every unit; only the units chosen below to be scored exactly use it
    peak = scores.amax(dim=-1, keepdim=True)
    exact_mass = torch.zeros(num_kv_heads, group, num_units, device=device)
    exact_mass.scatter_add_(2, expanded_units, torch.exp(scores - peak))
    exact_log_mass = _log(exact_mass) + peak

    grouped_query = query.float().reshape(num_kv_heads, group, dim)
    centroid_scores = torch.einsum("hgd,hcd->hgc", grouped_query, index.centroids) / math.sqrt(dim)
    tail_exact = exact_log_mass[..., num_clusters:]
    if config.estimator == "lognormal":
        clusters = _lognormal_estimate(grouped_query, index, centroid_scores)
    else:
        # the fit lists tokens by their unit's centroid score (tail positions by their own)
        list_rank_key = torch.cat([centroid_scores, tail_exact], dim=-1)
        clusters = _inverse_fit_estimate(
            scores, peak, unit_of_position, list_rank_key, unit_sizes, config
        )[..., :num_clusters]
    estimated = torch.cat([clusters, tail_exact], dim=-1)  # [H_kv, group, U] log-mass

    forced = torch.zeros(num_kv_heads, num_units, dtype=torch.bool, device=device)
    forced_positions = [
        torch.arange(min(config.sink_tokens, seq_len), device=device),
        torch.arange(max(0, seq_len - config.recent_window), seq_len, device=device),
    ]
    if config.tail_policy == "attend":
        forced_positions.append(torch.arange(index.clustered_len, seq_len, device=device))
    for positions in forced_positions:
        forced.scatter_(1, unit_of_position[:, positions], True)
    forced = forced[:, None, :].expand(-1, group, -1)
    occupied = (unit_sizes > 0)[:, None, :].expand(-1, group, -1)
    candidate = occupied & ~forced  # units the walk may take or leave
    sizes = unit_sizes[:, None, :].expand(-1, group, -1)
    bins = config.density_bins

    def by_bin(values, unit_bins, mask):
        return torch.zeros(num_kv_heads, group, bins, device=device).scatter_add_(
            2, unit_bins, torch.where(mask, values, 0.0)
        )

    # score exactly the units of the densest estimated bins, as many bins as hold at most
    # exact_fraction of the context; a bin's tokens are read off its relative mass (each
    # unit's is its size times exp(0..width)), so one histogram serves both thresholds
    estimated_bins = density_bin(estimated, sizes, config)
    estimated_relative = by_bin(bin_relative_mass(estimated, estimated_bins, config),
                                estimated_bins, candidate)  # fmt: skip
    tokens = estimated_relative * math.exp(-config.density_bin_width / 2)
    budget = config.exact_fraction * seq_len
    exact_threshold = (_suffix_sums(tokens) > budget).sum(dim=-1, keepdim=True)
    scored_exactly = candidate & (estimated_bins >= exact_threshold)
    log_mass = torch.where(scored_exactly, exact_log_mass, estimated)

    # units taken token by token (exact_tokens, boundary_tokens) enter the walk by their tokens'
    # own density bins; without those options no unit is split and the walk needs none
    splitting = config.exact_tokens or config.boundary_tokens
    if splitting:
        token_bins = density_bin(scores, torch.ones_like(scores), config)
        token_relative = bin_relative_mass(scores, token_bins, config)

    def walk(log_mass, split):
        """Walk the bins from the densest down, always-attended units first, until the target;
        units in `split` enter the histogram token by token (exact scores) and are taken so.
        Returns the query heads' token masks, the bin where each walk stopped, every unit's
        bin and the estimated share covered."""
        whole = candidate & ~split
        final_bins = density_bin(log_mass, sizes, config)
        relative = bin_relative_mass(log_mass, final_bins, config)
        walk_mass = by_bin(relative, final_bins, whole)
        if splitting:
            token_split = torch.gather(split, 2, expanded_units)
            walk_mass += by_bin(token_relative, token_bins, token_split)
        forced_mass = by_bin(relative, final_bins, forced & occupied)
        nonempty = (walk_mass > 0) | (forced_mass > 0)
        positions = torch.arange(bins, device=device)
        top = torch.where(nonempty, positions, -1).amax(dim=-1, keepdim=True)
        scale = torch.exp(((positions - top) * config.density_bin_width).clamp_max(0.0))
        walk_mass, forced_total = walk_mass * scale, (forced_mass * scale).sum(-1, keepdim=True)
        total = forced_total + walk_mass.sum(-1, keepdim=True)
        covered = forced_total + _suffix_sums(walk_mass)  # [H_kv, group, bins]: bins >= b taken
        need = target * total
        threshold = ((covered >= need).sum(dim=-1, keepdim=True) - 1).clamp_min(0)
        threshold = torch.where(forced_total >= need, bins, threshold)
        if target >= 1.0:
            threshold = torch.zeros_like(threshold)
        selected_units = occupied & (forced | (whole & (final_bins >= threshold)))
        taken = torch.gather(selected_units, 2, expanded_units)
        if splitting:
            taken |= token_split & (token_bins >= threshold)
        covered = torch.cat([covered, forced_total], dim=-1).gather(2, threshold)
        return taken, threshold, final_bins, covered / total.clamp_min(1e-38)

    split = scored_exactly if config.exact_tokens else torch.zeros_like(scored_exactly)
    taken, threshold, final_bins, estimated_share = walk(log_mass, split)
    read_exactly = scored_exactly
    if config.boundary_tokens:
        # the whole units of the bin where the walk stopped (and of the bins within
        # boundary_band nats of it): scored exactly and split, then the walk again (its total
        # moves by their estimates' error)
        band = round(config.boundary_band / config.density_bin_width)
        boundary = candidate & ~split & ((final_bins - threshold).abs() <= band)
        log_mass = torch.where(boundary, exact_log_mass, log_mass)
        taken, _, _, estimated_share = walk(log_mass, split | boundary)
        read_exactly = read_exactly | boundary
    # clusters whose keys some query head of the group read to score them (tail positions are
    # scored from their keys anyway)
    read_clusters = read_exactly.any(dim=1)[:, :num_clusters]
    keys_scored = (read_clusters * unit_sizes[:, :num_clusters]).sum(dim=-1)
    return plan_from_mask(taken.any(dim=1), taken, estimated_share, keys_scored)


def select_tokens(
    query: torch.Tensor, keys: torch.Tensor, target: float, config: TacticConfig | None = None
) -> list[torch.Tensor]:
    """Tactic selection for one decode query: per KV head, the positions to attend (int64, sorted).

    query [num_q_heads, head_dim], keys [seq_len, num_kv_heads, head_dim], scores scaled by
    1/sqrt(head_dim); target is the attention mass P in (0, 1] each query head must keep.
    """
    return plan_tactic(query, keys, target, config=config).indices
