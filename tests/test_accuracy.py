"""benchmarks/accuracy.py end to end on the CPU, on a model the training script makes in a few
seconds: every (task, context, method) has an accuracy, every layer and method its attention
record, the oracle meets each target, Quest and top-k get Tactic's budget, per-head records,
perplexity and the goals are there."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from tactic_server.training.train import TrainConfig, train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def load_accuracy():
    spec = importlib.util.spec_from_file_location("accuracy", ROOT / "benchmarks" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_accuracy_report_covers_every_method(tmp_path):
    corpus = (str(ROOT / "tactic_server"), str(ROOT / "tests"))
    train(TrainConfig(out=str(tmp_path / "run"), roots=corpus, steps=10, seq_len=512, batch=2,
                      layers=2, hidden=128, heads=4, kv_heads=1, head_dim=32, intermediate=256,
                      vocab_size=600, warmup=2, max_position_embeddings=2048, device="cpu"),
          log=lambda line: None)  # fmt: skip
    out = tmp_path / "accuracy"
    load_accuracy().main(["--model", str(tmp_path / "run" / "model"), "--lengths", "512", "1024",
                          "--trials", "2", "--attention-prompts", "1", "--attention-length",
                          "1536", "--roots", *corpus, "--perplexity-tokens", "3000",
                          "--tasks", "passkey", "multikey", "niah_multivalue",
                          "--haystack", str(ROOT / "tactic_server"),
                          "--out", str(out), "--device", "cpu"])  # fmt: skip
    result = json.loads(Path(f"{out}.json").read_text())
    cells = {(r["task"], r["context"], r["method"]) for r in result["retrieval"]}
    methods = {"dense", "tactic_0.75", "tactic_0.9", "tactic_0.95", "oracle_0.9",
               "quest_at_tactic_0.9", "topk_at_tactic_0.9"}
    assert cells == {(t, n, m) for t in ("passkey", "multikey", "niah_multivalue")
                     for n in (512, 1024)
                     for m in methods}  # fmt: skip
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in result["retrieval"])
    by_cell = {(r["task"], r["context"], r["method"]): r for r in result["retrieval"]}
    for task, context, method in cells:  # Quest and top-k read what Tactic read at P = 0.9
        if method.endswith("_at_tactic_0.9"):
            budget = by_cell[(task, context, "tactic_0.9")]["selected_ratio"]
            assert by_cell[(task, context, method)]["selected_ratio"] == pytest.approx(
                budget, abs=0.02)
        if method == "dense":
            assert by_cell[(task, context, method)]["selected_ratio"] == 1.0
    attention = {(r["workload"], r["method"], r["target"]) for r in result["attention"]}
    names = ("tactic_segment", "tactic_whole", "oracle", "quest", "topk")
    assert attention == {(f"layer {layer}", name, target) for layer in (0, 1) for name in names
                         for target in (0.75, 0.9, 0.95)}  # fmt: skip
    for record in result["attention"]:
        if record["method"] == "oracle":
            assert record["share_meeting_target_strict"] == 1.0
    # 4 query heads at 4 decode positions
    assert len(result["per_head"]) == len(result["attention"]) * 4 * 4
    assert {r["context"] for r in result["attention"]} == {1536}
    assert result["complete"] and set(result["goals"]) >= {
        "retrieval_within_1_point", "share_meeting_target_met", "overshoot_met",
        "better_than_quest"}
    assert math.isfinite(result["perplexity"]["perplexity"])
    report = Path(f"{out}.md").read_text()
    assert report.startswith("| task | context | method | accuracy | selected |")
    assert "Goals at P = 0.9:" in report

    only = tmp_path / "variants"
    load_accuracy().main(["--model", str(tmp_path / "run" / "model"), "--attention-only",
                          "--attention-prompts", "1", "--attention-length", "1536",
                          "1024", "--attention-steps", "1", "--tactic-variant", "cluster_size=8",
                          "--tactic-variant", "estimator=inverse_fit,exact_tokens=true",
                          "--haystack", str(ROOT / "tactic_server"), "--out", str(only),
                          "--device", "cpu"])  # fmt: skip
    variants = json.loads(Path(f"{only}.json").read_text())
    assert "retrieval" not in variants
    assert {r["method"] for r in variants["attention"]} == {
        *names, "tactic_segment cluster_size=8",
        "tactic_segment estimator=inverse_fit,exact_tokens=true"}
    assert {r["context"] for r in variants["attention"]} == {1536, 1024}
    assert Path(f"{only}.md").read_text().startswith("At P = 0.9, heads >= P-0.01")
    load_accuracy().main(["--report", str(only)])  # the goals of an attention-only result
    again = json.loads(Path(f"{only}.json").read_text())["goals"]
    assert again["retrieval_tactic"] is None and 0 <= again["share_meeting_target"] <= 1
    assert set(again["by_method"]) == {m for m in {r["method"] for r in variants["attention"]}
                                       if m.startswith("tactic")}  # fmt: skip
    assert "(query head, step) meeting P" in Path(f"{only}.md").read_text()
