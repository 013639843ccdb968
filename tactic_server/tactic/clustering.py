"""Segment-local spherical k-means over the keys of one context: the cluster index Tactic ranks.

Each full segment of `segment_size` positions (aligned to position 0) is clustered on its own, so
the cost grows linearly with context and a segment's clusters never change once built (they can be
shared between requests with a common prefix). Positions after the last full segment (the tail)
stay unclustered.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import TacticConfig

_NORM_EPS = 1e-12


@dataclass(frozen=True)
class ClusterIndex:
    """Clusters of one context's keys, per KV head. Cluster c of KV head h holds the positions
    token_positions[h, cluster_offsets[h, c]:cluster_offsets[h, c + 1]].

    clustered_len: positions [0, clustered_len) are clustered; [clustered_len, seq_len) is the tail.
    centroids: [H_kv, C, d] float32, the mean key of each cluster (what a query is scored against).
    variances: [H_kv, C, V] float32, the per-dimension variance of each cluster's keys (V = d,
        config.variance "diagonal"; rounded to the float8 values of encode_variances), their
        rank-one form (V = d, "profile": variance_scales times variance_profiles, the float32
        products) or its mean over the dimensions (V = 1, "isotropic").
    cluster_sizes: [H_kv, C] int64.
    cluster_offsets: [H_kv, C + 1] int64, CSR offsets into token_positions.
    token_positions: [H_kv, clustered_len] int64, clustered positions in cluster order.
    token_cluster: [H_kv, clustered_len] int64, the cluster of each position (inverse map).
    variance_scales, variance_profiles: the rank-one parts of "profile" variances (else None),
        what a cluster pool stores of them: a scale per cluster [H_kv, C] float32 and a
        profile per segment [H_kv, segments, d] float32 on float16's grid (rank_one_parts).
    """

    seq_len: int
    clustered_len: int
    centroids: torch.Tensor
    variances: torch.Tensor
    cluster_sizes: torch.Tensor
    cluster_offsets: torch.Tensor
    token_positions: torch.Tensor
    token_cluster: torch.Tensor
    variance_scales: torch.Tensor | None = None
    variance_profiles: torch.Tensor | None = None

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[1]


def spherical_kmeans(points: torch.Tensor, num_clusters: int, iterations: int) -> torch.Tensor:
    """Cluster each batch row of points [B, m, d] by cosine similarity; returns assignments [B, m].

    Deterministic: centroids start at evenly strided points. A cluster that loses all its points
    keeps its previous centroid, so duplicate and zero keys cannot produce NaNs.
    """
    batch, num_points, dim = points.shape
    unit = F.normalize(points, dim=-1, eps=_NORM_EPS)
    starts = torch.linspace(0, num_points - 1, num_clusters, device=points.device).round().long()
    centroids = unit[:, starts]
    for _ in range(iterations):
        assignments = torch.bmm(unit, centroids.transpose(1, 2)).argmax(dim=-1)
        sums = torch.zeros(batch, num_clusters, dim, device=points.device, dtype=unit.dtype)
        sums.scatter_add_(1, assignments.unsqueeze(-1).expand(-1, -1, dim), unit)
        norms = sums.norm(dim=-1, keepdim=True)
        centroids = torch.where(norms > _NORM_EPS, sums / norms.clamp_min(_NORM_EPS), centroids)
    return torch.bmm(unit, centroids.transpose(1, 2)).argmax(dim=-1)


def _cluster_means(points: torch.Tensor, assignments: torch.Tensor, num_clusters: int):
    """Per-cluster sizes [B, C] and mean points [B, C, d] (zero for empty clusters)."""
    batch, _, dim = points.shape
    sizes = torch.zeros(batch, num_clusters, device=points.device, dtype=points.dtype)
    sizes.scatter_add_(1, assignments, torch.ones_like(assignments, dtype=points.dtype))
    sums = torch.zeros(batch, num_clusters, dim, device=points.device, dtype=points.dtype)
    sums.scatter_add_(1, assignments.unsqueeze(-1).expand(-1, -1, dim), points)
    return sizes, sums / sizes.clamp_min(1.0).unsqueeze(-1)


VARIANCE_MAX = 57344.0
"""Per-dimension variances are kept as float8 e5m2 values (torch.float8_e5m2: 5 exponent, 2
mantissa bits, rounded to the nearest, at most 1/9 off; 2^-14 .. 57344, subnormals down to
2^-16, zero below): a quarter of a float32's bytes. The mass estimate sums d of them weighted by
q_i^2, so their errors mostly cancel (the Gemma 3 estimator study does not move from 3 mantissa
bits to 2). They are the top byte of a float16, so the scoring kernel turns a pair into its
fp16 tensor-core operand with one byte permute; larger variances are clamped to VARIANCE_MAX."""


def encode_variances(variances: torch.Tensor) -> torch.Tensor:
    """float8 e5m2 values of variances >= 0, rounded to the nearest (clamped to VARIANCE_MAX)."""
    return variances.float().clamp(0.0, VARIANCE_MAX).to(torch.float8_e5m2)


def decode_variances(codes: torch.Tensor) -> torch.Tensor:
    """float32 variances of their float8 e5m2 values (exact)."""
    return codes.float()


FP8_CENTROID_MAX = 448.0  # the largest finite float8 e4m3 value (torch.float8_e4m3fn)
FP16_GRID_MAX = 65504.0  # the largest finite float16 ("profile" variances are kept as float16)


def fp8_centroids(centroids: torch.Tensor) -> torch.Tensor:
    """float8 e4m3 centroids, clamped into its range first (beyond it the cast gives NaN)."""
    return centroids.clamp(-FP8_CENTROID_MAX, FP8_CENTROID_MAX).to(torch.float8_e4m3fn)


def round_centroids(centroids: torch.Tensor, config: TacticConfig) -> torch.Tensor:
    """Centroids on the grid a cluster pool of this config stores them on (config.centroids):
    float8 e4m3 values (fp8_centroids) for "fp8"; unchanged for "kv" (the pool's cast to the
    cache dtype is the reference's too: it reads the pool back). Same dtype out."""
    if config.centroids != "fp8":
        return centroids
    return fp8_centroids(centroids).to(centroids.dtype)


def rank_one_variances(variances: torch.Tensor) -> torch.Tensor:
    """[..., C, d] per-dimension variances of C clusters (a segment's, for one KV head) -> their
    rank-one form (variance "profile"): the profile v (the clusters' mean variance of each
    dimension) times a scale per cluster (its mean variance over v's mean; 0 where v is)."""
    scale, profile = rank_one_parts(variances, rounded=False)
    return scale * profile


def rank_one_parts(variances: torch.Tensor, rounded: bool = True):
    """The parts of rank_one_variances: scales [..., C, 1] and the profile [..., 1, d]; rounded:
    the profile on float16's grid (clamped into its range), as a cluster pool stores it."""
    profile = variances.mean(dim=-2, keepdim=True)
    scale = variances.mean(dim=-1, keepdim=True) / profile.mean(dim=-1, keepdim=True)
    if rounded:
        profile = profile.clamp_max(FP16_GRID_MAX).to(torch.float16).to(profile.dtype)
    return scale.nan_to_num(0.0), profile


def variance_dims(config: TacticConfig, head_dim: int) -> int:
    """Values of spread each cluster keeps in a ClusterIndex (see ClusterIndex.variances)."""
    return 1 if config.variance == "isotropic" else head_dim


def stored_variance_dims(config: TacticConfig, head_dim: int) -> tuple[int, int]:
    """What a cluster pool stores of the variances: values per cluster (1: a float32 mean
    variance or a "profile" scale; d: float8 per-dimension variances) and per segment and KV
    head (d float16 for "profile", else 0)."""
    if config.variance == "profile":
        return 1, head_dim
    return variance_dims(config, head_dim), 0


def query_moments(queries: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """What query-weighted clustering keeps of queries [..., H_q, d] (any scale: only their
    proportions count), [..., H_kv, d/2]: their squared components summed over each KV head's
    query heads and over the two dimensions of a RoPE pair (j and j + d/2), since the rotation
    moves a query's weight between them with its position. Summed over queries, they are what
    query_weights reads."""
    dim = queries.shape[-1]
    squared = queries.float().square()
    squared = squared.reshape(*queries.shape[:-2], num_kv_heads, -1, dim).sum(dim=-2)
    return squared[..., : dim // 2] + squared[..., dim // 2 :]


def query_weights(moments: torch.Tensor) -> torch.Tensor:
    """Per-dimension scales [..., d] of query-weighted clustering (TacticConfig.query_weighted)
    from query_moments [..., d/2]: the root mean square of each RoPE pair's components, for
    both of its dimensions. The squared distance of scaled keys sum_i w_i^2 (k_i - k'_i)^2 is
    then the mean over those queries of (q.k - q.k')^2, up to the pairing. Normalised to a mean
    square of 1; all ones where no query was seen."""
    weights = torch.cat([moments, moments], dim=-1).float().sqrt()
    scale = weights.square().mean(dim=-1, keepdim=True).sqrt()
    return torch.where(scale > 0, weights / scale.clamp_min(_NORM_EPS), torch.ones_like(weights))


KMeans = Callable[[torch.Tensor, int, int], torch.Tensor]
"""(points [B, m, d], num_clusters, iterations) -> assignments [B, m]: spherical_kmeans or a
kernel computing the same function (tactic_server.kernels.kmeans.segment_kmeans)."""


def _cluster_segments(
    points: torch.Tensor, num_clusters: int, config: TacticConfig, kmeans: KMeans,
    weights: torch.Tensor | None = None,
):  # fmt: skip
    """Cluster each row of points [B, m, d]: assignments [B, m], sizes [B, C], means [B, C, d],
    variances [B, C, V] (see ClusterIndex) and, for "profile", their rank-one parts (scales
    [B, C, 1], profiles [B, 1, d]; else None). The worst-explained tokens become singleton clusters
    (see outlier_share). weights [B, d]: k-means groups each row's points scaled by them
    (query_weights); the outliers are the points themselves worst explained (a decode query
    may read directions the prompt's did not), and means and variances are theirs."""
    num_points, dim = points.shape[1], points.shape[2]
    num_outliers = min(int(num_clusters * config.outlier_share), num_clusters - 1, num_points)
    kmeans_clusters = num_clusters - num_outliers
    grouped = points if weights is None else points * weights[:, None, :]
    assignments = kmeans(grouped, kmeans_clusters, config.kmeans_iterations)
    if num_outliers > 0:
        _, means = _cluster_means(points, assignments, kmeans_clusters)
        residual = points - torch.gather(means, 1, assignments.unsqueeze(-1).expand(-1, -1, dim))
        worst = residual.norm(dim=-1).topk(num_outliers, dim=-1).indices
        singleton_ids = torch.arange(kmeans_clusters, num_clusters, device=points.device)
        assignments = assignments.scatter(1, worst, singleton_ids.expand_as(worst))
    sizes, means = _cluster_means(points, assignments, num_clusters)
    deviation = points - torch.gather(means, 1, assignments.unsqueeze(-1).expand(-1, -1, dim))
    squared = deviation.square()
    if config.variance == "isotropic":
        squared = squared.mean(dim=-1, keepdim=True)
    sums = torch.zeros(*sizes.shape, squared.shape[-1], device=points.device, dtype=points.dtype)
    sums.scatter_add_(1, assignments.unsqueeze(-1).expand_as(squared), squared)
    variances = sums / sizes.clamp_min(1.0).unsqueeze(-1)
    parts = None
    if config.variance == "profile":  # rank one per row (a segment's KV head), as stored
        parts = rank_one_parts(variances)
        variances = parts[0] * parts[1]
    elif config.variance == "diagonal":  # on the grid the cluster pool stores
        variances = decode_variances(encode_variances(variances)).to(points.dtype)
    return assignments, sizes, round_centroids(means, config), variances, parts


def build_cluster_index(
    keys: torch.Tensor, config: TacticConfig, kmeans: KMeans = spherical_kmeans,
    query_moments: torch.Tensor | None = None,
) -> ClusterIndex:  # fmt: skip
    """Cluster keys [seq_len, H_kv, d] (any float dtype; computed in float32). query_moments:
    the sums of squared query components that query-weighted clustering scales keys by
    (query_moments; read when config.query_weighted), [H_kv, d/2] for every segment or
    [segments, H_kv, d/2] one per full segment."""
    seq_len, num_kv_heads, dim = keys.shape
    if config.segment_size is None:
        segment_len, num_segments = seq_len, 1 if seq_len > 0 else 0
    else:
        segment_len, num_segments = config.segment_size, seq_len // config.segment_size
    clustered_len = segment_len * num_segments
    clusters_per_segment = math.ceil(segment_len / config.cluster_size) if num_segments else 0
    device = keys.device

    # [num_segments * H_kv, segment_len, d]: one k-means problem per (segment, KV head)
    points = (
        keys[:clustered_len]
        .float()
        .reshape(num_segments, segment_len, num_kv_heads, dim)
        .permute(0, 2, 1, 3)
        .reshape(num_segments * num_kv_heads, segment_len, dim)
    )
    weights = None
    if config.query_weighted and query_moments is not None and num_segments:
        moments = query_moments.to(device).expand(num_segments, num_kv_heads, dim // 2)
        weights = query_weights(moments.reshape(num_segments * num_kv_heads, dim // 2))
    if num_segments:
        assignments, sizes, means, variances, parts = _cluster_segments(
            points, clusters_per_segment, config, kmeans, weights
        )
    else:
        assignments = torch.zeros(0, segment_len, dtype=torch.long, device=device)
        sizes = torch.zeros(0, 0, device=device)
        means = torch.zeros(0, 0, dim, device=device)
        variances = torch.zeros(0, 0, variance_dims(config, dim), device=device)
        parts = (torch.zeros(0, 0, 1, device=device), torch.zeros(0, 1, dim, device=device)) \
            if config.variance == "profile" else None

    local_positions = torch.arange(segment_len, device=device)
    # cluster order within a segment; ties (same cluster) keep position order
    order = torch.argsort(assignments * segment_len + local_positions, dim=-1)
    local_offsets = F.pad(sizes.long().cumsum(dim=-1), (1, 0))

    def per_head(tensor: torch.Tensor) -> torch.Tensor:
        """[num_segments * H_kv, X, ...] -> [H_kv, num_segments * X, ...]"""
        shaped = tensor.reshape(num_segments, num_kv_heads, *tensor.shape[1:]).transpose(0, 1)
        return shaped.reshape(num_kv_heads, num_segments * tensor.shape[1], *tensor.shape[2:])

    segment_starts = (torch.arange(num_segments, device=device) * segment_len).repeat_interleave(
        num_kv_heads
    )
    segment_first_cluster = (
        torch.arange(num_segments, device=device) * clusters_per_segment
    ).repeat_interleave(num_kv_heads)
    token_positions = per_head(order + segment_starts[:, None])
    token_cluster = per_head(assignments + segment_first_cluster[:, None])
    offsets = per_head(local_offsets[:, :-1] + segment_starts[:, None])
    cluster_offsets = torch.cat(
        [offsets, torch.full((num_kv_heads, 1), clustered_len, device=device, dtype=torch.long)],
        dim=1,
    )
    return ClusterIndex(
        seq_len=seq_len,
        clustered_len=clustered_len,
        centroids=per_head(means),
        variances=per_head(variances),
        cluster_sizes=per_head(sizes).long(),
        cluster_offsets=cluster_offsets,
        token_positions=token_positions,
        token_cluster=token_cluster,
        variance_scales=None if parts is None else per_head(parts[0])[..., 0],
        variance_profiles=None if parts is None else per_head(parts[1]),
    )


def leading_segments(index: ClusterIndex, clustered_len: int) -> ClusterIndex:
    """The index of its first clustered_len positions' segments (a multiple of the segment
    size, at most index.clustered_len): the positions after them become tail."""
    if clustered_len == index.clustered_len:
        return index
    # every segment has as many clusters; the offset after the last kept one is clustered_len
    clusters = index.num_clusters * clustered_len // index.clustered_len
    profiles = index.variance_profiles
    if profiles is not None:
        profiles = profiles[:, : profiles.shape[1] * clustered_len // index.clustered_len]
    return ClusterIndex(
        seq_len=index.seq_len,
        clustered_len=clustered_len,
        centroids=index.centroids[:, :clusters],
        variances=index.variances[:, :clusters],
        cluster_sizes=index.cluster_sizes[:, :clusters],
        cluster_offsets=index.cluster_offsets[:, : clusters + 1],
        token_positions=index.token_positions[:, :clustered_len],
        token_cluster=index.token_cluster[:, :clustered_len],
        variance_scales=(None if index.variance_scales is None
                         else index.variance_scales[:, :clusters]),  # fmt: skip
        variance_profiles=profiles,
    )


def concatenate_segments(segments: list[ClusterIndex], seq_len: int) -> ClusterIndex:
    """One index for a context from the indexes of its consecutive full segments (each built
    alone, positions from 0), e.g. segments cached separately and shared through a prefix cache.
    seq_len is the context's current length (positions past the last segment are its tail)."""
    if not segments:
        raise ValueError("need at least one segment; a context without full segments has no index")
    starts = [0]
    for segment in segments:
        starts.append(starts[-1] + segment.clustered_len)
    first_cluster = [0]
    for segment in segments:
        first_cluster.append(first_cluster[-1] + segment.num_clusters)
    clustered_len = starts[-1]
    if seq_len < clustered_len:
        raise ValueError(
            f"seq_len {seq_len} is shorter than the {clustered_len} clustered positions"
        )
    num_kv_heads = segments[0].centroids.shape[0]
    device = segments[0].centroids.device
    profiled = all(s.variance_profiles is not None for s in segments)
    end = torch.full((num_kv_heads, 1), clustered_len, dtype=torch.long, device=device)
    return ClusterIndex(
        seq_len=seq_len,
        clustered_len=clustered_len,
        centroids=torch.cat([s.centroids for s in segments], dim=1),
        variances=torch.cat([s.variances for s in segments], dim=1),
        cluster_sizes=torch.cat([s.cluster_sizes for s in segments], dim=1),
        cluster_offsets=torch.cat(
            [s.cluster_offsets[:, :-1] + start for s, start in zip(segments, starts, strict=False)]
            + [end],
            dim=1,
        ),
        token_positions=torch.cat(
            [s.token_positions + start for s, start in zip(segments, starts, strict=False)], dim=1
        ),
        token_cluster=torch.cat(
            [s.token_cluster + first for s, first in zip(segments, first_cluster, strict=False)],
            dim=1,
        ),
        variance_scales=torch.cat([s.variance_scales for s in segments], 1) if profiled else None,
        variance_profiles=(torch.cat([s.variance_profiles for s in segments], 1) if profiled
                           else None),  # fmt: skip
    )
