"""Prometheus metrics of the server, in a registry of its own: what Tactic selected (per-request
selected-token ratio, requested target, clustering and decode-step time), serving latencies, token
and request counters, and the engine's queue and KV gauges, read from the engine at scrape time.
Seconds, ratios in 0..1, `_total` counters."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tactic_server.engine.types import EngineStats, GenerationOutput, TacticParams

from .errors import CLIENT_CLOSED_REQUEST

RATIO_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1)
STEP_SECONDS_BUCKETS = (
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
)
TOKEN_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
REQUEST_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class ServerMetrics:
    """The server's metrics; also the engine's observer (clustering and decode-step timings)."""

    def __init__(self, engine_stats: Callable[[], EngineStats | None]) -> None:
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)  # process_resident_memory_bytes & co. (soak runs)
        self.selected_ratio = Histogram(
            "tactic_selected_token_ratio",
            "Per request: mean share of the context its decode attention read (Tactic requests)",
            buckets=RATIO_BUCKETS,
            registry=registry,
        )
        self.decode_steps = Counter(
            "tactic_decode_steps",
            "Decode steps of Tactic requests, by path: selected, or dense because the cost model "
            "said selecting would not pay (dense_fallback)",
            ["path"],
            registry=registry,
        )
        self.dense_layer_steps = Counter(
            "tactic_dense_layer_steps",
            "Layer-steps of Tactic decode steps that selected, decoded dense on that layer "
            "because its attention was flat (the cost model's per-layer decision)",
            registry=registry,
        )
        self.target_fraction = Histogram(
            "tactic_target_fraction",
            "Per request: the attention mass target P it ran with (Tactic requests)",
            buckets=RATIO_BUCKETS,
            registry=registry,
        )
        self.clustering_seconds = Histogram(
            "tactic_clustering_seconds",
            "Time to cluster newly filled segments, per engine report",
            buckets=STEP_SECONDS_BUCKETS,
            registry=registry,
        )
        self.decode_step_seconds = Histogram(
            "tactic_decode_step_seconds",
            "Time of one batched decode step",
            buckets=STEP_SECONDS_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token_seconds = Histogram(
            "tactic_time_to_first_token_seconds",
            "From a request's arrival to its first generated token",
            buckets=TOKEN_SECONDS_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency_seconds = Histogram(
            "tactic_inter_token_latency_seconds",
            "Between consecutive generated tokens of a request",
            buckets=TOKEN_SECONDS_BUCKETS,
            registry=registry,
        )
        self.request_latency_seconds = Histogram(
            "tactic_request_latency_seconds",
            "From a request's arrival to its end (finished or aborted)",
            buckets=REQUEST_SECONDS_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "tactic_prompt_tokens", "Prompt tokens of requests run", registry=registry
        )
        self.generation_tokens = Counter(
            "tactic_generation_tokens", "Tokens generated", registry=registry
        )
        self.requests = Counter(
            "tactic_requests",
            "Completion requests by HTTP status (499: the client left during a stream)",
            labelnames=["status"],
            registry=registry,
        )
        self.registry.register(_EngineStatsCollector(engine_stats))

    def on_clustering(self, seconds: float) -> None:
        self.clustering_seconds.observe(seconds)

    def on_decode_step(self, seconds: float, batch_size: int) -> None:
        self.decode_step_seconds.observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def track(self, tactic: TacticParams) -> RequestTracker:
        return RequestTracker(self, tactic)


class RequestTracker:
    """Times one request from its arrival and records it into the metrics when it ends."""

    def __init__(self, metrics: ServerMetrics, tactic: TacticParams) -> None:
        self.metrics = metrics
        self.tactic = tactic
        self.arrival = time.perf_counter()
        self.last_token_at: float | None = None

    def on_output(self, output: GenerationOutput) -> None:
        if not output.token_ids:
            return
        now = time.perf_counter()
        if self.last_token_at is None:
            self.metrics.time_to_first_token_seconds.observe(now - self.arrival)
        else:
            # tokens that arrive together share the gap since the previous event
            gap = (now - self.last_token_at) / len(output.token_ids)
            for _ in output.token_ids:
                self.metrics.inter_token_latency_seconds.observe(gap)
        self.last_token_at = now

    def finish(self, last: GenerationOutput) -> None:
        """`last` is the request's latest output: its counts are the request's totals."""
        metrics = self.metrics
        metrics.request_latency_seconds.observe(time.perf_counter() - self.arrival)
        metrics.prompt_tokens.inc(last.prompt_tokens)
        metrics.generation_tokens.inc(last.completion_tokens)
        if self.tactic.enabled:
            metrics.target_fraction.observe(self.tactic.target)
        if last.tactic is not None:
            metrics.selected_ratio.observe(last.tactic.selected_ratio)
            dense = last.tactic.dense_fallback_steps
            metrics.decode_steps.labels(path="selected").inc(last.tactic.decode_steps - dense)
            metrics.decode_steps.labels(path="dense_fallback").inc(dense)
            metrics.dense_layer_steps.inc(last.tactic.dense_layer_steps)


class _EngineStatsCollector(Collector):
    """Queue and KV gauges taken from one engine.stats() call per scrape (none while loading)."""

    def __init__(self, engine_stats: Callable[[], EngineStats | None]) -> None:
        self.engine_stats = engine_stats

    def collect(self) -> Iterator[Metric]:
        stats = self.engine_stats()
        if stats is None:
            return
        yield GaugeMetricFamily(
            "tactic_running_requests", "Requests in the running batch", stats.running_requests
        )
        yield GaugeMetricFamily(
            "tactic_waiting_requests", "Requests queued for a batch place", stats.waiting_requests
        )
        yield GaugeMetricFamily(
            "tactic_kv_cache_usage_ratio",
            "Share of KV slots held by requests",
            stats.kv_cache_usage,
        )


class CountRequests:
    """ASGI middleware counting requests to `paths` by the status they were answered with. A
    stream has sent 200 before it can fail; its route records what really happened in
    `request.state.status` (499 when the client left, 500 when generation failed)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, paths: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        status = "500"  # unless a response starts: an exception escaped to the server
        started = client_left = False

        async def receive_watching() -> Message:
            nonlocal client_left
            message = await receive()
            client_left = client_left or message["type"] == "http.disconnect"
            return message

        async def send_recording_status(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = str(message["status"]), True
            await send(message)

        try:
            await self.app(scope, receive_watching, send_recording_status)
        finally:
            if not started and client_left:  # e.g. a partial body, then the connection closed
                status = str(CLIENT_CLOSED_REQUEST)
            status = scope.get("state", {}).get("status", status)
            self.metrics.requests.labels(status=status).inc()
