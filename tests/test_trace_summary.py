"""benchmarks/trace_summary.py on a chrome trace that torch.profiler wrote on the CPU, with GPU
events of the kinds CUPTI records added to it: the GPU's busy time is the union of overlapping
intervals, kernels and runtime calls are totalled by name, graph launches counted and timed."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def load_module():
    spec = importlib.util.spec_from_file_location(
        "trace_summary", ROOT / "benchmarks" / "trace_summary.py")  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def profiled_trace(path: Path) -> None:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        x = torch.randn(64, 64)
        for _ in range(3):
            x = torch.relu(x @ x)
    profile.export_chrome_trace(str(path))


def gpu_event(name, ts, dur, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": 7}


def test_summary_of_a_real_trace_with_gpu_events(tmp_path):
    module = load_module()
    plain = tmp_path / "cpu.json"
    profiled_trace(plain)
    trace = json.loads(plain.read_text())
    assert any(e.get("cat") == "cpu_op" for e in trace["traceEvents"])
    trace["traceEvents"] += [
        gpu_event("score_units", 100.0, 50.0),
        gpu_event("walk", 120.0, 50.0),  # overlaps the first: busy 100..170
        gpu_event("sparse_decode", 200.0, 30.0),
        gpu_event("Memcpy DtoH", 300.0, 10.0, cat="gpu_memcpy"),
        gpu_event("walk", 400.0, 50.0),
        gpu_event("cudaGraphLaunch", 90.0, 5.0, cat="cuda_runtime"),
        gpu_event("cudaGraphLaunch", 390.0, 5.0, cat="cuda_runtime"),
        gpu_event("cudaStreamSynchronize", 395.0, 60.0, cat="cuda_runtime"),
    ]
    packed = tmp_path / "trace.json.gz"
    with gzip.open(packed, "wt") as handle:
        json.dump(trace, handle)

    summary = module.summarize(packed, top=10)
    assert summary["gpu_events"] == 5 and summary["graph_launches"] == 2
    assert summary["gpu_span_us"] == 350.0  # 100 .. 450
    assert summary["gpu_busy_us"] == 70.0 + 30.0 + 10.0 + 50.0
    assert summary["gpu_busy_share"] == round(160.0 / 350.0, 4)
    assert summary["gpu_busy_us_per_graph_launch"] == 80.0
    assert summary["graph_launch_period_us"] == 300.0  # 90 -> 390
    kernels = {row["name"]: row for row in summary["kernels"]}
    assert kernels["walk"]["count"] == 2 and kernels["walk"]["total_us"] == 100.0
    assert summary["kernels"][0]["name"] == "walk"  # largest total first
    calls = summary["runtime_calls"]
    assert calls[0]["name"] == "cudaStreamSynchronize" and calls[0]["share"] == round(60 / 70, 4)
    text = module.format_summary(summary)
    assert "GPU busy 160 of 350 us (46%), 80 us a graph launch" in text
    assert "2 CUDA graph launches, 300 us apart (median)" in text


def test_a_cpu_only_trace_has_no_gpu_numbers(tmp_path):
    module = load_module()
    path = tmp_path / "cpu.json"
    profiled_trace(path)
    summary = module.summarize(path)
    assert summary["gpu_events"] == 0 and "gpu_busy_us" not in summary
    assert "graph_launch_period_us" not in summary
    assert summary["kernels"] == [] and "0 GPU events" in module.format_summary(summary)
