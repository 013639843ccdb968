"""Bounded load scenarios against a running server (asyncio + httpx), each reporting time to
first token, inter-token latency and request latency (p50/p95/p99), throughput and errors by
status, and, at the end, whether the server's KV usage and running requests went back to zero.

Scenarios (every one bounded in requests and in time):
  sweep       closed-loop clients at each concurrency in --concurrency
  burst       --burst requests at once, beyond capacity: expects 429/503 with Retry-After, then
              checks that the server serves again (recovery)
  long        prompts at 90% of the context (sized from a probe's prompt_tokens), and one over
              it that must get 413
  disconnect  streams of which a share is dropped by the client after a few tokens
  mixed       requests with random per-request targets (dense included), streamed or not, a
              share of the streams dropped by the client
  oversized   a 6 MB prompt, 250,000 empty messages and other bodies a server must refuse
              cheaply, sent while a stream runs and /health is probed every 20 ms: the probes'
              latencies and the stream's longest gap

Usage: python loadtests/loadgen.py --url http://127.0.0.1:8000 [--scenarios sweep burst ...]
       [--requests 64] [--out report.json]   (python loadtests/loadgen.py --help for all)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

SCENARIOS = ("sweep", "burst", "long", "disconnect", "mixed", "oversized")
KEEPALIVE_SECONDS = 1.0  # the client's, well under any server's keep-alive timeout
TARGETS = (0.5, 0.75, 0.9, 0.99, None)  # None: dense
WORDS = ("the", "cache", "keeps", "every", "key", "of", "its", "context", "and", "each", "query",
         "reads", "a", "few", "them")  # fmt: skip


@dataclass
class Outcome:
    """One request as the client saw it. status None: the connection failed."""

    status: int | None
    latency: float
    ttft: float | None = None
    inter_token: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    retry_after: str | None = None
    disconnected: bool = False
    target: float | None = None
    selected_ratio: float | None = None
    error: str | None = None


@dataclass
class Settings:
    url: str
    api_key: str | None = None
    requests: int = 64
    max_tokens: int = 16
    timeout: float = 120.0  # per request
    scenario_seconds: float = 300.0  # per scenario
    concurrency: tuple[int, ...] = (1, 4, 16)
    burst: int = 64
    disconnect_share: float = 0.5
    seed: int = 0


def prompt_of(words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def chat_body(prompt: str, settings: Settings, *, stream: bool, target=..., max_tokens=None):
    body = {"messages": [{"role": "user", "content": prompt}], "stream": stream,
            "max_tokens": max_tokens or settings.max_tokens, "ignore_eos": True}  # fmt: skip
    if stream:
        body["stream_options"] = {"include_usage": True}
    if target is None:
        body["tactic"] = {"enabled": False}
    elif target is not ...:
        body["tactic"] = {"target": target}
    return body


async def send(client: httpx.AsyncClient, body: dict, disconnect_after: int | None = None):
    """One chat completion; streamed ones are timed token by token, and dropped after
    disconnect_after content events when that is set."""
    tactic = body.get("tactic", {})
    target = tactic.get("target") if tactic.get("enabled", True) else None
    began = time.perf_counter()
    outcome = Outcome(status=None, latency=0.0, target=target)
    try:
        if not body["stream"]:
            reply = await client.post("/v1/chat/completions", json=body)
            outcome.status = reply.status_code
            if reply.status_code == 200:
                usage = reply.json()["usage"]
                outcome.completion_tokens = usage["completion_tokens"]
                outcome.selected_ratio = (usage.get("tactic") or {}).get("selected_ratio")
                outcome.ttft = time.perf_counter() - began
            else:
                outcome.retry_after = reply.headers.get("retry-after")
        else:
            async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
                outcome.status = reply.status_code
                if reply.status_code != 200:
                    outcome.retry_after = reply.headers.get("retry-after")
                    await reply.aread()
                else:
                    await _read_stream(reply, outcome, began, disconnect_after)
    except httpx.HTTPError as error:
        outcome.error = f"{type(error).__name__}: {error}"
    outcome.latency = time.perf_counter() - began
    return outcome


async def _read_stream(reply, outcome: Outcome, began: float, disconnect_after: int | None):
    last = None
    events = 0
    async for line in reply.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[len("data: ") :])
        if chunk.get("usage"):
            outcome.completion_tokens = chunk["usage"]["completion_tokens"]
            tactic = chunk["usage"].get("tactic") or {}
            outcome.selected_ratio = tactic.get("selected_ratio")
        if not (chunk.get("choices") and chunk["choices"][0]["delta"].get("content")):
            continue
        now = time.perf_counter()
        if last is None:
            outcome.ttft = now - began
        else:
            outcome.inter_token.append(now - last)
        last = now
        events += 1
        if disconnect_after is not None and events >= disconnect_after:
            outcome.disconnected = True
            return  # leaving the context closes the connection: the server must abort


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99)}


def summarise(name: str, outcomes: list[Outcome], wall: float, **extra) -> dict:
    statuses = Counter(str(o.status) if o.status is not None else "connection error"
                       for o in outcomes)  # fmt: skip
    tokens = sum(o.completion_tokens for o in outcomes if o.status == 200)
    return {
        "scenario": name,
        "requests": len(outcomes),
        "wall_seconds": wall,
        "statuses": dict(statuses),
        "server_errors": sum(1 for o in outcomes if o.status is not None and o.status >= 500),
        "connection_errors": statuses.get("connection error", 0),
        "errors": dict(Counter(o.error for o in outcomes if o.error)),  # what the client met
        "ttft_seconds": percentiles([o.ttft for o in outcomes if o.ttft is not None]),
        "inter_token_seconds": percentiles([t for o in outcomes for t in o.inter_token]),
        "latency_seconds": percentiles([o.latency for o in outcomes if o.status == 200]),
        "completion_tokens_per_second": tokens / wall if wall > 0 else 0.0,
        **extra,
    }


async def bounded(settings: Settings, coroutines) -> list[Outcome]:
    """Runs the scenario's requests, giving up (and counting them lost) past its time bound."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    done, pending = await asyncio.wait(tasks, timeout=settings.scenario_seconds)
    for task in pending:
        task.cancel()
    lost = [Outcome(status=None, latency=settings.scenario_seconds, error="scenario time bound")
            for _ in pending]  # fmt: skip
    return [task.result() for task in done] + lost


