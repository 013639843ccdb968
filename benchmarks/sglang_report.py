"""The SGLang integration's results on one device in one place: every `sglang_gpu.py throughput`
run and every `equality` run of benchmarks/results/ for that device, per run side by side
(SGLang's dense backends: flashinfer and fa3 where the run measured them, and triton, whose
decode the tactic backend's dense path runs; the tactic backend with dense requests; Tactic at
P = 0.9 with and without its CUDA graphs; a run whose JSON says "tactic_graphs": false predates
them, so its tactic rows are eager; the tactic backend over FA3, tactic-fa3, where the run
measured it). Tactic's speed (the faster of its P = 0.9 rows with graphs, over its default
dense base or over FA3) is judged against the **fastest** dense
backend of the same line, and only in runs that measured a dense backend besides triton (triton
alone is no user's best choice); the cost of the tactic backend's dense requests against triton,
the path they run. Goals are judged only within a run (never a number of one run against a
number of another) and only on runs of the current code: a run whose JSON says "superseded"
(why, in words) stays in the tables, marked, and out of the goals and the plot; a "note" is shown
with its run, and so are the backends the run could not measure ("unavailable": fa3 where its
library was not staged), with the reason. Writes sglang_<device>.json, .md and, with
matplotlib, _throughput.png.

    python benchmarks/sglang_report.py --device h200

A round is one timed decode; a round that came out zero or negative (a first decode of its batch
size that compiled) is left out of its row's median and counted in `invalid_rounds`. Rows that
also carry steady rounds (the batch streamed, tokens counted while all its requests decode:
sglang_gpu.py's steady_rate) get a line's `steady` cells and goals of their own, beside the
end-to-end ones, which also count each request's setup and prompt transfer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DENSE_BACKENDS = ("flashinfer", "fa3", "triton")  # SGLang's own; a user picks the fastest
COLUMNS = (*((name, name, "dense") for name in DENSE_BACKENDS),
           ("tactic, dense requests", "tactic", "dense"),
           ("tactic P = 0.9, graphs", "tactic", "tactic_0.9"),
           ("tactic P = 0.9, eager", "tactic-eager", "tactic_0.9"),
           ("tactic P = 0.9, no fallback", "tactic-select", "tactic_0.9"),
           # dependent launches: on by default from 2026-12-08 (tactic-pdl measured them before)
           ("tactic P = 0.9, dependent launches", "tactic-pdl", "tactic_0.9"),
           ("tactic P = 0.9, no dependent launches", "tactic-nopdl", "tactic_0.9"),
           # the tactic backend over SGLang's FA3 (TACTIC_DENSE_BACKEND=fa3), graphs too
           ("tactic-fa3, dense requests", "tactic-fa3", "dense"),
           ("tactic-fa3 P = 0.9", "tactic-fa3", "tactic_0.9"))  # fmt: skip
# Tactic as a user runs it (with its CUDA graphs), by its dense base: the column of each
SPARSE_COLUMNS = {"tactic": "tactic P = 0.9, graphs", "tactic-fa3": "tactic-fa3 P = 0.9"}
# columns shown only in the runs that measured them (runs before them keep their tables)
OPTIONAL_COLUMNS = ("tactic P = 0.9, dependent launches", "tactic P = 0.9, no dependent launches")
SPARSE_CONTEXT = 131072  # the goal's 128k
SPEEDUP_GOAL, OVERHEAD_GOAL, FLAT_GOAL = 2.0, 0.03, 0.97
STEADY_COLUMNS = (*DENSE_BACKENDS, "tactic, dense requests", "tactic P = 0.9, graphs",
                  "tactic-fa3, dense requests", "tactic-fa3 P = 0.9")
FASTEST = "graphs / fastest dense"


def row_value(row: dict, key: str = "rounds") -> tuple[float | None, int]:
    """The median of a row's valid rounds (or steady rounds) and how many were not."""
    rounds = row[key]
    valid = [r for r in rounds if r > 0]
    return (statistics.median(valid) if valid else None), len(rounds) - len(valid)


