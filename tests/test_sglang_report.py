"""benchmarks/sglang_report.py: medians leave out rounds that came out negative, ratios and goals
come only from rows of the same run and never from a superseded run, Tactic's speed (the faster
of the tactic backend and tactic-fa3, its FA3-based twin) is judged
against the fastest dense backend of its line (fa3 among them where the run measured it, and not
in runs that measured triton alone), a backend a run could not measure is shown with its reason,
a run from before the Tactic graphs counts as eager, and the committed sglang_h200.json is what
the script makes from the committed results."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_report():
    path = ROOT / "benchmarks" / "sglang_report.py"
    spec = importlib.util.spec_from_file_location("sglang_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(backend, mode, context, batch, rounds, selected=None, steady=None, fallback=None):
    out = dict(backend=backend, mode=mode, context=context, batch=batch, rounds=rounds,
               decode_tokens_per_s=sorted(rounds)[len(rounds) // 2],
               selected_ratio=selected, dense_fallback_share=fallback)  # fmt: skip
    return out | ({"steady_rounds": steady} if steady else {})


def write_results(folder: Path) -> None:
    trained = {"model": "tiny (trained, 2 layers)", "decode_tokens": 256, "command": "c1", "rows": [
        row("flashinfer", "dense", 131072, 1, [150.0]),
        row("flashinfer", "dense", 131072, 8, [500.0], steady=[400.0]),
        row("triton", "dense", 131072, 1, [-500.0, 100.0, 110.0]),
        row("tactic", "dense", 131072, 1, [98.0, 99.0]),
        row("tactic", "tactic_0.9", 131072, 1, [300.0, 320.0], selected=0.25),
        row("triton", "dense", 131072, 8, [400.0, 420.0], steady=[450.0, 440.0, 460.0]),
        row("tactic", "dense", 131072, 8, [300.0, 320.0], steady=[440.0, 445.0, 430.0]),
        row("tactic", "tactic_0.9", 131072, 8, [600.0, 640.0], selected=0.3,
            steady=[900.0, 1000.0, 950.0]),
        row("tactic-eager", "tactic_0.9", 131072, 8, [200.0, 220.0], selected=0.3,
            steady=[230.0]),
    ], "unavailable": {"fa3": "sgl_kernel.flash_ops not staged"}}  # fmt: skip
    with_fa3 = {"model": "8B dummy", "decode_tokens": 64, "command": "c3", "rows": [
        row("flashinfer", "dense", 65536, 1, [40.0]),
        row("fa3", "dense", 65536, 1, [50.0]),
        row("tactic", "tactic_0.9", 65536, 1, [45.0], selected=0.9),
        row("tactic-fa3", "dense", 65536, 1, [49.0]),
        row("tactic-fa3", "tactic_0.9", 65536, 1, [55.0], selected=0.4, fallback=0.1)]}
    flat = {"model": "8B dummy", "decode_tokens": 64, "command": "c2", "tactic_graphs": False,
            "rows": [row("triton", "dense", 65536, 1, [30.0]),
                     row("tactic", "dense", 65536, 1, [31.0]),
                     row("tactic", "tactic_0.9", 65536, 1, [10.0], selected=0.99),
                     dict(backend="triton", context=131072, batch=8, skipped="too big")]}
    # over flashinfer, with the dense fallback: flat attention decodes dense
    fallback = {"model": "8B dummy", "decode_tokens": 64, "command": "c4",
                "tactic_dense_backend": "flashinfer", "rows": [
                    row("flashinfer", "dense", 32768, 1, [100.0]),
                    row("triton", "dense", 32768, 1, [40.0]),
                    row("tactic", "dense", 32768, 1, [99.0]),
                    row("tactic", "tactic_0.9", 32768, 1, [98.0], selected=1.0, fallback=0.97),
                    row("tactic-select", "tactic_0.9", 32768, 1, [60.0], selected=0.997)]}
    equality = {"model": "tiny, float32", "tokens": 32,
                "runs": {"tactic_0.999": {"tokens_equal_before_first_difference": [32, 32, 5]}}}
    old = {"model": "tiny (trained, 2 layers)", "decode_tokens": 256, "command": "c0",
           "superseded": "before a fix", "rows": [
               row("triton", "dense", 131072, 8, [400.0]),
               row("tactic", "dense", 131072, 8, [100.0]),
               row("tactic", "tactic_0.9", 131072, 8, [40.0], selected=0.3)]}  # fmt: skip
    (folder / "sglang_throughput_trained_dev.json").write_text(json.dumps(trained))
    (folder / "sglang_throughput_old_dev.json").write_text(json.dumps(old))
    (folder / "sglang_throughput_flat_dev.json").write_text(json.dumps(flat))
    (folder / "sglang_throughput_fa3_dev.json").write_text(json.dumps(with_fa3))
    (folder / "sglang_throughput_fallback_dev.json").write_text(json.dumps(fallback))
    (folder / "sglang_equality_float32_dev.json").write_text(json.dumps(equality))


def test_rows_ratios_and_goals(tmp_path):
    report = load_report()
    write_results(tmp_path)
    summary = report.build("dev", tmp_path)
    runs = {run["file"]: run for run in summary["runs"]}
    trained = runs["sglang_throughput_trained_dev.json"]
    assert trained["trained"] and not runs["sglang_throughput_flat_dev.json"]["trained"]
    b1, b8 = trained["lines"]
    assert b1["triton"] == 105.0 and b1["invalid_rounds"] == {"triton": 1}  # median of 100, 110
    assert b1["graphs / triton"] == 310.0 / 105.0
    assert b8["graphs / triton"] == 620.0 / 410.0
    # against the fastest dense backend of the line: flashinfer end to end, triton steady at b8
    assert (b1["fastest dense"], b1["graphs / fastest dense"]) == ("flashinfer", 310.0 / 150.0)
    assert (b8["fastest dense"], b8["graphs / fastest dense"]) == ("flashinfer", 620.0 / 500.0)
    assert b8["tactic P = 0.9, eager"] == 210.0 and b8["selected"] == 0.3
    assert abs(b8["overhead at P = 1"] - (1 - 310.0 / 410.0)) < 1e-12
    # steady cells: medians of the steady rounds, eager left out, ratios of their own
    assert "steady" not in b1
    assert b8["steady"] == {"flashinfer": 400.0, "triton": 450.0, "tactic, dense requests": 440.0,
                            "tactic P = 0.9, graphs": 950.0, "fastest dense": "triton",
                            "tactic": "tactic",
                            "graphs / fastest dense": 950.0 / 450.0,
                            "graphs / triton": 950.0 / 450.0,
                            "graphs / dense requests": 950.0 / 440.0,
                            "overhead at P = 1": 1 - 440.0 / 450.0}  # fmt: skip

    assert trained["unavailable"] == {"fa3": "sgl_kernel.flash_ops not staged"}
    (fa3_line,) = runs["sglang_throughput_fa3_dev.json"]["lines"]
    # Tactic as run is the faster of its two bases: over FA3 here, 55 tok/s against fa3's 50
    assert (fa3_line["fastest dense"], fa3_line["tactic"], fa3_line["graphs / fastest dense"]) \
        == ("fa3", "tactic-fa3", 55 / 50)
    assert (fa3_line["selected"], fa3_line["selected, tactic-fa3"]) == (0.9, 0.4)
    assert abs(fa3_line["overhead at P = 1, tactic-fa3"] - (1 - 49 / 50)) < 1e-12
    assert runs["sglang_throughput_fa3_dev.json"]["unavailable"] == {}

    flat = runs["sglang_throughput_flat_dev.json"]["lines"]
    assert flat[0]["tactic P = 0.9, eager"] == 10.0  # before the graphs: not a graph row
    assert "tactic P = 0.9, graphs" not in flat[0]
    assert "fastest dense" not in flat[0]  # triton alone: nobody's fastest choice
    assert flat[1]["skipped"] == "too big"

    old = runs["sglang_throughput_old_dev.json"]
    assert old["superseded"] == "before a fix" and old["lines"][0]["graphs / triton"] == 0.1

    goals = summary["goals"]  # the superseded run's 0.1x and 75% overhead are not in them
    speedup = goals["speedup_at_128k_sparse"]
    assert [(m["value"], m["against"]) for m in speedup["measured"]] == [
        (310.0 / 150.0, "flashinfer"), (620.0 / 500.0, "flashinfer")]
    assert speedup["verdict"] == "met in part"  # 2.07x at batch 1, 1.24x at batch 8
    overhead = goals["overhead_at_p1"]
    # the batch-1 line with a negative round is left out; 8B at P = 1 is 3% faster
    # the fallback run's dense requests against flashinfer, the backend they run there
    # tactic-fa3's dense requests against fa3, the backend they run
    assert [(m["context"], m["batch"], m["against"]) for m in overhead["measured"]] == [
        (65536, 1, "fa3"), (32768, 1, "flashinfer"), (65536, 1, "triton"), (131072, 8, "triton")]
    assert abs(overhead["measured"][1]["value"] - 0.01) < 1e-12
    assert overhead["verdict"] == "met in part"
    # flat attention: only the run with the dense fallback, against its fastest dense backend
    assert [(m["value"], m["against"]) for m in goals["flat_attention"]["measured"]] == [
        (0.98, "flashinfer")]
    assert goals["flat_attention"]["verdict"] == "met"
    (line,) = runs["sglang_throughput_fallback_dev.json"]["lines"]
    assert line["dense fallback"] == 0.97 and line["tactic P = 0.9, no fallback"] == 60.0
    assert line["selected"] == 1.0  # the tactic-select row's share does not overwrite it
    # steady goals come from steady cells only: here the one batch-8 line
    assert [m["value"] for m in goals["speedup_at_128k_sparse_steady"]["measured"]] == [
        950.0 / 450.0]
    assert goals["speedup_at_128k_sparse_steady"]["verdict"] == "met"
    assert [m["value"] for m in goals["overhead_at_p1_steady"]["measured"]] == [1 - 440 / 450]
    assert goals["overhead_at_p1_steady"]["verdict"] == "met"
    assert goals["greedy_equality_p0999"]["measured"][0] | {"file": None} == dict(
        file=None, dtype="float32", prompts=3, equal=2)
    assert goals["greedy_equality_p0999"]["verdict"] == "missed"


def test_main_writes_json_markdown_and_plot(tmp_path):
    report = load_report()
    write_results(tmp_path)
    assert report.main(["--device", "dev", "--results", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "sglang_dev.json").read_text())
    markdown = (tmp_path / "sglang_dev.md").read_text()
    assert ("| 131,072 | 1 | 150.0 | - | 105.0 (*) | 98.5 | 310.0 | - | - | - | - | 25.0% | - | "
            "- | - | flashinfer | tactic | 2.07x | 2.95x | 3.15x | 6.2% | - |") in markdown
    assert "**met in part**" in markdown and summary["device"] == "dev"
    assert "Superseded, not in the goals: before a fix" in markdown
    assert "Not measured, unavailable: fa3 (sgl_kernel.flash_ops not staged)" in markdown
    assert ("| 65,536 | 1 | 40.0 | 50.0 | - | - | 45.0 | - | - | 49.0 | 55.0 | 90.0% | - | 40.0% "
            "| 10.0% | fa3 | tactic-fa3 | 1.10x | - | - | - | 2.0% |") in markdown  # fmt: skip
    assert ("| 32,768 | 1 | 100.0 | - | 40.0 | 99.0 | 98.0 | - | 60.0 | - | - | 100.0% | 97.0% | "
            "- | - | flashinfer | tactic | 0.98x | 2.45x | 0.99x | 1.0% | - |") in markdown
    assert ("| 131,072 | 8 | 400.0 | - | 450.0 | 440.0 | 950.0 | - | - | triton | tactic | 2.11x "
            "| 2.11x | 2.2% | - |") in markdown  # fmt: skip
    assert "(2.07 vs flashinfer, 1.24 vs flashinfer)" in markdown
    plot = tmp_path / "sglang_dev_throughput.png"
    assert not plot.exists() or plot.read_bytes()[:4] == b"\x89PNG"


def test_committed_summary_is_what_the_results_make():
    report = load_report()
    committed = json.loads((ROOT / "benchmarks" / "results" / "sglang_h200.json").read_text())
    assert report.build("h200") == committed
    assert committed["goals"]["greedy_equality_p0999"]["verdict"] == "met in float32"


def test_dependent_launch_column_only_in_the_runs_that_measured_it(tmp_path):
    report = load_report()
    pdl = {"model": "tiny (trained, 2 layers)", "decode_tokens": 256, "command": "c5", "rows": [
        row("flashinfer", "dense", 65536, 1, [500.0]),
        row("tactic", "tactic_0.9", 65536, 1, [550.0], selected=0.3),
        row("tactic-pdl", "tactic_0.9", 65536, 1, [600.0], selected=0.3)]}  # fmt: skip
    plain = {"model": "tiny (trained, 2 layers)", "decode_tokens": 256, "command": "c6",
             "rows": [row("flashinfer", "dense", 65536, 1, [500.0])]}
    (tmp_path / "sglang_throughput_pdl_dev.json").write_text(json.dumps(pdl))
    (tmp_path / "sglang_throughput_plain_dev.json").write_text(json.dumps(plain))
    markdown = report.markdown(report.build("dev", tmp_path))
    pdl_part, plain_part = markdown.split("## sglang_throughput_plain_dev.json")
    header = [line for line in pdl_part.splitlines() if line.startswith("| context")][0]
    titles = [t.strip() for t in header.strip("|").split("|")]
    values = [line for line in pdl_part.splitlines() if line.startswith("| 65,536")][0]
    cells = [c.strip() for c in values.strip("|").split("|")]
    assert cells[titles.index("tactic P = 0.9, dependent launches")] == "600.0"
    assert len(cells) == len(titles)
    assert "dependent launches" not in plain_part.split("## Goals")[0]
