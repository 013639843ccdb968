"""The full load run, one engine after another: `tactic-server serve` started as a user would (a
subprocess on a free port), every loadgen scenario against it, then SIGTERM, which must drain
and exit 0. One JSON report per engine, with the serve command and its exit status.

  python loadtests/full_run.py --engines embedded sglang --device cuda --out benchmarks/results
  python loadtests/full_run.py --engines embedded --requests 64 --out /tmp/load     (CPU)

The model is --model, else a tiny Llama with peaked attention made here (bf16 on a GPU):
the scenarios test the server, not the model's text.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `loadtests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests import loadgen  # noqa: E402
from loadtests.inprocess import free_port, wait_for  # noqa: E402


def log(message: str) -> None:
    print(f"[full_run {time.strftime('%H:%M:%S')}] {message}", flush=True)


def tiny_model(device: str) -> str:
    from tactic_server.testing.tiny_model import PEAKED_LLAMA, make_tiny_model

    return str(make_tiny_model(
        Path(tempfile.mkdtemp()) / "tiny", "llama", seed=0,
        dtype="bfloat16" if device == "cuda" else "float32", max_position_embeddings=16384,
        **PEAKED_LLAMA,
    ))  # fmt: skip


def serve_command(engine: str, model: str, port: int, args) -> list[str]:
    command = [sys.executable, "-m", "tactic_server.cli", "serve", "--engine", engine,
               "--model", model, "--port", str(port), "--max-batch", str(args.max_batch),
               "--max-waiting", str(args.max_waiting), "--max-model-len",
               str(args.max_model_len)]  # fmt: skip
    if engine == "embedded":
        command += ["--device", args.device]
    return command


def run_engine(engine: str, model: str, args) -> dict:
    port = free_port()
    command = serve_command(engine, model, port, args)
    log(" ".join(command))
    env = os.environ | {"TACTIC_SEGMENT_SIZE": str(args.segment_size)}
    process = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    report = {"engine": engine, "command": " ".join(command), "device": args.device}
    try:
        began = time.monotonic()
        wait_for(f"{url}/ready", process, timeout=args.start_timeout)
        report["ready_seconds"] = round(time.monotonic() - began, 1)
        settings = loadgen.Settings(
            url=url, requests=args.requests, max_tokens=args.max_tokens,
            concurrency=tuple(args.concurrency), burst=args.burst,
            scenario_seconds=args.scenario_seconds, timeout=args.timeout,
        )  # fmt: skip
        report |= asyncio.run(loadgen.run(settings, args.scenarios, log=log))
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            report["exit_status_after_sigterm"] = process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            report["exit_status_after_sigterm"] = "did not exit in 120 s (killed)"
    report["server_errors"] = sum(r["server_errors"] for r in report.get("scenarios", []))
    log(f"{engine}: {report['server_errors']} responses 5xx, settled "
        f"{report.get('after', {}).get('idle')}, exit {report['exit_status_after_sigterm']}")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", choices=("embedded", "sglang"),
                        default=["embedded"])  # fmt: skip
    parser.add_argument("--model", help="checkpoint folder (default: a tiny model made here)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="the embedded engine's device (SGLang runs on the GPU)")
    parser.add_argument("--scenarios", nargs="+", choices=loadgen.SCENARIOS,
                        default=list(loadgen.SCENARIOS))  # fmt: skip
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--burst", type=int, default=128)
    parser.add_argument("--scenario-seconds", type=float, default=120.0)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-waiting", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--segment-size", type=int, default=512)
    parser.add_argument("--start-timeout", type=float, default=400.0)
    parser.add_argument("--out", required=True, help="folder for loadtest_<engine>_<device>.json")
    args = parser.parse_args(argv)
    model = args.model or tiny_model(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = False
    for engine in args.engines:
        device = "cuda" if engine == "sglang" else args.device
        report = run_engine(engine, model, args)
        (out / f"loadtest_{engine}_{device}.json").write_text(json.dumps(report, indent=1))
        failed |= (report["server_errors"] > 0 or not report.get("after", {}).get("idle")
                   or report["exit_status_after_sigterm"] != 0)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