def summarize_run(name: str, report: dict) -> dict:
    """One throughput run: a line per (context, batch) with each column's tok/s."""
    cells: dict[tuple[int, int], dict] = {}
    for row in report["rows"]:
        key = (row["context"], row["batch"])
        line = cells.setdefault(key, {"context": key[0], "batch": key[1]})
        if "skipped" in row:
            line["skipped"] = row["skipped"]
            continue
        backend_of_row = row["backend"]
        if (backend_of_row == "tactic" and row.get("mode") != "dense"
                and report.get("tactic_graphs") is False):  # fmt: skip
            backend_of_row = "tactic-eager"  # a run from before the Tactic CUDA graphs
        for title, backend, mode in COLUMNS:
            if (backend_of_row, row.get("mode")) == (backend, mode):
                value, invalid = row_value(row)
                line[title] = value
                if invalid:
                    line.setdefault("invalid_rounds", {})[title] = invalid
                if backend in ("tactic", "tactic-fa3") and mode != "dense":
                    suffix = "" if backend == "tactic" else ", tactic-fa3"
                    if row.get("selected_ratio") is not None:
                        line["selected" + suffix] = row["selected_ratio"]
                    if row.get("dense_fallback_share") is not None:
                        line["dense fallback" + suffix] = row["dense_fallback_share"]
                if row.get("steady_rounds") and title in STEADY_COLUMNS:
                    line.setdefault("steady", {})[title] = row_value(row, "steady_rounds")[0]
    # the SGLang backend the tactic one ran over (its dense requests' path): triton before the
    # runs that record it
    base = report.get("tactic_dense_backend", "triton")
    for line in cells.values():
        ratios(line, base)
        if "steady" in line:
            ratios(line["steady"], base)
    return {"file": name, "model": report.get("model"), "command": report.get("command"),
            "superseded": report.get("superseded"), "note": report.get("note"),
            "unavailable": report.get("unavailable") or {}, "tactic_dense_backend": base,
            "dense_fallback": "tactic_dense_backend" in report,
            "decode_tokens": report.get("decode_tokens"), "trained": "trained" in
            str(report.get("model")), "lines": sorted(cells.values(), key=lambda x: (
                x["context"], x["batch"]))}  # fmt: skip


def ratios(line: dict, base: str = "triton") -> None:
    """A line's ratios from its tok/s cells, in place: Tactic (the faster of its P = 0.9 rows
    with graphs, over the default dense base or over FA3: named in "tactic") against the
    fastest dense backend of the line (named in "fastest dense") where one besides triton ran,
    and against triton; the overhead of the tactic backend's dense requests against `base`,
    the backend they run, and of tactic-fa3's against fa3."""
    triton, dense = line.get("triton"), line.get("tactic, dense requests")
    sparse = line.get("tactic P = 0.9, graphs")
    runs_of_tactic = {name: line[title] for name, title in SPARSE_COLUMNS.items()
                      if line.get(title)}  # fmt: skip
    if runs_of_tactic:
        line["tactic"] = max(runs_of_tactic, key=runs_of_tactic.get)
    measured = {name: line[name] for name in DENSE_BACKENDS if line.get(name)}
    if set(measured) - {"triton"}:
        fastest = max(measured, key=measured.get)
        line["fastest dense"] = fastest
        if runs_of_tactic:
            line[FASTEST] = runs_of_tactic[line["tactic"]] / measured[fastest]
    if triton and sparse:
        line["graphs / triton"] = sparse / triton
    if dense and sparse:
        line["graphs / dense requests"] = sparse / dense
    if line.get(base) and dense:
        line["overhead at P = 1"] = 1.0 - dense / line[base]
    over_fa3 = line.get("tactic-fa3, dense requests")
    if line.get("fa3") and over_fa3:
        line["overhead at P = 1, tactic-fa3"] = 1.0 - over_fa3 / line["fa3"]


