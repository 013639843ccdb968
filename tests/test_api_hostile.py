"""Clients that try to hurt the server, over real sockets to a real uvicorn server in front of
the embedded engine on a tiny model: oversized work refused before it is parsed or tokenised,
probes answered while a long prompt is tokenised, slow and silent connections closed, a
connection limit, and requests outlasting the drain period on SIGTERM answered with an error.
After each, the server holds nothing and still answers."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from loadtests.inprocess import free_port, serving, wait_for
from tactic_server.api import create_app
from tactic_server.api.limits import RequestLimits
from tactic_server.api.server import ServerSettings
from tactic_server.engine.config import EngineConfig
from tactic_server.engine.engine import Engine
from tactic_server.tactic.config import TacticConfig
from tactic_server.testing.tiny_model import make_tiny_model

MAX_MODEL_LEN = 512
LIMITS = RequestLimits(max_body_bytes=64 * 1024, body_timeout=0.5, max_messages=16)
# short enough that a test sees each close; the waits for them are generous
SHORT = ServerSettings(header_timeout=0.5, keep_alive_timeout=0.5)
CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
GENEROUS = 30.0  # seconds any expected event may take on a loaded machine


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    config = EngineConfig(
        model_dir=str(make_tiny_model(tmp_path_factory.mktemp("model"))),
        max_model_len=MAX_MODEL_LEN, tactic=TacticConfig(segment_size=64, cluster_size=8),
    )  # fmt: skip
    engine = Engine.from_config(config)
    yield engine
    asyncio.run(engine.shutdown())


@pytest.fixture(scope="module")
def url(engine):
    with serving(create_app(engine, limits=LIMITS), SHORT) as url:
        yield url


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def assert_nothing_held(engine, url) -> None:
    deadline = time.monotonic() + GENEROUS
    while engine.stats().kv_slots_in_use or engine.stats().running_requests:
        assert time.monotonic() < deadline, "the engine still holds a request"
        time.sleep(0.05)
    assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=GENEROUS).status_code == 200


def closed_by_server(connection: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (fails if it does not)."""
    connection.settimeout(GENEROUS)
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


class Calls:
    """Counts calls of one tokenizer method, which still does its work."""

    def __init__(self, method) -> None:
        self.method = method
        self.count = 0

    def __call__(self, *args, **kwargs):
        self.count += 1
        return self.method(*args, **kwargs)


def test_oversized_work_is_refused_before_parsing_or_tokenizing(engine, url, monkeypatch):
    encode = Calls(engine.tokenizer.encode)
    template = Calls(engine.tokenizer.apply_chat_template)
    monkeypatch.setattr(engine.tokenizer, "encode", encode)
    monkeypatch.setattr(engine.tokenizer, "apply_chat_template", template)
    with httpx.Client(base_url=url, timeout=GENEROUS) as http:
        # over the byte limit: by its Content-Length, and a chunked body as it passes the limit
        declared = http.post("/v1/completions", json={"prompt": "x" * LIMITS.max_body_bytes})
        assert assert_error(declared, 413)["code"] == "request_too_large"
        chunked = http.post("/v1/completions", content=(b" " * 4096 for _ in range(17)))
        assert assert_error(chunked, 413)["code"] == "request_too_large"
        # many messages, each small (the 250,000 empty messages of the issue, scaled down)
        many = {"messages": [{"role": "user", "content": ""}] * (LIMITS.max_messages + 1)}
        error = assert_error(http.post("/v1/chat/completions", json=many), 400, "messages")
        assert error["code"] == "too_long" and str(LIMITS.max_messages) in error["message"]
        # within the byte limit but more characters than the context's tokens can hold
        long = {"prompt": "x" * (MAX_MODEL_LEN * engine.tokenizer.max_token_chars + 1)}
        error = assert_error(http.post("/v1/completions", json=long), 413, "prompt")
        assert error["code"] == "context_length_exceeded"
        assert encode.count == 0 and template.count == 0
        most = {"messages": [{"role": "user", "content": "hi"}] * LIMITS.max_messages,
                "max_tokens": 2}  # fmt: skip
        assert http.post("/v1/chat/completions", json=most).status_code == 200
        assert template.count == 1 and encode.count == 1
    assert_nothing_held(engine, url)


def test_probes_and_streams_go_on_while_a_long_prompt_is_tokenized(engine, url, monkeypatch):
    """The tokenizer of a request works for seconds (it is given a text the size of a
    million-token prompt); meanwhile /health answers and a stream that runs already goes on.
    With the GIL held for the whole encode, both would wait for its end."""
    encode, long_text = engine.tokenizer.encode, "word and more " * 150_000
    encoding, encoded = threading.Event(), threading.Event()

    def slow_encode(text, **options):
        encoding.set()
        encode(long_text)  # the seconds a long prompt takes, in one call of the tokenizer
        encoded.set()
        return encode(text, **options)

    streamed = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 400,
                "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.Client(base_url=url, timeout=GENEROUS) as http:
        with http.stream("POST", "/v1/chat/completions", json=streamed) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            monkeypatch.setattr(engine.tokenizer, "encode", slow_encode)
            slow = threading.Thread(target=httpx.post, args=(f"{url}/v1/chat/completions",),
                                    kwargs={"json": CHAT, "timeout": GENEROUS})  # fmt: skip
            slow.start()
            assert encoding.wait(GENEROUS)
            assert http.get("/health").status_code == 200
            tokens_meanwhile = 0
            for line in lines:
                tokens_meanwhile += '"content"' in line
                if tokens_meanwhile == 5:
                    break
            assert not encoded.is_set(), "the probe and the stream waited for the tokenizer"
        slow.join(GENEROUS)
    monkeypatch.undo()
    assert_nothing_held(engine, url)


