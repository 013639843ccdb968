"""The HTTP API end to end: a real uvicorn server on a free port in front of the real engine on a
tiny random model, driven by the official `openai` client (and by httpx where a test sends what
that client would refuse to)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator
from functools import partial

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtests.inprocess import serving
from tactic_server.api import create_app
from tactic_server.api.limits import RequestLimits
from tactic_server.engine.config import EngineConfig
from tactic_server.engine.engine import Engine
from tactic_server.engine.types import DEFAULT_MAX_TOKENS
from tactic_server.tactic.config import TacticConfig
from tactic_server.testing.tiny_model import make_tiny_model

openai = pytest.importorskip("openai")  # the dev extra installs it; the GPU machine lacks it

API_KEY = "test-key"
MAX_MODEL_LEN = 512
MAX_BODY_BYTES = 64 * 1024
# small segments so that short test prompts are clustered and Tactic has something to select
TACTIC = TacticConfig(segment_size=64, cluster_size=8)
LONG_PROMPT = " ".join(f"item {index} is {index * 7 % 13}" for index in range(40))

METRIC_NAMES = {
    "tactic_selected_token_ratio",
    "tactic_target_fraction",
    "tactic_clustering_seconds",
    "tactic_decode_step_seconds",
    "tactic_time_to_first_token_seconds",
    "tactic_inter_token_latency_seconds",
    "tactic_request_latency_seconds",
    "tactic_prompt_tokens",
    "tactic_generation_tokens",
    "tactic_requests",
    "tactic_running_requests",
    "tactic_waiting_requests",
    "tactic_kv_cache_usage_ratio",
}


def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def engine_config(model_dir, **overrides) -> EngineConfig:
    settings = dict(model_dir=str(model_dir), max_model_len=MAX_MODEL_LEN, tactic=TACTIC)
    return EngineConfig(**(settings | overrides))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="module")
def server(model_dir):
    """The server most tests use: loads its engine in the background, requires API_KEY."""
    app = create_app(
        load_engine=partial(Engine.from_config, engine_config(model_dir)),
        api_key=API_KEY,
        limits=RequestLimits(max_body_bytes=MAX_BODY_BYTES),
    )
    with serving(app) as url:
        wait_until(lambda: httpx.get(f"{url}/ready").status_code == 200, timeout=60)
        yield url, app


@pytest.fixture(scope="module")
def url(server) -> str:
    return server[0]


@pytest.fixture(scope="module")
def engine(server) -> Engine:
    return server[1].state.engine


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def http(url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        yield http


def chat(client, engine, content: str = "Hello", **options):
    options = {"max_tokens": 8, "temperature": 0.0} | options
    messages = [{"role": "user", "content": content}]
    return client.chat.completions.create(model=engine.model_name, messages=messages, **options)


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    """The status, and OpenAI's error object with its four fields."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def scrape(url: str) -> dict[str, float]:
    """Every sample of /metrics by name and labels, parsed by prometheus-client."""
    text = httpx.get(f"{url}/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{key}={value}" for key, value in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def post_json(http, path: str, body: dict) -> httpx.Response:
    """As a client's JSON library writes it, \\u escapes and all (httpx would write text)."""
    return http.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})


def test_chat_completion_answers_with_usage_and_tactic_report(client, engine):
    completion = chat(client, engine, LONG_PROMPT, extra_body={"ignore_eos": True})
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == engine.model_name
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    usage = completion.usage
    assert usage.prompt_tokens > 100 and usage.completion_tokens == 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    tactic = usage.tactic
    assert 0 < tactic["selected_ratio"] <= 1 and 0 < tactic["estimated_mass"] <= 1.0001
    assert tactic["attended_tokens"] <= usage.total_tokens


