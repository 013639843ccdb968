"""Plot Tactic's decode-attention speedup over torch SDPA against context length, one line per
needed fraction and batch, from a benchmarks/decode_attention.py JSON.

    python benchmarks/plot_decode_attention.py benchmarks/results/decode_attention_<device>.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(path: str) -> int:
    report = json.loads(Path(path).read_text())
    records = [r for r in report["records"] if r.get("kind") != "clustering"]
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
            measured = sum(r["needed_fraction"] for r in rows) / len(rows)
            axis.plot(contexts, [r["speedup_vs_sdpa"] for r in rows], marker="o",
                      label=f"needs ~{measured:.1%}")  # fmt: skip
            axis.plot(contexts, [r["roofline_speedup"] for r in rows], linestyle=":",
                      color=axis.lines[-1].get_color())  # fmt: skip
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log", base=2)
        axis.set_xlabel("context (tokens)")
        axis.set_ylabel("Tactic total (select + attend) speedup vs SDPA")
        axis.set_title(f"batch {batch} (dotted: byte roofline)")
        axis.legend()
    figure.suptitle(f"{report['device']}, {report['date']}, Llama-3.1-8B layer, bf16, P = 0.9")
    figure.tight_layout()
    output = Path(path).with_suffix(".png")
    figure.savefig(output, dpi=110)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