def judge(runs: list[dict], equality: list[dict]) -> dict:
    """The goals, each from lines where both sides ran in the same run of the current code."""
    runs = [r for r in runs if not r["superseded"]]

    def speedups(cells):
        return [dict(file=r["file"], batch=line["batch"], value=cells(line)[FASTEST],
                     against=cells(line)["fastest dense"], tactic=cells(line)["tactic"])
                for r in runs if r["trained"] for line in r["lines"]
                if line["context"] == SPARSE_CONTEXT and FASTEST in cells(line)]  # fmt: skip

    def overheads(cells):
        return [dict(file=r["file"], context=line["context"], batch=line["batch"],
                     value=cells(line)[key], against=against)
                for r in runs for line in r["lines"]
                for key, against in (("overhead at P = 1", r["tactic_dense_backend"]),
                                     ("overhead at P = 1, tactic-fa3", "fa3"))
                if key in cells(line) and not line.get("invalid_rounds")]  # fmt: skip

    def flat(cells):  # attention that selection cannot thin out: the dense fallback's lines
        return [dict(file=r["file"], context=line["context"], batch=line["batch"],
                     value=cells(line)[FASTEST], against=cells(line)["fastest dense"],
                     tactic=cells(line)["tactic"])
                for r in runs if r["dense_fallback"] and not r["trained"]
                for line in r["lines"] if FASTEST in cells(line)]  # fmt: skip

    equal = [dict(file=e["file"], dtype=e["dtype"], equal=e["equal"], prompts=e["prompts"])
             for e in equality]  # fmt: skip

    def verdict(values, good) -> str:
        if not values:
            return "unmeasured"
        met = [good(v["value"]) for v in values]
        return "met" if all(met) else ("missed" if not any(met) else "met in part")

    goals = {}
    for suffix, cells, how in (("", lambda line: line, "end to end"),
                               ("_steady", lambda line: line.get("steady", {}), "steady")):
        fast, over, level = speedups(cells), overheads(cells), flat(cells)
        goals[f"speedup_at_128k_sparse{suffix}"] = dict(
            goal=f">= {SPEEDUP_GOAL}x the fastest dense backend of the run, trained model, 128k, "
                 f"{how}",
            verdict=verdict(fast, lambda v: v >= SPEEDUP_GOAL), measured=fast)
        goals[f"overhead_at_p1{suffix}"] = dict(
            goal=f"dense requests within {OVERHEAD_GOAL:.0%} of the dense backend they run "
                 f"(triton, flashinfer since the runs that record it; fa3 for tactic-fa3), "
                 f"{how}",
            verdict=verdict(over, lambda v: v <= OVERHEAD_GOAL), measured=over)
        goals[f"flat_attention{suffix}"] = dict(
            goal=f"P = 0.9 >= {FLAT_GOAL}x the fastest dense backend where attention is flat "
                 f"(the 8B with dummy weights; runs with the dense fallback), {how}",
            verdict=verdict(level, lambda v: v >= FLAT_GOAL), measured=level)
    return goals | {
        "greedy_equality_p0999": dict(
            goal="P = 0.999 equals the triton backend for 32 greedy tokens",
            verdict=("met in float32" if any(e["equal"] == e["prompts"] and e["dtype"] ==
                                             "float32" for e in equal) else "missed"),
            measured=equal),
    }  # fmt: skip


def equality_summary(name: str, report: dict) -> dict:
    run = report["runs"].get("tactic_0.999", {})
    tokens = run.get("tokens_equal_before_first_difference", [])
    dtype = "float32" if "float32" in str(report.get("model")) else "bfloat16"
    return dict(file=name, dtype=dtype, prompts=len(tokens),
                equal=sum(t >= report.get("tokens", 32) for t in tokens))  # fmt: skip


def markdown(summary: dict) -> str:
    titles = [t for t, _, _ in COLUMNS] + ["selected", "dense fallback",
                                           "selected, tactic-fa3", "dense fallback, tactic-fa3",
                                           "fastest dense", "tactic", FASTEST,
                                           "graphs / triton", "graphs / dense requests",
                                           "overhead at P = 1",
                                           "overhead at P = 1, tactic-fa3"]  # fmt: skip
    out = [f"# SGLang with the tactic backend on {summary['device']}", ""]
    for run in summary["runs"]:
        out += [f"## {run['file']}", "", f"{run['model']}; {run['decode_tokens']} new tokens a "
                f"round; `{run['command']}`", ""]
        if run["superseded"]:
            out += [f"Superseded, not in the goals: {run['superseded']}", ""]
        if run["note"]:
            out += [f"Note: {run['note']}", ""]
        for backend, why in run["unavailable"].items():
            out += [f"Not measured, unavailable: {backend} ({why})", ""]
        shown = [t for t in titles if t not in OPTIONAL_COLUMNS
                 or any(line.get(t) is not None for line in run["lines"])]  # fmt: skip
        out += ["| context | batch | " + " | ".join(shown) + " |",
                "|---|---|" + "---|" * len(shown)]
        for line in run["lines"]:
            if "skipped" in line and len(line) == 3:
                out.append(f"| {line['context']:,} | {line['batch']} | {line['skipped']} |"
                           + " |" * (len(shown) - 1))  # fmt: skip
                continue
            invalid = line.get("invalid_rounds", {})
            cells = [cell(title, line.get(title))
                     + (" (*)" if title in invalid and line.get(title) is not None else "")
                     for title in shown]  # fmt: skip
            out.append(f"| {line['context']:,} | {line['batch']} | " + " | ".join(cells) + " |")
        out.append("")
        steady = [line for line in run["lines"] if line.get("steady")]
        if steady:
            out += steady_table(steady)
    out += ["(*) a round of this cell came out negative and is left out. "
            f"{FASTEST}: Tactic P = 0.9 (the faster of "
            f"{' and '.join(SPARSE_COLUMNS.values())}, named in `tactic`) over the fastest of "
            f"{', '.join(DENSE_BACKENDS)} on its line, where a backend besides triton ran.", "",
            "## Goals", ""]
    for name, goal in summary["goals"].items():
        values = ", ".join(measured_value(m) for m in goal["measured"])
        out.append(f"- {name}: {goal['goal']}: **{goal['verdict']}** ({values or 'no run'})")
    return "\n".join(out) + "\n"