async def closed_loop(client, settings: Settings, workers: int, count: int, make_body, rng,
                      disconnect_share: float = 0.0):  # fmt: skip
    """`workers` clients sending `count` requests in all, each its next when the last ended; a
    share of the streamed ones is dropped after a few tokens."""
    queue = list(range(count))
    outcomes: list[Outcome] = []

    async def worker():
        while queue:
            queue.pop()
            body = make_body(rng)
            drop = body["stream"] and rng.random() < disconnect_share
            outcomes.append(await send(client, body, rng.randint(1, 8) if drop else None))

    await bounded(settings, [worker() for _ in range(workers)])
    return outcomes


async def sweep(client, settings: Settings, rng) -> list[dict]:
    reports = []
    for workers in settings.concurrency:
        began = time.perf_counter()
        outcomes = await closed_loop(
            client, settings, workers, max(settings.requests, workers),
            lambda r: chat_body(prompt_of(40, r), settings, stream=True), rng,
        )  # fmt: skip
        reports.append(summarise(f"sweep c={workers}", outcomes, time.perf_counter() - began,
                                 concurrency=workers))  # fmt: skip
    return reports


async def burst(client, settings: Settings, rng) -> list[dict]:
    began = time.perf_counter()
    bodies = [chat_body(prompt_of(40, rng), settings, stream=False) for _ in range(settings.burst)]
    outcomes = await bounded(settings, [send(client, body) for body in bodies])
    refused = [o for o in outcomes if o.status in (429, 503)]
    recovery = await bounded(settings, [send(client, chat_body("hello", settings, stream=False))
                                        for _ in range(4)])  # fmt: skip
    return [summarise(
        "burst", outcomes, time.perf_counter() - began,
        refused=len(refused), refused_with_retry_after=sum(1 for o in refused if o.retry_after),
        recovered=all(o.status == 200 for o in recovery),
    )]  # fmt: skip


async def served_model(client) -> dict:
    """The model the server serves, as /v1/models lists it (id, max_model_len, ...)."""
    return (await client.get("/v1/models")).json()["data"][0]