def test_stream_joins_to_the_non_streamed_greedy_text(client, engine):
    options = {"max_tokens": 16, "extra_body": {"ignore_eos": True}}
    whole = chat(client, engine, LONG_PROMPT, **options)
    streamed = chat(
        client, engine, LONG_PROMPT, stream=True, stream_options={"include_usage": True}, **options
    )
    chunks = list(streamed)
    assert len({chunk.id for chunk in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_text_completion_and_its_stream_give_the_same_text(client, engine):
    options = {"model": engine.model_name, "prompt": LONG_PROMPT, "max_tokens": 12}
    options |= {"temperature": 0.0, "extra_body": {"ignore_eos": True}}
    whole = client.completions.create(**options)
    assert whole.id.startswith("cmpl-") and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12
    chunks = list(client.completions.create(stream=True, **options))
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_request_without_max_tokens_gets_the_route_default_within_the_context(http, engine):
    """16 new tokens for a text completion (OpenAI's default), DEFAULT_MAX_TOKENS for a chat,
    and never more than the context leaves."""
    text = http.post("/v1/completions", json={"prompt": "Hello", "ignore_eos": True}).json()
    assert text["usage"]["completion_tokens"] == 16
    body = {"messages": [{"role": "user", "content": "Hello"}], "ignore_eos": True}
    chat_reply = http.post("/v1/chat/completions", json=body).json()
    assert chat_reply["usage"]["prompt_tokens"] + DEFAULT_MAX_TOKENS < MAX_MODEL_LEN
    assert chat_reply["usage"]["completion_tokens"] == DEFAULT_MAX_TOKENS
    body["messages"][0]["content"] = LONG_PROMPT[: len(LONG_PROMPT) * 3 // 4]
    long_reply = http.post("/v1/chat/completions", json=body).json()["usage"]
    assert long_reply["prompt_tokens"] > MAX_MODEL_LEN - DEFAULT_MAX_TOKENS
    assert long_reply["completion_tokens"] == MAX_MODEL_LEN - long_reply["prompt_tokens"]


def test_a_lone_surrogate_prompt_is_400_and_the_developer_role_is_system(http):
    """Current OpenAI SDKs send "developer" where "system" was; the template sees "system"."""
    error = assert_error(post_json(http, "/v1/completions", {"prompt": "a\ud800"}), 400, "prompt")
    assert error["type"] == "invalid_request_error"
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    reply = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
    assert reply.status_code == 200, reply.text
    messages[0]["role"] = "system"
    system = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
    assert reply.json()["usage"]["prompt_tokens"] == system.json()["usage"]["prompt_tokens"]


def test_eight_concurrent_requests_are_batched_and_get_their_own_greedy_answer(url, client, engine):
    prompts = [f"Request {index}: {LONG_PROMPT[: 40 * (index + 1)]}" for index in range(8)]
    alone = [chat(client, engine, prompt).choices[0].message.content for prompt in prompts]

    async def all_at_once() -> list:
        async with openai.AsyncOpenAI(
            base_url=f"{url}/v1", api_key=API_KEY, max_retries=0
        ) as batch_client:
            return await asyncio.gather(
                *(
                    batch_client.chat.completions.create(
                        model=engine.model_name,
                        messages=[{"role": "user", "content": prompt}],
                        max_tokens=8,
                        temperature=0.0,
                    )
                    for prompt in prompts
                )
            )

    steps_before = scrape(url)["tactic_decode_step_seconds_count{}"]
    together = asyncio.run(all_at_once())
    assert [completion.choices[0].message.content for completion in together] == alone
    # one at a time, every token after a request's first would take a decode step of its own
    decoded_tokens = sum(completion.usage.completion_tokens - 1 for completion in together)
    assert scrape(url)["tactic_decode_step_seconds_count{}"] - steps_before < decoded_tokens
    wait_until(lambda: engine.stats().kv_slots_in_use == 0)


def test_lower_target_selects_fewer_tokens(client, engine):
    def selected_ratio(**extra_body) -> float:
        extra_body["ignore_eos"] = True
        completion = chat(client, engine, LONG_PROMPT, max_tokens=6, extra_body=extra_body)
        return completion.usage.tactic["selected_ratio"]

    low, high = selected_ratio(tactic={"target": 0.5}), selected_ratio(tactic={"target": 0.99})
    assert 0 < low <= high <= 1
    assert selected_ratio(custom_params={"tactic_target": 0.5}) == pytest.approx(low)
    dense = chat(client, engine, LONG_PROMPT, extra_body={"tactic": {"enabled": False}})
    assert dense.usage.tactic is None


VALID_CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"tactic": {"target": 0}}, "tactic.target"),
        ({"tactic": {"target": 1.5}}, "tactic.target"),
        ({"custom_params": {"tactic_target": 0}}, "custom_params.tactic_target"),
        ({"messages": []}, "messages"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"messages": [{"role": "robot", "content": "Hi"}]}, "messages.0.role"),
        ({"messages": "Hi"}, "messages"),
        ({"messages": [{"role": "tool", "content": "42"}]}, "messages"),  # the template refuses
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "messages.0.content"),
        ({"max_tokens": "4"}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"stream": "yes"}, "stream"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"n": 2}, "n"),
        ({"seed": -1}, "seed"),
        ({"messages": None}, "messages"),
        # a lone surrogate is no character: in content, a content part or a stop string
        ({"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages.0.content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
            "messages.0.content",
        ),
        ({"stop": "x\ud83d"}, "stop"),
    ],
)
def test_invalid_chat_fields_answer_400(http, change, param):
    error = assert_error(post_json(http, "/v1/chat/completions", VALID_CHAT | change), 400, param)
    assert error["type"] == "invalid_request_error"


