"""Baselines, sparse attention and quality measures against float64 references."""

import json
import math
import subprocess
import sys

import pytest
import torch

from tactic_server.tactic import (
    attention_probabilities,
    dense_attention,
    error_bound,
    output_error,
    plan_dense,
    plan_oracle,
    plan_quest,
    plan_tactic,
    plan_topk,
    recall,
    sparse_attention,
)
from tactic_server.tactic.evaluation import METHODS
from tactic_server.tactic.plan import plan_from_mask
from tactic_server.tactic.workloads import WORKLOAD_KINDS, generate_workload


def reference_attention(query, keys, values, kept):
    """float64 softmax attention with positions outside kept [H_kv, n] masked out."""
    num_kv_heads, dim = keys.shape[1], keys.shape[2]
    group = query.shape[0] // num_kv_heads
    scores = torch.einsum(
        "qd,nqd->qn", query.double(), keys.double().repeat_interleave(group, dim=1)
    ) / math.sqrt(dim)
    mask = kept.repeat_interleave(group, dim=0)
    weights = torch.softmax(scores.masked_fill(~mask, -math.inf), dim=-1).nan_to_num(0.0)
    return torch.einsum("qn,nqd->qd", weights, values.double().repeat_interleave(group, dim=1))


@pytest.fixture
def small():
    generator = torch.Generator().manual_seed(11)
    query = torch.randn(8, 32, generator=generator) * 2
    keys = torch.randn(301, 2, 32, generator=generator)
    values = torch.randn(301, 2, 48, generator=generator)
    return query, keys, values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_attention_matches_reference(small, dtype):
    query, keys, values = (t.to(dtype) for t in small)
    kept = torch.rand(2, 301, generator=torch.Generator().manual_seed(1)) < 0.3
    plan = plan_from_mask(kept, kept[:, None, :].expand(-1, 4, -1))
    expected = reference_attention(query, keys, values, kept)
    torch.testing.assert_close(
        sparse_attention(query, keys, values, plan).double(), expected, atol=1e-5, rtol=1e-5
    )


