"""Segment k-means kernel against spherical_kmeans: the same assignments on random and degenerate
keys, every output written, the same cluster index; on a GPU, agreement at a Llama-like shape."""

import functools

import pytest
import torch
import torch.nn.functional as F
from tactic_server.kernels.kmeans import segment_kmeans

from tactic_server.tactic import TacticConfig, build_cluster_index, spherical_kmeans
from tactic_server.tactic.workloads import generate_workload

# the interpreter runs on CPU tensors (see conftest); a CUDA machine runs the compiled kernel
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def assert_every_point_assigned(assignments, batch, num_points, num_clusters):
    """The launcher poisons its output with -1: a point the kernel skipped would show."""
    assert assignments.shape == (batch, num_points)
    assert assignments.dtype == torch.long
    assert ((assignments >= 0) & (assignments < num_clusters)).all()


@pytest.mark.parametrize(
    "batch,num_points,dim,num_clusters,iterations,dtype",
    [
        (3, 1, 32, 1, 10, torch.float32),
        (2, 5, 32, 7, 1, torch.bfloat16),
        (2, 5, 64, 16, 10, torch.float32),  # more clusters than points: duplicate centroids
        (4, 100, 32, 7, 10, torch.float32),
        (2, 100, 48, 16, 10, torch.float16),  # d padded to BLOCK_D = 64
        (2, 100, 64, 7, 1, torch.bfloat16),  # one iteration already moves 12 points
        (1, 257, 64, 64, 10, torch.float32),
        (2, 257, 32, 16, 0, torch.bfloat16),
        (1, 257, 32, 16, 10, torch.bfloat16),
    ],
)
def test_matches_spherical_kmeans_on_random_points(
    batch, num_points, dim, num_clusters, iterations, dtype
):
    generator = torch.Generator().manual_seed(num_points * 1000 + num_clusters)
    points = torch.randn(batch, num_points, dim, generator=generator).to(DEVICE, dtype)
    # precise: IEEE float32 similarities on a GPU too (the interpreter always computes so)
    assignments = segment_kmeans(points, num_clusters, iterations, precise=True)
    assert_every_point_assigned(assignments, batch, num_points, num_clusters)
    # both compute in float32; continuous random points leave no exact ties to break differently
    expected = spherical_kmeans(points.float(), num_clusters, iterations)
    assert torch.equal(assignments, expected)


def degenerate_points(kind: str) -> torch.Tensor:
    """[2, 70, 32] points on which a careless k-means divides by zero or splits equal keys."""
    generator = torch.Generator().manual_seed(7)
    if kind == "all_zero":
        return torch.zeros(2, 70, 32)
    if kind == "duplicates":
        return torch.randn(2, 1, 32, generator=generator).expand(2, 70, 32).contiguous()
    if kind == "exact_duplicates":
        # unit vector and every member sum are exact in float32, so no rounding can break ties
        return torch.zeros(2, 70, 32).index_fill_(2, torch.tensor([3, 8, 9, 20]), 2.0)
    points = torch.randn(2, 70, 32, generator=generator)
    points[:, ::3] = 0.0  # zero keys among random ones
    return points


@pytest.mark.parametrize("kind", ["all_zero", "duplicates", "exact_duplicates", "some_zero"])
def test_degenerate_points(kind):
    points = degenerate_points(kind).to(DEVICE)
    assignments = segment_kmeans(points, 16, 10, precise=True)
    assert_every_point_assigned(assignments, 2, 70, 16)
    if kind != "some_zero":
        # equal keys always share a cluster
        assert (assignments == assignments[:, :1]).all()
    if kind != "duplicates":
        assert torch.equal(assignments, spherical_kmeans(points, 16, 10))
    if kind in ("all_zero", "some_zero"):
        # a zero key is equally similar to every centroid: the lowest cluster wins the tie
        assert (assignments[points.norm(dim=-1) == 0] == 0).all()


