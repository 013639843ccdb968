"""What bounds the scoring kernel: its time with parts of its work taken out, on the same inputs.
Each variant is kernels/selection.py with a textual cut (below), loaded as a module of its own
beside the real one, and timed as profile_selection.py times a step; only the scoring kernel's
time means anything in a variant (a cut leaves the later kernels garbage to work on). Not a
fast path: a measurement of where the kernel's time goes.

    python benchmarks/ablate_scoring.py --context 130560 --batch 16
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")
from profile_selection import selection_inputs  # noqa: E402

from tactic_server.tactic import TacticConfig  # noqa: E402

SOURCE = Path(__file__).resolve().parents[1] / "kernels" / "selection.py"
HISTOGRAM = (
    "    tl.atomic_add(mass_hist_ptr + (hist_row * 3 + 0) * BINS + bins, relative, "
    "mask=candidate,\n"
    """                  sem="relaxed")  # fmt: skip
    tl.atomic_add(mass_hist_ptr + (hist_row * 3 + 2) * BINS + bins, relative,
                  mask=stored & (occupied & forced)[None, :], sem="relaxed")  # fmt: skip
"""
)
# name -> (text to cut, what replaces it)
CUTS = {
    "as is": [],
    "no histogram atomics": [(HISTOGRAM, "")],
    "one atomic per unit (head 0's)": [
        (HISTOGRAM, HISTOGRAM.replace("mask=candidate", "mask=candidate & (heads == 0)[:, None]")
         .replace("mask=stored &", "mask=(heads == 0)[:, None] & stored &"))],
    "no density-bin stores": [
        ("    tl.store(unit_bin_ptr + out, bins.to(tl.int16), mask=stored)\n", "")],
}


def apply(text: str, old: str, new: str) -> str:
    """text with old (at its own indentation or nested up to two levels deeper: the kernel's
    body may sit in a loop) replaced by new, indented alike; ValueError where it is not."""
    for extra in ("        ", "    ", ""):  # the deepest first: a shallower one is its suffix
        if textwrap.indent(old, extra) in text:
            return text.replace(textwrap.indent(old, extra), textwrap.indent(new, extra))
    raise ValueError(f"not in {SOURCE.name} any more: {old.strip()[:60]!r}")


def load_variant(name: str, cuts) -> object:
    text = SOURCE.read_text()
    for old, new in cuts:
        text = apply(text, old, new)
    folder = Path(tempfile.mkdtemp())
    path = folder / f"selection_{abs(hash(name))}.py"
    path.write_text(text)
    module_name = f"tactic_server.kernels.{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def scoring_us(module, args) -> tuple[float, float]:
    """(scoring kernel's mean CUDA time, selection step's) in us over 20 steps."""
    config = TacticConfig(centroids=args.centroids, variance=args.variance)
    inputs, _ = selection_inputs(args.context, args.batch, config)

    def step():
        return module.select_rows(*inputs, config)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(20):
            step()
        torch.cuda.synchronize()
    times = {e.key: e.device_time_total / e.count for e in profile.key_averages()}
    total = sum(e.device_time_total for e in profile.key_averages()) / 20
    return times.get("_score_units_kernel", float("nan")), total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=130560)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--centroids", choices=["kv", "fp8"], default="fp8")
    parser.add_argument("--variance", choices=["diagonal", "isotropic", "profile"],
                        default="diagonal")  # fmt: skip
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}; context {args.context}, batch {args.batch}, "
          f"centroids {args.centroids}, variance {args.variance}")  # fmt: skip
    for name, cuts in CUTS.items():
        scoring, total = scoring_us(load_variant(name, cuts), args)
        print(f"{name:>32}: scoring kernel {scoring:8.1f} us (selection kernels {total:8.1f} us)",
              flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
