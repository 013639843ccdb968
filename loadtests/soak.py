"""Soak: mixed load (random targets, streams, client disconnects) for --minutes against a server,
sampling its resident memory and KV usage from /metrics; at the end the server must be idle
(KV usage 0) and its memory flat: the second half of the run may not grow more than --max-growth
over the first half's last sample. Writes JSON samples and, with matplotlib, a plot.

Usage: python loadtests/soak.py [--url URL] [--minutes 10] [--out benchmarks/results/soak_cpu]
Without --url it starts the embedded engine on the bundled default model in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path

import httpx

if __package__ in (None, ""):  # run as a script: make `loadtests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests import loadgen  # noqa: E402


async def soak(url: str, minutes: float, interval: float, log=print) -> dict:
    settings = loadgen.Settings(url=url, requests=32, max_tokens=24, concurrency=(6,),
                                disconnect_share=0.3, scenario_seconds=120)  # fmt: skip
    deadline = time.monotonic() + minutes * 60
    samples, outcomes = [], {"requests": 0, "server_errors": 0, "statuses": {}}
    began = time.monotonic()

    async def sample(client):
        while time.monotonic() < deadline:
            gauges = await loadgen.server_gauges(client)
            samples.append({"t": time.monotonic() - began,
                            "rss_bytes": gauges.get("process_resident_memory_bytes"),
                            "kv_usage": gauges.get("tactic_kv_cache_usage_ratio"),
                            "running": gauges.get("tactic_running_requests")})  # fmt: skip
            await asyncio.sleep(interval)

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        model = (await loadgen.served_model(client))["id"]
        sampler = asyncio.ensure_future(sample(client))
        rounds = 0
        while time.monotonic() < deadline:
            report = (await loadgen.mixed(client, settings, loadgen.random.Random(rounds)))[0]
            rounds += 1
            outcomes["requests"] += report["requests"]
            outcomes["server_errors"] += report["server_errors"]
            for status, count in report["statuses"].items():
                outcomes["statuses"][status] = outcomes["statuses"].get(status, 0) + count
            if rounds % 10 == 0:
                last = samples[-1] if samples else {}
                rss = (last.get("rss_bytes") or 0) / 2**20
                log(f"[soak] {time.monotonic() - began:6.0f} s  {outcomes['requests']} requests  "
                    f"rss {rss:.0f} MiB  kv {last.get('kv_usage')}")  # fmt: skip
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        after = await loadgen.settled(client)
    half = [s["rss_bytes"] for s in samples if s["t"] <= minutes * 30 and s["rss_bytes"]]
    rest = [s["rss_bytes"] for s in samples if s["t"] > minutes * 30 and s["rss_bytes"]]
    growth = (max(rest) / half[-1] - 1.0) if half and rest else None
    return {"minutes": minutes, "model": model, "outcomes": outcomes, "after": after,
            "samples": samples, "rss_growth_second_half": growth}  # fmt: skip


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[soak] matplotlib is not installed: no plot")
        return
    t = [s["t"] / 60 for s in result["samples"]]
    figure, (memory, kv) = plt.subplots(2, 1, sharex=True, figsize=(8, 5))
    memory.plot(t, [s["rss_bytes"] / 2**20 for s in result["samples"]])
    memory.set_ylabel("server RSS, MiB")
    kv.plot(t, [s["kv_usage"] for s in result["samples"]])
    kv.set_ylabel("KV usage")
    kv.set_xlabel("minutes")
    figure.suptitle(f"soak: {result['outcomes']['requests']} requests")
    figure.savefig(path, dpi=100, bbox_inches="tight")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: start the embedded engine)")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--max-growth", type=float, default=0.10)
    parser.add_argument("--out", default="soak", help="writes OUT.json (and OUT.png)")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            from loadtests.inprocess import serving
            from tactic_server.api import create_app
            from tactic_server.engine.config import EngineConfig
            from tactic_server.engine.engine import Engine

            engine = Engine.from_config(EngineConfig(max_model_len=2048, max_batch=8))
            url = stack.enter_context(serving(create_app(engine)))
        result = asyncio.run(soak(url, args.minutes, args.interval))
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=1))
    plot(result, Path(f"{args.out}.png"))
    growth, after = result["rss_growth_second_half"], result["after"]
    print(f"[soak] {result['outcomes']}; after: {after}; RSS growth over the second half: "
          f"{growth if growth is None else f'{growth:.1%}'}")  # fmt: skip
    flat = growth is not None and growth <= args.max_growth
    return 0 if flat and after["idle"] and not result["outcomes"]["server_errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
