"""Fit the dense-fallback cost model (tactic_server/decode/cost.py) to a decode_attention.py
run and show, cell by cell, what it picks: predicted and measured dense and Tactic times, whether
the pick was the faster path, and the picked path against the fastest dense baseline of the run.

  python benchmarks/fit_cost_model.py benchmarks/results/decode_attention_h200.json [--name H200]

Prints the fitted constants (paste them into cost.py's register call) and a markdown table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tactic_server.decode.cost import FIT_PARAMETERS, MODELS, DecodeCostModel, fit  # noqa: E402


def with_path(record: dict, attend_key: str, select_launch: str | None,
              variant: str | None = None) -> dict:  # fmt: skip
    """The record with the attention and selection the server runs as its own (attend_ms,
    select_ms, tactic_ms), where the run timed them beside the cell's: a launch's selection, or
    a config variant's selection, attention and selected share (variant_<name>)."""
    if variant:
        timed = record[f"variant_{variant}"]
        return record | {key: timed[key] for key in
                         ("select_ms", "attend_ms", "tactic_ms", "selected_fraction")}
    select_ms = (record["select_ms_by_launch"][select_launch] if select_launch
                 else record["select_ms"])  # fmt: skip
    attend_ms = record[attend_key]
    return record | {"select_ms": select_ms, "attend_ms": attend_ms,
                     "tactic_ms": select_ms + attend_ms}  # fmt: skip


def timed_records(paths) -> list[dict]:
    """The records of decode_attention.py JSONs that timed selection (not the clustering ones),
    in order."""
    return [r for path in paths for r in json.loads(Path(path).read_text())["records"]
            if "select_ms" in r]  # fmt: skip


def evaluate(model: DecodeCostModel, records: list[dict], bytes_per_token: int,
             dense_key: str = "dense_ms") -> list[dict]:  # fmt: skip
    rows = []
    for r in records:
        kv = r["batch"] * r["context"] * bytes_per_token
        batch = r["batch"]
        picks_tactic = model.pays([r["context"]] * batch, [r["selected_fraction"]] * batch,
                                  bytes_per_token)  # fmt: skip
        picked_ms = r["tactic_ms"] if picks_tactic else r[dense_key]
        best_ms = min(r["tactic_ms"], r[dense_key])
        rows.append({
            "context": r["context"], "batch": r["batch"],
            "selected": r["selected_fraction"],
            "dense_ms": r[dense_key], "dense_predicted_ms": model.dense_ms(kv),
            "tactic_ms": r["tactic_ms"],
            "tactic_predicted_ms": model.tactic_ms(r["batch"], kv, kv * r["selected_fraction"]),
            "pick": "tactic" if picks_tactic else "dense",
            "right": picked_ms <= best_ms * 1.0001,
            "regret": picked_ms / best_ms,
            "fastest_dense": r["fastest_dense"],
            "vs_fastest_dense": r["fastest_dense_ms"] / picked_ms,
        })  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| context | batch | selected | dense ms (model) | Tactic ms (model) | pick | "
             "right | regret | x fastest dense |", "|" + "---|" * 9]  # fmt: skip
    for row in rows:
        lines.append(
            f"| {row['context']:,} | {row['batch']} | {row['selected']:.1%} | "
            f"{row['dense_ms']:.3f} ({row['dense_predicted_ms']:.3f}) | "
            f"{row['tactic_ms']:.3f} ({row['tactic_predicted_ms']:.3f}) | {row['pick']} | "
            f"{'yes' if row['right'] else 'no'} | {row['regret']:.2f} | "
            f"{row['vs_fastest_dense']:.2f} |"
        )
    return "\n".join(lines)


def report(rows: list[dict]) -> None:
    """The table of a model's picks, and how many were the faster path."""
    print(table(rows))
    print(f"\n{sum(r['right'] for r in rows)} of {len(rows)} cells picked the faster path; "
          f"worst regret {max(r['regret'] for r in rows):.2f}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+",
                        help="decode_attention.py JSONs of one machine, fitted together")
    parser.add_argument(
        "--bytes-per-token",
        type=int,
        default=8 * 128 * 2 * 2,
        help="K and V bytes of a position in a layer (default: Llama-3.1-8B, bf16)",
    )
    parser.add_argument(
        "--dense-key",
        default="dense_ms",
        help="the dense path the engine falls back to (default: our kernel)",
    )
    parser.add_argument(
        "--attend-key",
        default="attend_ms",
        help="the attention the server runs, where a run timed it beside the cell's own "
        "(e.g. attend_balanced_ms of runs from before the balanced schedule was served): "
        "Tactic's time is select_ms plus it",
    )
    parser.add_argument("--select-launch", default=None,
                        help="select_ms of this launch (select_ms_by_launch), not the fastest")
    parser.add_argument("--variant", default=None,
                        help="a config variant timed beside each cell (e.g. exact_fraction_0 of "
                        "--exact-fraction 0.01 0): its selection and attention are the server's")
    parser.add_argument("--evaluate", default=None,
                        help="also show what this registered model (cost.MODELS, e.g. H200) picks")
    args = parser.parse_args()
    records = [with_path(r, args.attend_key, args.select_launch, args.variant)
               for r in timed_records(args.results)]  # fmt: skip
    if args.evaluate:
        print(f"registered model {args.evaluate}:")
        report(evaluate(MODELS[args.evaluate], records, args.bytes_per_token, args.dense_key))
        print()
    model = fit(records, args.bytes_per_token, args.dense_key,
                source=", ".join(map(str, args.results)))  # fmt: skip
    print({name: round(getattr(model, name), 9) for name in FIT_PARAMETERS})
    report(evaluate(model, records, args.bytes_per_token, args.dense_key))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
