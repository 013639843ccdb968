"""The `tactic-server` command line."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
from pathlib import Path


def _eval_attention(args: argparse.Namespace) -> int:
    import torch

    from .tactic.evaluation import EvaluationSetup, evaluate, markdown_table, summary_table

    setup = EvaluationSetup(
        seq_len=args.seq_len,
        num_q_heads=args.q_heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        seeds=tuple(args.seeds),
        targets=tuple(args.targets),
        kinds=tuple(args.workloads),
    )
    torch.set_num_threads(max(1, torch.get_num_threads()))
    records = evaluate(setup, progress=lambda line: print(line, file=sys.stderr, flush=True))
    summary, table = summary_table(records), markdown_table(records)
    print(summary, table, sep="\n\n")
    report = {
        "date": datetime.date.today().isoformat(),
        "device": f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "command": "tactic-server " + " ".join(sys.argv[1:]),
        "setup": dataclasses.asdict(setup),
        "records": records,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    output.with_suffix(".md").write_text(
        f"Measured {report['date']} on {report['device']}, torch {report['torch']}:\n"
        f"`{report['command']}`\n\n{summary}\n\n{table}\n"
    )
    print(f"wrote {output} and {output.with_suffix('.md')}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .tactic.evaluation import TARGETS
    from .tactic.workloads import WORKLOAD_KINDS

    parser = argparse.ArgumentParser(
        prog="tactic-server",
        description="Tactic Server: long-context LLM serving with Tactic sparse decode attention.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    evaluation = commands.add_parser(
        "eval-attention",
        help="compare Tactic with the oracle, Quest and top-k on synthetic attention workloads",
        description="Run segment-local and whole-context Tactic, the oracle, Quest and top-k (the "
        "last two at Tactic's mean budget) on seeded synthetic workloads; print a table and "
        "write JSON plus a markdown copy.",
    )
    evaluation.add_argument(
        "--seq-len", type=int, default=8192, help="context length (default 8192)"
    )
    evaluation.add_argument("--q-heads", type=int, default=32, help="query heads (default 32)")
    evaluation.add_argument("--kv-heads", type=int, default=8, help="KV heads (default 8)")
    evaluation.add_argument(
        "--head-dim", type=int, default=128, help="head dimension (default 128)"
    )
    evaluation.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="workload seeds")
    evaluation.add_argument(
        "--targets", type=float, nargs="+", default=list(TARGETS), help="target masses P"
    )
    evaluation.add_argument(
        "--workloads",
        nargs="+",
        default=list(WORKLOAD_KINDS),
        choices=WORKLOAD_KINDS,
        help="workload kinds (default: all)",
    )
    evaluation.add_argument(
        "--output",
        default="benchmarks/results/eval_attention_cpu.json",
        help="JSON path; a .md table is written beside it",
    )
    evaluation.set_defaults(handler=_eval_attention)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "eval-attention":
        if args.seq_len < 1 or args.kv_heads < 1 or args.q_heads % args.kv_heads:
            build_parser().error("need --seq-len >= 1 and --q-heads a multiple of --kv-heads")
        if any(not 0 < target <= 1 for target in args.targets):
            build_parser().error("every --targets value must be in (0, 1]")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
