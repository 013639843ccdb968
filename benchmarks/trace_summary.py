"""Where a profiled stretch of decoding spends its time, from a torch.profiler chrome trace (the
`.trace.json.gz` SGLang's profiler or `export_chrome_trace` writes): the GPU's busy time (the
union of kernel, memcpy and memset intervals) against the span from the first to the last of
them, the kernels by total time, the host's CUDA runtime calls by total time, and the CUDA
graph launches (one per replayed decode step) with the median time from one to the next: the
decode step's period, which a prefill or a pause inside the profiled stretch does not move.

    python benchmarks/trace_summary.py TRACE.json.gz [--top 25]
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        trace = json.load(handle)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def by_name(events: list[dict], top: int) -> list[dict]:
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in events:
        entry = totals[event["name"]]
        entry[0] += 1
        entry[1] += float(event["dur"])
    everything = sum(total for _, total in totals.values()) or 1.0
    rows = sorted(totals.items(), key=lambda item: -item[1][1])[:top]
    return [dict(name=name[:120], count=count, total_us=round(total, 1),
                 mean_us=round(total / count, 2), share=round(total / everything, 4))
            for name, (count, total) in rows]  # fmt: skip


def summarize(path: Path, top: int = 25) -> dict:
    events = load(path)
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    runtime = [e for e in events if e.get("cat") == "cuda_runtime"]
    starts = sorted(float(e["ts"]) for e in runtime if e["name"] == "cudaGraphLaunch")
    launches = len(starts)
    summary = {"trace": path.name, "gpu_events": len(gpu), "graph_launches": launches}
    if launches > 1:
        gaps = [later - earlier for earlier, later in zip(starts, starts[1:], strict=False)]
        summary["graph_launch_period_us"] = round(statistics.median(gaps), 1)
    if gpu:
        spans = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in gpu]
        span = max(stop for _, stop in spans) - min(start for start, _ in spans)
        busy = union_length(spans)
        summary |= dict(gpu_span_us=round(span, 1), gpu_busy_us=round(busy, 1),
                        gpu_busy_share=round(busy / span, 4) if span else None)  # fmt: skip
        if launches:
            summary["gpu_busy_us_per_graph_launch"] = round(busy / launches, 1)
    summary["kernels"] = by_name(gpu, top)
    summary["runtime_calls"] = by_name(runtime, top)
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"{summary['trace']}: {summary['gpu_events']} GPU events, "
             f"{summary['graph_launches']} CUDA graph launches"
             + (f", {summary['graph_launch_period_us']:.0f} us apart (median)"
                if "graph_launch_period_us" in summary else "")]  # fmt: skip
    if "gpu_span_us" in summary:
        lines.append(f"GPU busy {summary['gpu_busy_us']:.0f} of {summary['gpu_span_us']:.0f} us "
                     f"({summary['gpu_busy_share']:.0%})"
                     + (f", {summary['gpu_busy_us_per_graph_launch']:.0f} us a graph launch"
                        if "gpu_busy_us_per_graph_launch" in summary else ""))  # fmt: skip
    for title, key in (("kernels", "kernels"), ("CUDA runtime calls", "runtime_calls")):
        lines.append(f"{title}:")
        for row in summary[key]:
            lines.append(f"  {row['share']:6.1%} {row['total_us']:10.0f} us {row['count']:6d}x "
                         f"{row['mean_us']:8.1f} us  {row['name']}")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    print(format_summary(summarize(args.trace, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
