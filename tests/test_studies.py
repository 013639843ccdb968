"""The CPU studies' own arithmetic: benchmarks/estimator_study.py's variance forms (kept per group
of dimensions, or as a per-segment profile times a per-cluster scale; centroids kept as a few
coordinates in a basis of the keys' principal directions) and
benchmarks/reuse_study.py's mass of a reused selection, on small hand-checked inputs, and the
reuse study end to end on a capture file it reads as the recorded ones; the cuts of
benchmarks/ablate_scoring.py still apply to the scoring kernel."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def load(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))  # estimator_study imports accuracy lazily
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_group_means_average_each_group_of_dimensions():
    study = load("estimator_study")
    variances = torch.arange(16.0).reshape(1, 2, 8)
    grouped = study.group_means(variances, 4)
    assert grouped.shape == variances.shape
    assert grouped[0, 0].tolist() == [1.5] * 4 + [5.5] * 4
    assert torch.equal(study.group_means(variances, 1), variances)


def test_segment_profile_keeps_rank_one_variances_and_each_clusters_mean():
    study = load("estimator_study")
    generator = torch.Generator().manual_seed(0)
    profile = torch.rand(2, 3, 1, 8, generator=generator) + 0.1  # [H, segments, 1, d]
    scale = torch.rand(2, 3, 4, 1, generator=generator) + 0.1  # [H, segments, clusters, 1]
    rank_one = (scale * profile).reshape(2, 12, 8)
    torch.testing.assert_close(study.segment_profile(rank_one, 4), rank_one)
    noisy = rank_one * (1 + 0.5 * torch.rand(rank_one.shape, generator=generator))
    kept = study.segment_profile(noisy, 4)
    torch.testing.assert_close(kept.mean(-1), noisy.mean(-1))  # each cluster's mean variance
    per_segment = kept.reshape(2, 3, 4, 8)
    ratios = per_segment / per_segment[:, :, :1]  # every cluster a multiple of one profile
    torch.testing.assert_close(ratios, ratios[..., :1].expand_as(ratios))


def test_low_rank_centroids_keep_what_the_basis_spans_and_count_the_rest_as_variance():
    study = load("estimator_study")
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(64, 2, 8, generator=generator)  # [n, H_kv, d], two segments of 32
    centroids = torch.randn(2, 6, 8, generator=generator)  # three clusters a segment
    variances = torch.rand(2, 6, 8, generator=generator)
    for segments in (1, 2):  # full rank, unquantized: nothing changes
        kept, spread = study.low_rank_centroids(centroids, variances, keys, 8, segments,
                                                quantize=False)  # fmt: skip
        torch.testing.assert_close(kept, centroids)
        torch.testing.assert_close(spread, variances)
    # keys along one direction: a rank-1 basis is that direction; a centroid off it keeps its
    # part along it, and the rest becomes variance, per dimension, the mean over the clusters
    direction = torch.tensor([0.6, 0.8])
    line = torch.linspace(-3, 3, 8)[:, None, None] * direction  # [8, 1, 2]
    on_line = (2.0 * direction).reshape(1, 1, 2)
    off_line = torch.tensor([[[1.0, 0.0]]])
    kept, spread = study.low_rank_centroids(torch.cat([on_line, off_line], 1),
                                            torch.zeros(1, 2, 2), line, 1, 1,
                                            quantize=False)  # fmt: skip
    torch.testing.assert_close(kept[0, 0], on_line[0, 0])
    torch.testing.assert_close(kept[0, 1], 0.6 * direction)  # its projection on the line
    residual = torch.tensor([1.0, 0.0]) - 0.6 * direction
    torch.testing.assert_close(spread[0, 0], residual.square() / 2)  # the mean over 2 clusters
    torch.testing.assert_close(spread[0, 1], residual.square() / 2)
    quantized, _ = study.low_rank_centroids(centroids, variances, keys, 8, 1)  # float8 grid
    assert 0 < (quantized - centroids).abs().max() < 0.2


def test_covered_mass_counts_kept_and_added_positions():
    study = load("reuse_study")
    query = torch.zeros(2, 4)
    keys = torch.zeros(10, 1, 4)  # equal scores: each position holds a tenth
    kept = [torch.tensor([0, 1, 2])]
    torch.testing.assert_close(study.covered_mass(query, keys, kept, range(0)),
                               torch.full((2,), 0.3))  # fmt: skip
    torch.testing.assert_close(study.covered_mass(query, keys, kept, range(8, 10)),
                               torch.full((2,), 0.5))  # fmt: skip


def test_reuse_study_on_a_capture(tmp_path):
    """A capture of one prompt (8 consecutive positions) in the recorded format: at age 0 the
    reused plan is the fresh one, and every age has its row."""
    study = load("reuse_study")
    generator = torch.Generator().manual_seed(1)
    keys = torch.randn(300, 1, 16, generator=generator)
    queries = [(position, 3 * torch.randn(2, 16, generator=generator))
               for position in range(299, 291, -1)]  # newest first, as recorded
    torch.save({"layer 0 prompt 0": {"queries": queries, "keys": keys}}, tmp_path / "c.pt")
    config = study.TacticConfig(segment_size=64)
    (rows,) = study.study([tmp_path / "c.pt"], 0.9, config).values()
    assert sorted(rows) == list(range(8))
    assert rows[0]["meeting"] == rows[0]["fresh_meeting"]
    assert rows[0]["tokens_over_fresh"] == 1.0
    assert all(0.0 < row["mean_mass"] <= 1.0 for row in rows.values())
    assert "| c.pt | 7 |" in study.markdown({"c.pt": rows}, 0.9)


def test_the_scoring_ablations_still_cut_the_kernel_they_name():
    """benchmarks/ablate_scoring.py cuts text out of kernels/selection.py: each cut still finds
    its text there (a kernel edit that moved it fails here, not on the GPU), changes the
    source, and the variant loads as a module with its own select_rows."""
    ablation = load("ablate_scoring")
    source = ablation.SOURCE.read_text()
    for name, cuts in ablation.CUTS.items():
        for old, new in cuts:
            assert ablation.apply(source, old, new) != source, name
        module = ablation.load_variant(name, cuts)
        assert callable(module.select_rows)
        assert (Path(module.__file__).read_text() == source) == (not cuts), name