async def long_prompts(client, settings: Settings, rng) -> list[dict]:
    context = (await served_model(client))["max_model_len"]
    # a probe's prompt_tokens sizes the prompts (chat template included); random words vary in
    # tokens, so the probe is large and the prompts aim at 90% of what is left
    probe_words = max(50, min(2000, context // 4))
    tokens_per_word = await _prompt_tokens(client, settings, probe_words, rng) / probe_words
    fill = int((context - settings.max_tokens - 16) * 0.90 / tokens_per_word)
    began = time.perf_counter()
    near = [send(client, chat_body(prompt_of(fill, rng), settings, stream=True))
            for _ in range(max(2, settings.requests // 8))]  # fmt: skip
    outcomes = await bounded(settings, near)
    over = await send(client, chat_body(prompt_of(int(context * 1.2 / tokens_per_word), rng),
                                        settings, stream=False))  # fmt: skip
    return [summarise("long", outcomes, time.perf_counter() - began, context=context,
                      prompt_words=fill, over_limit_status=over.status)]  # fmt: skip


async def _prompt_tokens(client, settings: Settings, words: int, rng) -> int:
    body = chat_body(prompt_of(words, rng), settings, stream=False, max_tokens=1)
    return (await client.post("/v1/chat/completions", json=body)).json()["usage"]["prompt_tokens"]


async def disconnect(client, settings: Settings, rng) -> list[dict]:
    began = time.perf_counter()
    outcomes = await closed_loop(
        client, settings, max(settings.concurrency), settings.requests,
        lambda r: chat_body(prompt_of(40, r), settings, stream=True,
                            max_tokens=max(settings.max_tokens, 32)),
        rng, settings.disconnect_share,
    )  # fmt: skip
    return [summarise("disconnect", outcomes, time.perf_counter() - began,
                      disconnected=sum(o.disconnected for o in outcomes))]  # fmt: skip


async def mixed(client, settings: Settings, rng) -> list[dict]:
    began = time.perf_counter()

    def body(r):
        return chat_body(prompt_of(r.randint(20, 120), r), settings, stream=r.random() < 0.5,
                         target=r.choice(TARGETS))  # fmt: skip

    outcomes = await closed_loop(client, settings, max(settings.concurrency), settings.requests,
                                 body, rng, settings.disconnect_share)  # fmt: skip
    by_target = {}
    for target in TARGETS:
        ratios = [o.selected_ratio for o in outcomes
                  if o.target == target and o.selected_ratio is not None]  # fmt: skip
        by_target["dense" if target is None else str(target)] = (
            statistics.mean(ratios) if ratios else None)  # fmt: skip
    return [summarise("mixed", outcomes, time.perf_counter() - began,
                      selected_ratio_by_target=by_target)]  # fmt: skip


def oversized_bodies(model: str, context: int) -> dict[str, tuple[str, bytes]]:
    """Requests no server should spend seconds on, serialised ahead (6 MB of JSON would hold the
    client's own loop too): the issue's 6 MB prompt and 250,000 empty messages, then 2,049
    empty messages (one over OpenAI's limit) and a prompt of more characters than the context
    holds tokens, both small enough to pass a body limit of 1 MiB. name -> (route, body)."""

    def dump(route, body):
        return route, json.dumps({"model": model, "max_tokens": 1, **body}).encode()

    return {
        "6 MB prompt": dump("/v1/completions", {"prompt": "x " * 3_000_000}),
        "250,000 empty messages": dump("/v1/chat/completions",
                                       {"messages": [{"role": "user", "content": ""}] * 250_000}),
        "2,049 empty messages": dump("/v1/chat/completions",
                                     {"messages": [{"role": "user", "content": ""}] * 2049}),
        "prompt longer than the context": dump("/v1/completions",
                                               {"prompt": "y" * min(32 * context, 900_000)}),
    }  # fmt: skip


async def oversized(client, settings: Settings, rng, rounds: int = 3,
                    probe_every: float = 0.02) -> list[dict]:  # fmt: skip
    """The oversized bodies sent `rounds` times, each round all at once, while a stream runs and
    /health is asked every probe_every seconds: what each body got and how fast, how long the
    probes took (the issue's bound: 100 ms) and the stream's longest wait between tokens."""
    described = await served_model(client)
    bodies = oversized_bodies(described["id"], described["max_model_len"])
    headers = {"content-type": "application/json"}
    began = time.perf_counter()
    stream = asyncio.ensure_future(send(client, chat_body(
        prompt_of(40, rng), settings, stream=True, max_tokens=max(settings.max_tokens, 64))))
    await asyncio.sleep(0.2)  # the stream decoding before the first round
    answers: dict[str, list[Outcome]] = {name: [] for name in bodies}
    probes: list[float] = []
    probe_statuses: Counter = Counter()

    async def post(name, route, content):
        started = time.perf_counter()
        outcome = Outcome(status=None, latency=0.0)
        try:
            outcome.status = (await client.post(route, content=content,
                                                headers=headers)).status_code  # fmt: skip
        except httpx.HTTPError as error:
            outcome.error = f"{type(error).__name__}: {error}"
        outcome.latency = time.perf_counter() - started
        answers[name].append(outcome)

    for _ in range(rounds):
        posts = asyncio.ensure_future(asyncio.gather(
            *(post(name, route, content) for name, (route, content) in bodies.items())))
        while not posts.done():
            started = time.perf_counter()
            probe_statuses[(await client.get("/health")).status_code] += 1
            probes.append(time.perf_counter() - started)
            await asyncio.sleep(probe_every)
        await posts
    streamed = await stream
    outcomes = [outcome for results in answers.values() for outcome in results]
    return [summarise(
        "oversized", outcomes, time.perf_counter() - began,
        answers={name: {"statuses": sorted({str(o.status) for o in results}),
                        "max_seconds": max(o.latency for o in results)}
                 for name, results in answers.items()},
        probes=len(probes), probe_statuses={str(k): v for k, v in probe_statuses.items()},
        probe_seconds={**percentiles(probes), "max": max(probes, default=None)},
        stream_status=streamed.status,
        stream_longest_gap_seconds=max(streamed.inter_token, default=None),
    )]  # fmt: skip


async def server_gauges(client) -> dict[str, float]:
    text = (await client.get("/metrics")).text
    return {s.name: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if not s.labels}  # fmt: skip


async def settled(client, timeout: float = 30.0) -> dict:
    """Waits for the server to finish what it still holds (aborts are asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        gauges = await server_gauges(client)
        idle = (gauges.get("tactic_kv_cache_usage_ratio", 0.0) == 0.0
                and gauges.get("tactic_running_requests", 0.0) == 0.0)  # fmt: skip
        if idle or time.monotonic() > deadline:
            return {"idle": idle,
                    "kv_cache_usage_ratio": gauges.get("tactic_kv_cache_usage_ratio"),
                    "running_requests": gauges.get("tactic_running_requests")}  # fmt: skip
        await asyncio.sleep(0.1)


RUNNERS = {"sweep": sweep, "burst": burst, "long": long_prompts, "disconnect": disconnect,
           "mixed": mixed, "oversized": oversized}  # fmt: skip


async def run(settings: Settings, scenarios=SCENARIOS, log=print) -> dict:
    rng = random.Random(settings.seed)
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    # an idle connection is dropped here well before the server's keep-alive timeout closes it
    # (uvicorn's default, and this server's: 5 s, as httpx's own expiry): at equal timeouts a
    # request can go out on a connection the server is closing and fail without an answer
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64,
                          keepalive_expiry=KEEPALIVE_SECONDS)  # fmt: skip
    async with httpx.AsyncClient(base_url=settings.url, headers=headers, limits=limits,
                                 timeout=settings.timeout) as client:  # fmt: skip
        model = (await served_model(client))["id"]
        reports = []
        for name in scenarios:
            log(f"[loadgen] {name} ...")
            for report in await RUNNERS[name](client, settings, rng):
                reports.append(report)
                log(format_row(report))
        after = await settled(client)
        log(f"[loadgen] after the run: {after}")
    return {"settings": asdict(settings), "model": model, "scenarios": reports, "after": after}


def format_row(report: dict) -> str:
    def ms(stats):
        return "/".join("-" if v is None else f"{v * 1000:.0f}" for v in stats.values())

    return (f"  {report['scenario']:<12} n={report['requests']:<5} "
            f"ttft p50/95/99 {ms(report['ttft_seconds'])} ms  "
            f"itl {ms(report['inter_token_seconds'])} ms  "
            f"{report['completion_tokens_per_second']:.1f} tok/s  "
            f"statuses {report['statuses']}")  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Bounded load scenarios against Tactic Server.")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--requests", type=int, default=64, help="per scenario (per level)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--burst", type=int, default=64, help="requests sent at once")
    parser.add_argument("--scenario-seconds", type=float, default=300.0)
    parser.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the report as JSON here")
    args = parser.parse_args(argv)
    settings = Settings(
        url=args.url, api_key=args.api_key, requests=args.requests, max_tokens=args.max_tokens,
        concurrency=tuple(args.concurrency), burst=args.burst,
        scenario_seconds=args.scenario_seconds, seed=args.seed, timeout=args.timeout,
    )  # fmt: skip
    report = asyncio.run(run(settings, args.scenarios))
    if args.out:
        with open(args.out, "w") as out:
            json.dump(report, out, indent=1)
    failed = sum(r["server_errors"] for r in report["scenarios"])
    return 1 if failed or not report["after"]["idle"] else 0


if __name__ == "__main__":
    sys.exit(main())