def trickled_until_closed(connection: socket.socket) -> bytes:
    """Sends a byte at a time, as a slow client would, until the server hangs up; returns what
    it answered meanwhile (fails if it never hangs up)."""
    deadline = time.monotonic() + GENEROUS
    received = b""
    while time.monotonic() < deadline:
        try:
            connection.sendall(b"X")
            readable, _, _ = select.select([connection], [], [], 0.05)
            if readable:
                chunk = connection.recv(65536)
                if not chunk:
                    return received
                received += chunk
        except OSError:  # reset by the server: the bytes sent after its close
            return received
    raise AssertionError("the server never closed a connection sending a byte at a time")


def assert_request_timeout(answered: bytes) -> None:
    head, _, body = answered.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answered
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"


def test_a_silent_connection_is_closed_and_slow_headers_get_408(engine, url):
    with socket.create_connection(address(url)) as silent:
        assert closed_by_server(silent) == b""
    with socket.create_connection(address(url)) as stalled:
        stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        assert_request_timeout(closed_by_server(stalled))
    with socket.create_connection(address(url)) as slow:
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        answered = trickled_until_closed(slow)
    if answered:  # the reset answering a byte sent after the close may discard the 408 before it
        assert_request_timeout(answered)
    assert_nothing_held(engine, url)


def test_an_idle_keep_alive_connection_is_closed(engine, url):
    with socket.create_connection(address(url)) as connection:
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answered = closed_by_server(connection)
    assert answered.startswith(b"HTTP/1.1 200") and answered.endswith(b'{"status":"ok"}')


def test_a_slow_body_gets_408_and_frees_everything(engine, url):
    with socket.create_connection(address(url)) as connection:
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                           b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                           b'{"messages"')  # fmt: skip
        assert_request_timeout(closed_by_server(connection))
    text = httpx.get(f"{url}/metrics").text
    assert 'tactic_requests_total{status="408"} 1.0' in text
    assert_nothing_held(engine, url)


def test_connections_beyond_the_limit_get_503_with_the_error_object_until_some_close(engine):
    settings = ServerSettings(header_timeout=GENEROUS * 4, max_connections=3)
    with serving(create_app(engine), settings) as url:
        idle = [socket.create_connection(address(url)) for _ in range(settings.max_connections)]
        try:
            deadline = time.monotonic() + GENEROUS  # until the server has seen them all
            while (refused := httpx.get(f"{url}/health", timeout=GENEROUS)).status_code != 503:
                assert time.monotonic() < deadline, "the limit was never reached"
                time.sleep(0.05)
            assert assert_error(refused, 503)["code"] == "server_overloaded"
            assert refused.headers["Retry-After"] == "1"
            assert refused.headers["Connection"] == "close"
        finally:
            for connection in idle:
                connection.close()
        deadline = time.monotonic() + GENEROUS
        while httpx.get(f"{url}/health", timeout=GENEROUS).status_code != 200:
            assert time.monotonic() < deadline, "the server did not recover"
            time.sleep(0.05)
        assert_nothing_held(engine, url)


def test_sigterm_ends_what_outlasts_the_drain_period_with_an_error(tmp_path):
    """`serve --drain-seconds 1` with a stream and a plain request far longer than that: on
    SIGTERM both run on for the drain period, then the stream gets an error event and [DONE],
    the plain request a 503 with the error object; the process exits 0."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tactic_server.cli", "serve", "--port", str(port),
         "--drain-seconds", "1"],
        env=os.environ | {"TACTIC_SERVER_CACHE": str(tmp_path)},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    endless = {"messages": [{"role": "user", "content": "Tell me a story."}],
               "max_tokens": 20_000, "ignore_eos": True}  # fmt: skip
    try:
        wait_for(f"{url}/ready", process)
        plain: list[httpx.Response] = []
        waiting = threading.Thread(target=lambda: plain.append(
            httpx.post(f"{url}/v1/chat/completions", json=endless, timeout=300)))  # fmt: skip
        waiting.start()
        events = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=endless | {"stream": True},
                          timeout=300) as reply:  # fmt: skip
            lines = reply.iter_lines()
            events.append(next(line for line in lines if line.startswith("data:")))
            deadline = time.monotonic() + GENEROUS
            while "tactic_running_requests 2.0" not in httpx.get(f"{url}/metrics").text:
                assert time.monotonic() < deadline, "the plain request never ran"
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            events.extend(line for line in lines if line.startswith("data:"))
        waiting.join(GENEROUS)
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["code"] == "server_shutting_down" and error["type"] == "server_error"
        assert sum('"content"' in event for event in events) > 1  # it ran on after SIGTERM
        assert_error(plain[0], 503)
        assert plain[0].json()["error"]["code"] == "server_shutting_down"
        assert process.wait(timeout=GENEROUS * 2) == 0
    finally:
        if process.poll() is None:
            process.kill()
