"""Segment-local spherical k-means: structure of the index, statistics against a float64
reference, robustness to degenerate keys, determinism."""

import dataclasses
import math

import pytest
import torch

from tactic_server.tactic import WHOLE_CONTEXT, TacticConfig, build_cluster_index, spherical_kmeans
from tactic_server.tactic.clustering import (
    concatenate_segments,
    decode_variances,
    encode_variances,
    leading_segments,
    query_moments,
    query_weights,
)


def check_index_structure(index, seq_len, num_kv_heads, segment_size):
    """CSR offsets, permutation and inverse map agree with each other."""
    clustered = index.clustered_len
    assert clustered == (seq_len // segment_size) * segment_size if segment_size else seq_len
    for head in range(num_kv_heads):
        offsets = index.cluster_offsets[head]
        assert offsets[0] == 0 and offsets[-1] == clustered
        assert torch.equal(offsets[1:] - offsets[:-1], index.cluster_sizes[head])
        positions = index.token_positions[head]
        assert torch.equal(positions.sort().values, torch.arange(clustered))
        for cluster in range(index.num_clusters):
            members = positions[offsets[cluster] : offsets[cluster + 1]]
            assert (index.token_cluster[head, members] == cluster).all()
            if segment_size and members.numel():
                # a cluster never crosses a segment boundary
                assert (members // segment_size).unique().numel() == 1


@pytest.mark.parametrize(
    "seq_len,segment_size", [(1000, 256), (1024, 256), (37, 16), (5, 16), (300, None), (7, None)]
)
def test_index_structure_and_statistics(seq_len, segment_size):
    generator = torch.Generator().manual_seed(seq_len)
    keys = torch.randn(seq_len, 3, 32, generator=generator).to(torch.bfloat16)
    config = TacticConfig(segment_size=segment_size, centroids="kv")  # the means themselves
    index = build_cluster_index(keys, config)
    isotropic = build_cluster_index(keys, dataclasses.replace(config, variance="isotropic"))
    check_index_structure(index, seq_len, 3, segment_size)
    if segment_size:
        assert index.num_clusters == (seq_len // segment_size) * math.ceil(segment_size / 16)
    else:
        assert index.num_clusters == math.ceil(seq_len / 16)
    # centroids and variances are the mean and per-dimension variance of the members (their
    # mean over the dimensions for isotropic variances)
    reference_keys = keys.double()
    for head in range(3):
        for cluster in range(index.num_clusters):
            start, end = index.cluster_offsets[head, cluster : cluster + 2].tolist()
            if start == end:
                continue
            members = reference_keys[index.token_positions[head, start:end], head]
            mean = members.mean(dim=0)
            variance = (members - mean).square().mean(dim=0)
            torch.testing.assert_close(
                index.centroids[head, cluster].double(), mean, atol=1e-5, rtol=1e-5
            )
            # per-dimension variances are on the float8 e5m2 grid: within half a step (1/9,
            # test_variance_codes)
            torch.testing.assert_close(
                index.variances[head, cluster].double(), variance, atol=1e-5, rtol=1 / 9 + 1e-6
            )
            assert torch.equal(decode_variances(encode_variances(index.variances[head, cluster])),
                               index.variances[head, cluster])  # fmt: skip
            torch.testing.assert_close(
                isotropic.variances[head, cluster].double(), variance.mean(dim=0, keepdim=True),
                atol=1e-5, rtol=1e-4,
            )  # fmt: skip


def test_profile_variances_are_rank_one_per_segment_and_kv_head():
    """variance="profile": each (segment, KV head)'s clusters keep their per-dimension variances
    as one profile times a scale each, the profile the clusters' mean variance of each
    dimension (on float16's grid) and the scale a cluster's mean variance over the profile's
    mean; the index carries both parts, and its variances are their float32 products."""
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(512, 2, 16, generator=generator) * torch.linspace(0.1, 3.0, 16)
    config = TacticConfig(segment_size=128, centroids="kv")
    diagonal = build_cluster_index(keys, config)
    profile = build_cluster_index(keys, dataclasses.replace(config, variance="profile"))
    assert diagonal.variance_scales is None and diagonal.variance_profiles is None
    assert torch.equal(profile.token_cluster, diagonal.token_cluster)  # the same clusters
    clusters = 128 // config.cluster_size
    assert profile.variance_scales.shape == (2, 4 * clusters)
    assert profile.variance_profiles.shape == (2, 4, 16)
    profiles = profile.variance_profiles
    assert torch.equal(profiles, profiles.half().float())
    products = profile.variance_scales[..., None] * profiles.repeat_interleave(clusters, dim=1)
    assert torch.equal(profile.variances, products)
    for head in range(2):
        for segment in range(4):
            part = slice(segment * clusters, (segment + 1) * clusters)
            exact = diagonal.variances[head, part].double()  # on the float8 grid (1/9 a step)
            want_profile = exact.mean(dim=0)
            want = exact.mean(dim=-1, keepdim=True) / want_profile.mean() * want_profile
            torch.testing.assert_close(profile.variances[head, part].double(), want,
                                       atol=1e-5, rtol=0.25)  # fmt: skip
            kept = profile.variances[head, part]
            kept = kept[kept.sum(dim=-1) > 0]  # singletons keep no spread
            shapes = kept / kept.sum(dim=-1, keepdim=True)  # every cluster the same profile
            torch.testing.assert_close(shapes, shapes[:1].expand_as(shapes))
    # a context's leading segments, and segments concatenated, keep the parts they cover
    first = leading_segments(profile, 256)
    assert torch.equal(first.variance_profiles, profiles[:, :2])
    assert torch.equal(first.variance_scales, profile.variance_scales[:, : 2 * clusters])
    profiled = dataclasses.replace(config, variance="profile")
    halves = [build_cluster_index(keys[i : i + 256], profiled) for i in (0, 256)]
    joined = concatenate_segments(halves, 512)
    assert torch.equal(joined.variance_profiles, profiles)
    assert torch.equal(joined.variances, profile.variances)


def test_short_context_has_only_a_tail():
    keys = torch.randn(100, 2, 16)
    index = build_cluster_index(keys, TacticConfig(segment_size=128))
    assert index.clustered_len == 0 and index.num_clusters == 0
    assert index.token_positions.shape == (2, 0)


def test_kmeans_recovers_documents():
    """Keys of documents (contiguous runs) about 8 directions: every found cluster is pure."""
    generator = torch.Generator().manual_seed(1)
    directions = torch.nn.functional.normalize(torch.randn(8, 64, generator=generator), dim=-1)
    labels = torch.randperm(8, generator=generator).repeat_interleave(64)
    scale = torch.rand(512, 1, generator=generator) * 3 + 0.5  # spherical: norm must not matter
    points = (directions[labels] + 0.05 * torch.randn(512, 64, generator=generator)) * scale
    assignments = spherical_kmeans(points[None], num_clusters=8, iterations=10)[0]
    for found in assignments.unique():
        assert labels[assignments == found].unique().numel() == 1
    assert assignments.unique().numel() == 8


def cosine_dispersion(points, assignments):
    """Sum over points of 1 - cos(point, its cluster's mean direction)."""
    unit = torch.nn.functional.normalize(points, dim=-1)
    total = 0.0
    for cluster in assignments.unique():
        members = unit[assignments == cluster]
        total += (1 - members @ torch.nn.functional.normalize(members.sum(0), dim=0)).sum()
    return total


def test_kmeans_beats_positional_groups_on_shuffled_topics():
    """The paper's Table 1 claim: similarity clusters are tighter than positional groups."""
    generator = torch.Generator().manual_seed(2)
    directions = torch.nn.functional.normalize(torch.randn(16, 64, generator=generator), dim=-1)
    labels = torch.randint(16, (1024,), generator=generator)
    points = directions[labels] + 0.3 * torch.randn(1024, 64, generator=generator)
    kmeans = spherical_kmeans(points[None], num_clusters=64, iterations=10)[0]
    positional = torch.arange(1024) // 16
    assert cosine_dispersion(points, kmeans) < 0.7 * cosine_dispersion(points, positional)


def test_degenerate_keys_give_finite_metadata():
    zeros = torch.zeros(512, 2, 32)
    duplicates = torch.randn(1, 2, 32).expand(512, -1, -1).contiguous()
    mixed = torch.cat([zeros[:256], duplicates[:256]])
    for keys in (zeros, duplicates, mixed):
        for config in (TacticConfig(segment_size=128), WHOLE_CONTEXT):
            index = build_cluster_index(keys, config)
            assert torch.isfinite(index.centroids).all() and torch.isfinite(index.variances).all()
            check_index_structure(index, 512, 2, config.segment_size)


def test_clustering_is_deterministic():
    keys = torch.randn(2048, 2, 64, generator=torch.Generator().manual_seed(3))
    first = build_cluster_index(keys, TacticConfig())
    second = build_cluster_index(keys.clone(), TacticConfig())
    assert torch.equal(first.token_positions, second.token_positions)
    assert torch.equal(first.centroids, second.centroids)


def test_outliers_become_singletons():
    """A needle hidden among isotropic keys gets its own cluster, so its centroid is itself."""
    generator = torch.Generator().manual_seed(4)
    keys = torch.randn(1024, 1, 64, generator=generator)
    keys[517, 0] = (
        6.0 * torch.nn.functional.normalize(torch.randn(64, generator=generator), dim=0) * 8
    )
    index = build_cluster_index(keys, TacticConfig(segment_size=1024, centroids="kv"))
    cluster = index.token_cluster[0, 517]
    assert index.cluster_sizes[0, cluster] == 1
    torch.testing.assert_close(index.centroids[0, cluster], keys[517, 0])


def test_concatenated_segments_equal_one_index():
    """Segments clustered one by one (as a prefix cache stores them) join into the index of the
    whole context."""
    keys = torch.randn(700, 2, 32, generator=torch.Generator().manual_seed(9))
    config = TacticConfig(segment_size=128)
    whole = build_cluster_index(keys, config)
    parts = [build_cluster_index(keys[start : start + 128], config) for start in range(0, 640, 128)]
    joined = concatenate_segments(parts, seq_len=700)
    for field in ("centroids", "variances", "cluster_sizes", "cluster_offsets", "token_positions",
                  "token_cluster"):  # fmt: skip
        torch.testing.assert_close(getattr(joined, field), getattr(whole, field))
    assert (joined.seq_len, joined.clustered_len) == (700, 640)


def test_variance_codes():
    """float8 e5m2 values (two mantissa bits), exact fp16 values: within 1/9 (half a step of
    1/4 at a mantissa of 1 + 1/8) from 2^-14 to 2^15.5, zero for zero (singleton clusters),
    the largest finite value above the range (inf included, no NaN); powers of two exact;
    values of decoded values are the same values."""
    values = torch.logspace(-14, 15.5, 2001, base=2.0)
    decoded = decode_variances(encode_variances(values))
    assert ((decoded / values - 1).abs() <= 1 / 9 + 1e-6).all()
    assert torch.equal(decoded.to(torch.float16).float(), decoded)
    powers = 2.0 ** torch.arange(-16, 16, dtype=torch.float32)
    assert torch.equal(decode_variances(encode_variances(powers)), powers)
    edges = torch.tensor([0.0, 2.0**-20, 2.0**20, float("inf")])
    assert decode_variances(encode_variances(edges)).tolist() == [0.0, 0.0, 57344.0, 57344.0]
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e5m2)
    finite = torch.isfinite(codes.float()) & (codes.float() >= 0)
    again = encode_variances(decode_variances(codes[finite]))
    assert torch.equal(again.view(torch.uint8), codes[finite].view(torch.uint8))


@pytest.mark.parametrize("kept", [0, 1, 3])
def test_leading_segments_are_the_index_of_fewer_positions(kept):
    """The first segments of an index are the index built on their positions alone (segments
    are clustered independently); the positions after them are tail."""
    config = TacticConfig(segment_size=32, cluster_size=8)
    keys = torch.randn(100, 2, 16, generator=torch.Generator().manual_seed(1))
    whole = build_cluster_index(keys, config)
    fewer = build_cluster_index(keys[: kept * 32], config)
    cut = leading_segments(whole, kept * 32)
    assert (cut.seq_len, cut.clustered_len) == (100, kept * 32)
    for field in ("centroids", "variances", "cluster_sizes", "cluster_offsets", "token_positions",
                  "token_cluster"):  # fmt: skip
        assert torch.equal(getattr(cut, field), getattr(fewer, field)), field


def test_query_moments_and_weights():
    """query_moments sums squared components over a KV head's query heads and over RoPE pairs;
    query_weights are their root mean squares, normalised, ones where no query was seen."""
    queries = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(2))  # 2 KV heads
    moments = query_moments(queries, 2)
    squared = queries.square().reshape(5, 2, 2, 8).sum(2)
    torch.testing.assert_close(moments, squared[..., :4] + squared[..., 4:])
    summed = moments.sum(0)
    weights = query_weights(torch.stack([summed[0], torch.zeros(4)]))
    torch.testing.assert_close(weights[0, :4], weights[0, 4:])
    torch.testing.assert_close(weights[0].square().mean(), torch.tensor(1.0))
    ratios = (summed[0] / summed[0, 0]).sqrt().repeat(2)
    torch.testing.assert_close(weights[0] / weights[0, 0], ratios)
    assert torch.equal(weights[1], torch.ones(8))


def quiet_topics(generator, tokens=512, dim=64, topics=8):
    """Keys whose topic lies in a few quiet dimensions (0-3 and their RoPE partners 32-35) under
    loud noise in all the others, and prompt queries that read the quiet ones only."""
    quiet = torch.tensor([0, 1, 2, 3, 32, 33, 34, 35])
    topic = torch.randint(topics, (tokens,), generator=generator)
    centres = torch.randn(topics, quiet.numel(), generator=generator)
    keys = 4.0 * torch.randn(tokens, 1, dim, generator=generator)
    keys[:, 0, quiet] = centres[topic] + 0.05 * torch.randn(tokens, quiet.numel(),
                                                             generator=generator)  # fmt: skip
    queries = torch.zeros(64, 2, dim)
    queries[..., quiet] = torch.randn(64, 2, quiet.numel(), generator=generator)
    return keys, topic, query_moments(queries, 1).sum(0)


def topic_purity(index, topic) -> float:
    """Share of tokens in their cluster's most common topic."""
    clusters = index.token_cluster[0]
    positions = torch.arange(clusters.numel())
    kept = 0
    for cluster in clusters.unique():
        members = topic[positions[clusters == cluster]]
        kept += members.bincount().max().item()
    return kept / clusters.numel()


def test_query_weighted_clustering_groups_keys_by_what_the_queries_read():
    """Scaled by the prompt queries' moments, k-means finds the topics that the quiet dimensions
    hold (what q.k depends on) where unscaled it follows the loud noise; the scaling is that of
    k-means alone: centroids and variances are of the keys themselves. Without moments, or with
    query_weighted off, the index is the unweighted one."""
    keys, topic, moments = quiet_topics(torch.Generator().manual_seed(5))
    config = TacticConfig(segment_size=256, cluster_size=16, outlier_share=0.0, centroids="kv",
                          query_weighted=False)
    weighted_config = dataclasses.replace(config, query_weighted=True)
    plain = build_cluster_index(keys, config)
    weighted = build_cluster_index(keys, weighted_config, query_moments=moments)
    assert topic_purity(weighted, topic) > 0.95 > 0.6 > topic_purity(plain, topic)
    # the same function as k-means on the scaled keys, segment by segment
    scaled = keys[:, 0] * query_weights(moments)[0]
    for segment in range(2):
        rows = slice(segment * 256, (segment + 1) * 256)
        want = spherical_kmeans(scaled[rows][None], 16, config.kmeans_iterations)[0]
        got = weighted.token_cluster[0, rows] - segment * 16
        assert torch.equal(got, want)
    for cluster in range(weighted.num_clusters):
        members = weighted.token_positions[0, weighted.cluster_offsets[0, cluster]:
                                           weighted.cluster_offsets[0, cluster + 1]]  # fmt: skip
        if members.numel():
            torch.testing.assert_close(weighted.centroids[0, cluster], keys[members, 0].mean(0))
    unseen = torch.zeros_like(moments)
    for same in (build_cluster_index(keys, weighted_config),
                 build_cluster_index(keys, config, query_moments=moments),
                 build_cluster_index(keys, weighted_config, query_moments=unseen)):
        assert torch.equal(same.token_cluster, plain.token_cluster)