def test_invalid_requests_answer_with_their_status_and_the_server_goes_on(http, client, engine):
    malformed = http.post(
        "/v1/chat/completions",
        content=b'{"messages": [',
        headers={"Content-Type": "application/json"},
    )
    assert assert_error(malformed, 400)["code"] == "invalid_json"
    assert_error(http.post("/v1/completions", json={"prompt": ""}), 400, "prompt")
    assert_error(http.post("/v1/completions", json={"prompt": ["a", "b"]}), 400, "prompt")

    unknown = http.post("/v1/chat/completions", json=VALID_CHAT | {"model": "gpt-5"})
    assert assert_error(unknown, 404, "model")["code"] == "model_not_found"
    assert_error(http.get("/v1/nothing-here"), 404)

    declared = http.post("/v1/completions", json={"prompt": "x" * MAX_BODY_BYTES})
    assert assert_error(declared, 413)["code"] == "request_too_large"
    streamed = http.post(
        "/v1/completions", content=(b"x" * 4096 for _ in range(MAX_BODY_BYTES // 4096 + 1))
    )  # chunked: no Content-Length to judge by
    assert_error(streamed, 413)

    beyond_context = http.post("/v1/completions", json={"prompt": "word " * MAX_MODEL_LEN * 2})
    assert assert_error(beyond_context, 413)["code"] == "context_length_exceeded"

    with pytest.raises(openai.BadRequestError):
        chat(client, engine, max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "x"}])

    assert chat(client, engine).choices[0].finish_reason in ("stop", "length")
    wait_until(lambda: engine.stats().kv_slots_in_use == 0)