def test_emptied_cluster_keeps_its_centroid():
    # the first and last keys are equal, so clusters 0 and 1 start equal and cluster 1 (losing
    # every tie) is empty after the first update; keeping its centroid lets it take back the keys
    # nearest it in the second, where a zeroed centroid would have lost them to cluster 0
    generator = torch.Generator().manual_seed(5)
    points = torch.randn(2, 40, 32, generator=generator)
    points[:, -1] = points[:, 0]
    points = points.to(DEVICE)
    assignments = segment_kmeans(points, 2, 2, precise=True)
    assert_every_point_assigned(assignments, 2, 40, 2)
    assert (assignments[:, [0, -1]] == 1).all()
    assert torch.equal(assignments, spherical_kmeans(points, 2, 2))


def test_same_cluster_index_as_torch_kmeans():
    # one full segment of 256 positions per KV head and a 44-position unclustered tail
    generator = torch.Generator().manual_seed(11)
    keys = torch.randn(300, 2, 32, generator=generator).to(DEVICE, torch.bfloat16)
    config = TacticConfig(segment_size=256)
    index = build_cluster_index(
        keys, config, kmeans=functools.partial(segment_kmeans, precise=True)
    )
    expected = build_cluster_index(keys, config)
    assert torch.equal(index.token_positions, expected.token_positions)
    assert torch.equal(index.cluster_offsets, expected.cluster_offsets)


@pytest.mark.parametrize(
    "shape,num_clusters,message",
    [
        ((2, 0, 32), 4, "m >= 1"),
        ((2, 8, 257), 4, "dimension"),
        ((2, 8, 32), 0, "num_clusters"),
        ((2, 8, 32), 129, "num_clusters"),
        ((8, 32), 4, r"\[B, m, d\]"),
    ],
)
def test_rejects_unsupported_shapes(shape, num_clusters, message):
    with pytest.raises(ValueError, match=message):
        segment_kmeans(torch.zeros(shape, device=DEVICE), num_clusters, 10)


def test_rejects_integer_points():
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        segment_kmeans(torch.zeros(2, 8, 32, dtype=torch.int32, device=DEVICE), 4, 10)


def cosine_dispersion(points: torch.Tensor, assignments: torch.Tensor, num_clusters: int):
    """Mean over points of 1 - cos(point, normalised sum of its cluster's unit points)."""
    unit = F.normalize(points.float(), dim=-1)
    index = assignments.unsqueeze(-1).expand_as(unit)
    sums = torch.zeros(*unit.shape[:1], num_clusters, unit.shape[-1], device=unit.device)
    directions = F.normalize(sums.scatter_add_(1, index, unit), dim=-1)
    return (1 - (unit * torch.gather(directions, 1, index)).sum(dim=-1)).mean().item()


@pytest.mark.gpu
def test_llama_shape_on_gpu_agrees_with_torch():
    # Llama-3.1-8B keys: 8 segments of 1,024 positions x 8 KV heads, head_dim 128, in bfloat16;
    # 48 k-means clusters per segment (64 less the outlier singletons), as build_cluster_index
    keys = generate_workload("topics", seq_len=8192, num_kv_heads=8, head_dim=128, seed=3).keys
    points = (
        keys.reshape(8, 1024, 8, 128).permute(0, 2, 1, 3).reshape(64, 1024, 128).to(torch.bfloat16)
    ).cuda()
    assignments = segment_kmeans(points, 48, 10)
    expected = spherical_kmeans(points.float(), 48, 10)
    assert_every_point_assigned(assignments, 64, 1024, 48)
    # tf32 similarities turn some near ties the other way, and k-means carries that on
    agreement = (assignments == expected).float().mean().item()
    assert agreement >= 0.99
    dispersion = cosine_dispersion(points, assignments, 48)
    expected_dispersion = cosine_dispersion(points, expected, 48)
    assert abs(dispersion - expected_dispersion) <= 0.01 * expected_dispersion


@pytest.mark.gpu
@pytest.mark.parametrize("dim,num_clusters", [(256, 128), (200, 100)])
def test_largest_blocks_on_gpu_match_exactly(dim, num_clusters):
    # the largest centroid blocks take 32-point blocks and 8 warps to fit shared memory
    generator = torch.Generator().manual_seed(dim)
    points = torch.randn(4, 300, dim, generator=generator).to(DEVICE, torch.bfloat16)
    assignments = segment_kmeans(points, num_clusters, 10, precise=True)
    assert_every_point_assigned(assignments, 4, 300, num_clusters)
    assert torch.equal(assignments, spherical_kmeans(points.float(), num_clusters, 10))
