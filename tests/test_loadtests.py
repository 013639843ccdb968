"""Load, fault and abuse runs against a real server over a socket (the embedded engine on a tiny
model, CPU): the loadtests/ scenarios in their short form, 1,000 mixed requests with client
disconnects, schemathesis over the OpenAPI schema, and inputs meant to hurt. After each, nothing
is held: KV usage is back to 0 and the server still answers."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtests import loadgen
from loadtests.inprocess import serving
from tactic_server.api import create_app
from tactic_server.api.limits import RequestLimits
from tactic_server.engine.config import EngineConfig
from tactic_server.engine.engine import Engine
from tactic_server.tactic.config import TacticConfig
from tactic_server.testing.tiny_model import make_tiny_model

MAX_MODEL_LEN = 512
MAX_BATCH, MAX_WAITING = 4, 8
CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    config = EngineConfig(
        model_dir=str(make_tiny_model(tmp_path_factory.mktemp("model"))),
        max_model_len=MAX_MODEL_LEN, max_batch=MAX_BATCH, max_waiting=MAX_WAITING,
        tactic=TacticConfig(segment_size=64, cluster_size=8),
    )  # fmt: skip
    engine = Engine.from_config(config)
    yield engine
    asyncio.run(engine.shutdown())


@pytest.fixture(scope="module")
def url(engine):
    with serving(create_app(engine, limits=RequestLimits(max_body_bytes=1024 * 1024))) as url:
        yield url


def assert_nothing_held(engine, url) -> None:
    stats = engine.stats()
    assert stats.kv_slots_in_use == 0 and stats.running_requests == 0
    assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=30).status_code == 200


def test_every_scenario_holds_and_reports(engine, url):
    settings = loadgen.Settings(url=url, requests=24, max_tokens=8, concurrency=(1, 4, 8),
                                burst=4 * (MAX_BATCH + MAX_WAITING))  # fmt: skip
    report = asyncio.run(loadgen.run(settings, log=lambda line: None))
    assert report["model"] == engine.model_name  # what the numbers were measured on
    scenarios = {r["scenario"]: r for r in report["scenarios"]}
    assert set(scenarios) == {"sweep c=1", "sweep c=4", "sweep c=8", "burst", "long",
                              "disconnect", "mixed", "oversized"}  # fmt: skip
    oversized = scenarios.pop("oversized")
    for name, result in scenarios.items():
        assert result["server_errors"] == 0 and result["connection_errors"] == 0, name
        if name != "burst":
            assert set(result["statuses"]) == {"200"}, (name, result["statuses"])
        assert result["ttft_seconds"]["p50"] > 0 and result["completion_tokens_per_second"] > 0
    for name in ("sweep c=1", "sweep c=4", "sweep c=8", "disconnect"):  # streamed
        stats = scenarios[name]["inter_token_seconds"]
        assert 0 < stats["p50"] <= stats["p95"] <= stats["p99"]
    burst = scenarios["burst"]
    assert burst["refused"] > 0 and burst["refused"] == burst["refused_with_retry_after"]
    assert set(burst["statuses"]) <= {"200", "429"} and burst["recovered"]
    assert scenarios["long"]["over_limit_status"] == 413  # and the near-limit ones were 200
    assert scenarios["disconnect"]["disconnected"] > 0
    ratios = scenarios["mixed"]["selected_ratio_by_target"]
    assert ratios["dense"] is None and ratios["0.5"] < ratios["0.9"] < ratios["0.99"] <= 1.0
    # the oversized bodies are refused (this server's body limit is 1 MiB: the first two by
    # their size, the others by what they hold), the probes meanwhile answered, the stream done
    answers = oversized["answers"]
    assert oversized["server_errors"] == 0 and oversized["connection_errors"] == 0, (
        oversized["errors"], answers)
    assert answers["6 MB prompt"]["statuses"] == ["413"]
    assert answers["250,000 empty messages"]["statuses"] == ["413"]
    assert answers["2,049 empty messages"]["statuses"] == ["400"]
    assert answers["prompt longer than the context"]["statuses"] == ["413"]
    assert oversized["probes"] > 0 and set(oversized["probe_statuses"]) == {"200"}
    assert oversized["stream_status"] == 200
    assert report["after"]["idle"]
    assert_nothing_held(engine, url)


def test_a_thousand_mixed_requests_with_disconnects_leave_no_kv(engine, url):
    # 8 clients for 12 places: a dropped stream's place frees a moment after the client left,
    # so now and then the next request finds the queue full (429) and is counted, not lost
    settings = loadgen.Settings(url=url, requests=1000, max_tokens=4, concurrency=(8,),
                                disconnect_share=0.3)  # fmt: skip

    async def thousand():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            report = (await loadgen.mixed(client, settings, loadgen.random.Random(1)))[0]
            return report, await loadgen.settled(client)

    report, after = asyncio.run(thousand())
    assert report["requests"] == 1000 and set(report["statuses"]) <= {"200", "429"}
    assert report["statuses"]["200"] >= 900
    assert after["idle"] and after["kv_cache_usage_ratio"] == 0.0
    assert_nothing_held(engine, url)


def test_schemathesis_finds_no_server_error(engine, url, tmp_path):
    command = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert command, "schemathesis is in the dev extra"
    report = tmp_path / "report.json"
    result = subprocess.run(
        [command, "run", f"{url}/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", "20", "--seed", "1", "--report", "ndjson",
         "--report-ndjson-path", str(report)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:]
    assert "generated" in result.stdout and " failed" not in result.stdout.split("SUMMARY")[-1]
    assert report.stat().st_size > 0
    assert_nothing_held(engine, url)


def post_raw(url: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", content=body, timeout=30,
                      headers={"Content-Type": "application/json"})  # fmt: skip


def test_inputs_meant_to_hurt_get_a_4xx(engine, url):
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert post_raw(url, deep).status_code == 400
    invalid_utf8 = b'{"messages": [{"role": "user", "content": "\xff\xfe hi"}]}'
    assert post_raw(url, invalid_utf8).status_code == 400
    assert post_raw(url, b"x" * (2 * 1024 * 1024)).status_code == 413  # beyond the body limit
    # a million tokens of text (within the body limit): refused from its length, before the
    # tokenizer spends seconds on it
    million = json.dumps({"messages": [{"role": "user", "content": "ab " * 300_000}]})
    reply = post_raw(url, million.encode())
    assert reply.status_code == 413 and "characters" in reply.json()["error"]["message"]
    reply = httpx.post(f"{url}/v1/chat/completions", json=CHAT | {"max_tokens": 10**9})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "max_tokens"
    reply = httpx.post(f"{url}/v1/completions", json={"prompt": "x" * 10**5, "max_tokens": 1})
    assert reply.status_code == 413
    assert_nothing_held(engine, url)


def test_a_partial_body_then_a_closed_connection_counts_as_499(engine, url):
    """The client announced 1,000 bytes, sent 10 and hung up: nobody was answered, nothing
    failed on our side, so it is 499, not 500."""
    def count(status: str) -> float:
        text = httpx.get(f"{url}/metrics").text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "tactic_requests_total" and s.labels["status"] == status)

    before_499, before_500 = count("499"), count("500")
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                           b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                           b'{"message')  # fmt: skip
    deadline = time.monotonic() + 10
    while count("499") == before_499 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count("499") == before_499 + 1 and count("500") == before_500
    assert_nothing_held(engine, url)


def test_process_memory_is_exported_for_soak_runs(url):
    text = httpx.get(f"{url}/metrics").text
    assert "process_resident_memory_bytes" in text


def test_the_full_run_serves_loads_and_drains_each_engine(tmp_path):
    """loadtests/full_run.py at a tiny scale: `tactic-server serve` as a subprocess, scenarios
    over its socket, SIGTERM: a report with no 5xx, KV back to 0 and exit status 0."""
    script = Path(__file__).resolve().parent.parent / "loadtests" / "full_run.py"
    done = subprocess.run(
        [sys.executable, str(script), "--engines", "embedded", "--requests", "4",
         "--concurrency", "2", "--scenarios", "sweep", "long", "disconnect",
         "--max-model-len", "1024", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "loadtest_embedded_cpu.json").read_text())
    assert [s["scenario"] for s in report["scenarios"]] == ["sweep c=2", "long", "disconnect"]
    assert report["server_errors"] == 0 and report["after"]["idle"]
    assert report["exit_status_after_sigterm"] == 0
    long = report["scenarios"][1]
    assert long["over_limit_status"] == 413 and long["statuses"] == {"200": long["requests"]}