def test_wrong_or_missing_api_key_answers_401_and_probes_stay_open(url, engine):
    for headers in ({"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + API_KEY}, {}):
        response = httpx.post(f"{url}/v1/chat/completions", json=VALID_CHAT, headers=headers)
        assert assert_error(response, 401)["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    for probe in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{url}{probe}").status_code == 200


def test_models_lists_the_served_model(client, engine):
    (card,) = client.models.list().data
    assert card.id == engine.model_name and card.max_model_len == engine.max_model_len


def test_unexpected_error_answers_500_with_an_id_and_the_server_goes_on(
    http, client, engine, monkeypatch
):
    def broken(request):
        raise RuntimeError("a bug")

    with monkeypatch.context() as patch:
        patch.setattr(engine, "generate", broken)
        error = assert_error(http.post("/v1/chat/completions", json=VALID_CHAT), 500)
    assert error["type"] == "server_error" and "id " in error["message"]
    assert "a bug" not in error["message"]  # internals stay in the log
    assert chat(client, engine).choices[0].finish_reason in ("stop", "length")


def test_every_response_carries_a_request_id(http, url):
    reply = http.post("/v1/chat/completions", json=VALID_CHAT)
    assert reply.json()["id"] == f"chatcmpl-{reply.headers['x-request-id']}"
    traced = {"X-Request-Id": "trace-7.a"}
    mine = http.post("/v1/chat/completions", json=VALID_CHAT, headers=traced)
    assert mine.headers["x-request-id"] == "trace-7.a" and mine.json()["id"] != reply.json()["id"]
    again = http.post("/v1/chat/completions", json=VALID_CHAT, headers=traced)
    assert again.status_code == 200 and again.json()["id"] != mine.json()["id"]  # ours stay unique
    odd = httpx.get(f"{url}/health", headers={"X-Request-Id": "x" * 500})
    assert len(odd.headers["x-request-id"]) == 32  # not echoed: ours instead
    refused = post_json(http, "/v1/chat/completions", VALID_CHAT | {"n": 3})
    assert refused.status_code == 400 and refused.headers["x-request-id"]


def test_a_failed_step_answers_500_without_its_exception_text(http, client, engine, monkeypatch):
    def failing(step):
        raise RuntimeError("shape [3, 7] at /secret/path")

    with monkeypatch.context() as patch:
        patch.setattr(engine.runner, "run", failing)
        error = assert_error(http.post("/v1/chat/completions", json=VALID_CHAT), 500)
    assert error["code"] == "generation_failed" and "request chatcmpl-" in error["message"]
    assert "secret" not in error["message"] and "shape" not in error["message"]
    assert engine.stats().kv_slots_in_use == 0
    assert chat(client, engine).choices[0].finish_reason in ("stop", "length")


def test_metrics_count_what_was_sent(url, http, client, engine):
    before = scrape(url)
    completions = [
        chat(client, engine, LONG_PROMPT, extra_body={"tactic": {"target": t}}) for t in (0.6, 0.8)
    ]
    assert_error(http.post("/v1/chat/completions", json=VALID_CHAT | {"n": 3}), 400)
    after = scrape(url)

    names = {name.split("{")[0] for name in after}
    for metric in METRIC_NAMES:
        assert any(name.startswith(metric) for name in names), metric

    def grew(sample: str) -> float:
        return after.get(sample, 0.0) - before.get(sample, 0.0)

    assert grew("tactic_requests_total{status=200}") == 2
    assert grew("tactic_requests_total{status=400}") == 1
    prompt_tokens = sum(completion.usage.prompt_tokens for completion in completions)
    generated = sum(completion.usage.completion_tokens for completion in completions)
    assert grew("tactic_prompt_tokens_total{}") == prompt_tokens
    assert grew("tactic_generation_tokens_total{}") == generated
    assert grew("tactic_target_fraction_count{}") == 2
    assert grew("tactic_target_fraction_sum{}") == pytest.approx(1.4)
    assert grew("tactic_time_to_first_token_seconds_count{}") == 2
    assert grew("tactic_request_latency_seconds_count{}") == 2
    # every token after a request's first comes from a decode step
    assert grew("tactic_decode_step_seconds_count{}") >= generated - len(completions)
    assert after["tactic_clustering_seconds_count{}"] > 0
    assert after["tactic_running_requests{}"] == 0 and after["tactic_kv_cache_usage_ratio{}"] == 0


def test_prompt_text_stays_out_of_the_logs(client, engine, caplog):
    secret = "the launch code is swordfish"
    with caplog.at_level(logging.INFO):
        chat(client, engine, secret)
    assert "swordfish" not in caplog.text


def test_health_and_ready_follow_the_model_loading():
    gate, failures = threading.Event(), []

    def load_engine():
        gate.wait(10)
        raise OSError("no weights here")

    app = create_app(load_engine=load_engine, on_load_failure=failures.append)
    with serving(app) as url:
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        assert assert_error(httpx.get(f"{url}/ready"), 503)["code"] == "model_not_ready"
        assert_error(httpx.post(f"{url}/v1/chat/completions", json=VALID_CHAT), 503)
        gate.set()
        wait_until(lambda: failures)
        assert assert_error(httpx.get(f"{url}/health"), 503)["code"] == "model_load_failed"
    assert isinstance(failures[0], OSError)


def test_ready_waits_for_the_warm_up_which_metrics_do_not_count(model_dir, caplog):
    """A loaded engine first answers the warm-up's three requests (dense, Tactic, Tactic again
    over the cached prefix: what compiles a fresh GPU's kernels); /ready says 503 until they
    are done, and /metrics counts none of them."""
    engine = Engine.from_config(engine_config(model_dir))
    gate, seen = threading.Event(), []
    generate = engine.generate

    async def gated(request):
        seen.append((request.request_id, len(request.prompt_token_ids), request.tactic.enabled))
        await asyncio.to_thread(gate.wait, 20)
        async for output in generate(request):
            yield output

    engine.generate = gated
    app = create_app(load_engine=lambda: engine)
    with caplog.at_level(logging.INFO), serving(app) as url:
        wait_until(lambda: seen)
        assert assert_error(httpx.get(f"{url}/ready"), 503)["code"] == "model_not_ready"
        gate.set()
        wait_until(lambda: httpx.get(f"{url}/ready").status_code == 200)
        assert [(name, enabled) for name, _, enabled in seen] == [
            ("warm-up-dense", False),
            ("warm-up-tactic", True),
            ("warm-up-cached", True),
        ]
        assert all(length > engine.config.tactic.segment_size for _, length, _ in seen)
        samples = scrape(url)
        assert not any(value for name, value in samples.items()
                       if name.startswith("tactic_requests_total"))  # fmt: skip
        assert samples["tactic_running_requests{}"] == 0
        assert samples["tactic_kv_cache_usage_ratio{}"] == 0
    assert "warmed up in" in caplog.text


def test_full_queue_answers_429_and_a_client_leaving_mid_stream_frees_its_kv(model_dir):
    """One batch place, no waiting room: a second request while one generates is refused."""
    engine = Engine.from_config(engine_config(model_dir, max_batch=1, max_waiting=0))
    app = create_app(engine)  # no API key on this one
    long_generation = VALID_CHAT | {"max_tokens": 400, "ignore_eos": True, "stream": True}
    try:
        with serving(app) as url, httpx.Client(base_url=url) as http:
            with http.stream("POST", "/v1/chat/completions", json=long_generation) as stream:
                assert stream.status_code == 200
                lines = stream.iter_lines()  # kept: a dropped iterator closes the connection
                assert next(lines).startswith("data: ")
                refused = http.post("/v1/chat/completions", json=VALID_CHAT)
                assert assert_error(refused, 429)["type"] == "rate_limit_error"
                assert int(refused.headers["Retry-After"]) >= 1
            # leaving the stream closed the connection: the request is aborted, its KV freed
            wait_until(lambda: engine.stats().kv_slots_in_use == 0)
            assert engine.stats().running_requests == 0
            assert http.post("/v1/chat/completions", json=VALID_CHAT).status_code == 200
            assert scrape(url)["tactic_requests_total{status=499}"] == 1
    finally:
        asyncio.run(engine.shutdown())


def test_a_client_leaving_while_queued_is_aborted_before_its_prefill(model_dir, monkeypatch):
    """One batch place: a second request queues behind a long one; its client gives up. The
    request leaves the queue at once and is never prefilled (steps are slowed so that the long
    one surely outlasts the wait, on any machine)."""
    engine = Engine.from_config(engine_config(model_dir, max_batch=1, max_waiting=4))
    prefilled, run = [], engine.runner.run

    def slow_run(step):
        prefilled.extend(sequence.request_id for sequence, _, _ in step.prefill)
        time.sleep(0.02)
        return run(step)

    monkeypatch.setattr(engine.runner, "run", slow_run)
    app = create_app(engine)
    long_generation = VALID_CHAT | {"max_tokens": 400, "ignore_eos": True, "stream": True}
    try:
        with serving(app) as url, httpx.Client(base_url=url) as http:
            with http.stream("POST", "/v1/chat/completions", json=long_generation) as stream:
                lines = stream.iter_lines()
                assert next(lines).startswith("data: ")
                with pytest.raises(httpx.ReadTimeout):  # 400 steps of >= 20 ms are ahead of it
                    http.post("/v1/chat/completions", json=VALID_CHAT, timeout=httpx.Timeout(
                        10.0, read=0.5))  # fmt: skip
                wait_until(lambda: engine.stats().waiting_requests == 0)
                assert engine.stats().running_requests == 1  # the long one goes on
            wait_until(lambda: engine.stats().kv_slots_in_use == 0)
            assert len(prefilled) == 1  # the long one's prompt only
            assert scrape(url)["tactic_requests_total{status=499}"] == 2
    finally:
        asyncio.run(engine.shutdown())