def measured_value(measured: dict) -> str:
    """One measurement of a goal: a ratio (against which backend), or equal prompts."""
    if "value" not in measured:
        return f"{measured['equal']}/{measured['prompts']} ({measured['dtype']})"
    against = f" vs {measured['against']}" if "against" in measured else ""
    tactic = " (tactic-fa3)" if measured.get("tactic") == "tactic-fa3" else ""
    return f"{measured['value']:.2f}{tactic}{against}"


def cell(title: str, value: float | str | None) -> str:
    """A table cell: a share, a ratio or tok/s by its column's title."""
    if value is None:
        return "-"
    if isinstance(value, str):  # a backend's name (the fastest dense one, the faster tactic)
        return value
    if title.startswith(("selected", "dense fallback", "overhead at P = 1")):
        return f"{value:.1%}"
    return f"{value:.2f}x" if "/" in title else f"{value:,.1f}"


def steady_table(lines: list[dict]) -> list[str]:
    """A run's steady decode tok/s (the batch streamed, while all its requests decode)."""
    titles = [*STEADY_COLUMNS, "fastest dense", "tactic", FASTEST, "graphs / triton",
              "overhead at P = 1", "overhead at P = 1, tactic-fa3"]
    out = ["Steady decode, streamed (tok/s while every request of the batch decodes):", "",
           "| context | batch | " + " | ".join(titles) + " |", "|---|---|" + "---|" * len(titles)]
    for line in lines:
        cells = [cell(title, line["steady"].get(title)) for title in titles]
        out.append(f"| {line['context']:,} | {line['batch']} | " + " | ".join(cells) + " |")
    return out + [""]


def plot(summary: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    titles = [title for title, _, _ in COLUMNS]
    runs = [r for r in summary["runs"] if not r["superseded"]
            and any(line.get(t) for line in r["lines"] for t in titles)]  # fmt: skip
    columns = min(3, len(runs))
    rows = -(-len(runs) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False)
    for axis in axes.flat[len(runs):]:
        axis.set_visible(False)
    for axis, run in zip(axes.flat, runs, strict=False):  # hidden axes beyond the runs
        lines = [line for line in run["lines"] if "skipped" not in line]
        labels = [f"{line['context'] // 1024}k\nb{line['batch']}" for line in lines]
        width = 0.8 / len(COLUMNS)
        for i, (title, _, _) in enumerate(COLUMNS):
            values = [line.get(title) or 0.0 for line in lines]
            axis.bar([x + i * width for x in range(len(lines))], values, width, label=title)
        axis.set_xticks([x + 0.4 - width / 2 for x in range(len(lines))], labels)
        axis.set_yscale("log")
        axis.set_ylabel("decode tokens/s")
        axis.set_title(f"{run['file']}\n{str(run['model'])[:48]}", fontsize=8)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return True


def build(device: str, results: Path = RESULTS) -> dict:
    runs, equality = [], []
    for path in sorted(results.glob(f"sglang_throughput*_{device}.json")):
        runs.append(summarize_run(path.name, json.loads(path.read_text())))
    for path in sorted(results.glob(f"sglang_equality*_{device}.json")):
        equality.append(equality_summary(path.name, json.loads(path.read_text())))
    if not runs and not equality:
        raise SystemExit(f"no sglang_throughput*_{device}.json or sglang_equality*_{device}.json"
                         f" in {results}")  # fmt: skip
    return {"device": device, "runs": runs, "equality": equality,
            "goals": judge(runs, equality)}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="h200", help="the results' file suffix")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    summary = build(args.device, args.results)
    stem = args.results / f"sglang_{args.device}"
    Path(f"{stem}.json").write_text(json.dumps(summary, indent=1))
    Path(f"{stem}.md").write_text(markdown(summary))
    plot(summary, Path(f"{stem}_throughput.png"))
    for name, goal in summary["goals"].items():
        print(f"{name}: {goal['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