def test_dense_plan_is_dense_attention(small):
    query, keys, values = small
    plan = plan_dense(query, keys)
    expected = reference_attention(query, keys, values, torch.ones(2, 301, dtype=torch.bool))
    float32 = {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(
        sparse_attention(query, keys, values, plan).double(), expected, **float32
    )
    torch.testing.assert_close(dense_attention(query, keys, values).double(), expected, **float32)
    torch.testing.assert_close(recall(query, keys, plan), torch.ones(8))


def test_empty_selection_gives_zero_output(small):
    query, keys, values = small
    nothing = torch.zeros(2, 301, dtype=torch.bool)
    plan = plan_from_mask(nothing, nothing[:, None, :].expand(-1, 4, -1))
    assert torch.equal(sparse_attention(query, keys, values, plan), torch.zeros(8, 48))
    assert torch.equal(recall(query, keys, plan), torch.zeros(8))


@pytest.mark.parametrize("target", [0.3, 0.9, 0.99])
def test_oracle_is_minimal_per_query_head(small, target):
    query, keys, _ = small
    plan = plan_oracle(query, keys, target)
    probabilities = attention_probabilities(query, keys).double()
    for head in range(8):
        ranked = probabilities[head].sort(descending=True).values
        count = int(plan.query_head_counts[head])
        assert ranked[:count].sum() >= target - 1e-5
        assert ranked[: count - 1].sum() < target + 1e-5  # one fewer would miss P
    assert (recall(query, keys, plan) >= target - 1e-5).all()


def test_topk_reads_exactly_its_budget(small):
    query, keys, _ = small
    plan = plan_topk(query, keys, 50)
    assert plan.selected_counts.tolist() == [50, 50]
    # nothing left out weighs more (summed over the group) than what was kept
    weights = attention_probabilities(query, keys).reshape(2, 4, -1).sum(dim=1)
    for head, positions in enumerate(plan.indices):
        left_out = torch.ones(301, dtype=torch.bool)
        left_out[positions] = False
        assert weights[head, positions].min() >= weights[head, left_out].max()


def test_quest_reads_whole_pages_and_bounds_scores(small):
    query, keys, _ = small
    plan = plan_quest(query, keys, 64, page_size=16)
    for positions in plan.indices:
        pages = positions // 16
        assert 300 // 16 in pages.tolist()  # the last, partial page is always read
        assert pages.unique().numel() == 4  # ceil(64 / 16) pages
        counts = torch.bincount(pages, minlength=19)
        assert all(c in (0, 16) for c in counts[:-1].tolist())
    # the page bound is an upper bound: each page's best exact score is at most its bound
    scores = torch.einsum("qd,nqd->qn", query, keys.repeat_interleave(4, dim=1)) / math.sqrt(32)
    lows, highs = (
        keys[:288].reshape(18, 16, 2, 32).amin(1),
        keys[:288].reshape(18, 16, 2, 32).amax(1),
    )
    grouped = query.reshape(2, 4, 32)
    bound = torch.maximum(
        grouped[:, :, None] * lows.permute(1, 0, 2)[:, None],
        grouped[:, :, None] * highs.permute(1, 0, 2)[:, None],
    ).sum(-1)
    exact_best = scores[:, :288].reshape(2, 4, 18, 16).amax(-1)
    assert (exact_best <= bound / math.sqrt(32) + 1e-5).all()


def test_budget_checks(small):
    query, keys, _ = small
    for bad in (0, -3, 2.5, None):
        with pytest.raises(ValueError, match="budget"):
            plan_topk(query, keys, bad)
        with pytest.raises(ValueError, match="budget"):
            plan_quest(query, keys, bad)


@pytest.mark.parametrize("kind", WORKLOAD_KINDS)
def test_error_bound_holds(kind):
    """||o - o_hat|| <= 2 (1 - recall) max ||v|| for every query head, at several targets."""
    workload = generate_workload(kind, seq_len=3000, num_q_heads=8, num_kv_heads=2, seed=4)
    dense = dense_attention(workload.query, workload.keys, workload.values).double()
    for target in (0.5, 0.9, 0.99):
        plan = plan_tactic(workload.query, workload.keys, target)
        recalled = recall(workload.query, workload.keys, plan)
        sparse = sparse_attention(workload.query, workload.keys, workload.values, plan).double()
        distance = (sparse - dense).norm(dim=-1)
        assert (distance <= error_bound(recalled, workload.values).double() + 1e-5).all()
        relative = output_error(workload.query, workload.keys, workload.values, plan)
        torch.testing.assert_close(
            relative.double(), distance / dense.norm(dim=-1), rtol=1e-4, atol=1e-6
        )


def test_eval_attention_command(tmp_path):
    """The CLI runs every method on every workload and writes the records the README quotes."""
    output = tmp_path / "eval.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tactic_server.cli",
            "eval-attention",
            "--seq-len",
            "1500",
            "--q-heads",
            "4",
            "--kv-heads",
            "2",
            "--seeds",
            "0",
            "--targets",
            "0.5",
            "0.9",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "tactic_segment" in result.stdout and "flat seed 0" in result.stderr
    report = json.loads(output.read_text())
    records = report["records"]
    assert len(records) == len(WORKLOAD_KINDS) * 2 * len(METHODS)
    for record in records:
        assert 0 < record["selected_ratio"] <= 1 and 0 <= record["mean_recall"] <= 1 + 1e-6
        if record["method"] == "oracle":
            assert record["overshoot"] == 1.0 and record["share_meeting_target_strict"] == 1.0
    # two summary rows (one per target) and one detailed row per workload and target
    assert (tmp_path / "eval.md").read_text().count("| tactic_whole |") == 2 + 2 * len(
        WORKLOAD_KINDS
    )


def test_eval_attention_rejects_bad_arguments():
    result = subprocess.run(
        [sys.executable, "-m", "tactic_server.cli", "eval-attention", "--targets", "1.5"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "(0, 1]" in result.stderr
