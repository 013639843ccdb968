"""Plot Tactic's decode-attention speedup over the fastest dense baseline of the run (SDPA,
FlashInfer or ours) against context length, one line per
needed fraction and batch, and write the markdown table the README quotes, from a
benchmarks/decode_attention.py JSON (both beside it: .png and .md).

    python benchmarks/plot_decode_attention.py benchmarks/results/decode_attention_<device>.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROWS = [
    ("context", "{:,}", "context"), ("batch", "{}", "batch"),
    ("oracle needs", "{:.1%}", "needed_fraction"), ("selected", "{:.1%}", "selected_fraction"),
    ("min recall", "{:.3f}", "min_recall"), ("SDPA ms", "{:.3f}", "sdpa_ms"),
    ("FlashInfer dense ms", "{:.3f}", "flashinfer_dense_ms"),
    ("our dense ms", "{:.3f}", "dense_ms"),
    ("our dense / copy BW", "{:.0%}", "dense_bw_fraction"), ("select ms", "{:.3f}", "select_ms"),
    ("attend ms (ours)", "{:.3f}", "attend_ms"),
    ("attend ms (ours, 256-token chunks)", "{:.3f}", "attend_chunked_ms"),
    ("attend ms (ours, fastest chunks)", "{:.3f}", "attend_best_ms"),
    ("attend ms (ours, balanced)", "{:.3f}", "attend_balanced_ms"),
    ("attend ms (ours, dependent launches)", "{:.3f}", "attend_pdl_ms"),
    ("attend ms (FlashInfer)", "{:.3f}", "flashinfer_attend_ms"),
    ("Tactic ms", "{:.3f}", "tactic_ms"), ("x SDPA", "{:.2f}", "speedup_vs_sdpa"),
    ("x fastest dense", "{:.2f}", "speedup_vs_fastest_dense"),
    ("byte roofline x", "{:.1f}", "roofline_speedup"), ("select share", "{:.0%}", "select_share"),
]  # fmt: skip


def with_fastest_dense(record: dict) -> dict:
    """The record with its fastest dense baseline and Tactic's speedup over it (runs written
    before decode_attention.py stored them carry the three dense times they come from)."""
    if "speedup_vs_fastest_dense" in record:
        return record
    times = [record[key] for key in ("sdpa_ms", "flashinfer_dense_ms", "dense_ms") if key in record]
    return record | {"fastest_dense_ms": min(times),
                     "speedup_vs_fastest_dense": min(times) / record["tactic_ms"]}  # fmt: skip


def markdown(report: dict) -> str:
    records = [with_fastest_dense(r) for r in report["records"] if r.get("kind") != "clustering"]
    # the columns some record of the run has (runs differ in what they timed beside the rest)
    rows = [row for row in ROWS if any(row[2] in record for record in records)]
    lines = [
        "| " + " | ".join(title for title, _, _ in rows) + " |",
        "|" + "---|" * len(rows),
    ]
    for record in records:
        cells = [fmt.format(record[key]) if key in record else "-" for _, fmt, key in rows]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| clustering: context | 32 layers x 8 KV heads, s | estimated prefill, s | share |",
        "|---|---|---|---|",
    ]
    for record in report["records"]:
        if record.get("kind") == "clustering":
            lines.append(
                f"| {record['context']:,} | {record['clustering_s']:.3f} "
                f"| {record['estimated_prefill_s']:.2f} "
                f"| {record['clustering_share_of_prefill']:.1%} |"
            )
    header = (
        f"{report['device']}, {report['date']}, torch {report['torch']}, "
        f"triton {report['triton']}; "
        f"copy {report['copy_bandwidth_gb_s']:.0f} GB/s, bf16 matmul "
        f"{report['bf16_matmul_tflop_s']:.0f} TFLOP/s; `{report['command']}`"
    )
    return header + "\n\n" + "\n".join(lines) + "\n"


def main(path: str) -> int:
    report = json.loads(Path(path).read_text())
    records = [with_fastest_dense(r) for r in report["records"] if r.get("kind") != "clustering"]
    batches = sorted({r["batch"] for r in records})
    figure, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.2), squeeze=False)
    for axis, batch in zip(axes[0], batches, strict=True):
        for fraction in sorted({r["needed_fraction_asked"] for r in records}):
            rows = sorted(
                (
                    r
                    for r in records
                    if r["batch"] == batch and r["needed_fraction_asked"] == fraction
                ),
                key=lambda r: r["context"],
            )
            contexts = [r["context"] for r in rows]
            needed = [r["needed_fraction"] for r in rows]
            label = f"built for {fraction:.0%} (oracle {min(needed):.1%}-{max(needed):.1%})"
            axis.plot(contexts, [r["speedup_vs_fastest_dense"] for r in rows], marker="o",
                      label=label)  # fmt: skip
            axis.plot(contexts, [r["roofline_speedup"] for r in rows], linestyle=":",
                      color=axis.lines[-1].get_color())  # fmt: skip
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log", base=2)
        axis.set_xlabel("context (tokens)")
        axis.set_ylabel("Tactic (select + attend) speedup vs fastest dense")
        axis.set_title(f"batch {batch} (dotted: byte roofline)")
        axis.legend()
    figure.suptitle(f"{report['device']}, {report['date']}, Llama-3.1-8B layer, bf16, P = 0.9")
    figure.tight_layout()
    output = Path(path).with_suffix(".png")
    figure.savefig(output, dpi=110)
    Path(path).with_suffix(".md").write_text(markdown(report))
    print(f"wrote {output} and {Path(path).with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a benchmarks/decode_attention.py JSON")
    sys.exit(main(parser.parse_args().run))
