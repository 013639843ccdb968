"""`tactic-server serve --engine sglang` end to end on a GPU: the CLI in a subprocess (SGLang's
scheduler in its own), the official openai client over a real socket, Tactic's statistics in
usage, and SGLang's metrics beside ours on /metrics. Marked gpu: SGLang's CUDA kernels do not
load on a CPU machine. TACTIC_TEST_TP=2 serves with --tp 2 (two GPUs)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtests.inprocess import free_port, wait_for
from tactic_server.testing.tiny_model import PEAKED_LLAMA, make_tiny_model

pytestmark = pytest.mark.gpu
openai = pytest.importorskip("openai")
pytest.importorskip("sglang")

PROMPT = "Summarise the following notes. " + "The cache keeps every key of the context. " * 250


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = make_tiny_model(
        tmp_path_factory.mktemp("model"), "llama", dtype="bfloat16",
        max_position_embeddings=8192, **PEAKED_LLAMA,
    )  # fmt: skip
    port = free_port()
    command = [sys.executable, "-m", "tactic_server.cli", "serve", "--engine", "sglang",
               "--model", str(model_dir), "--port", str(port), "--max-batch", "4",
               "--tp", os.environ.get("TACTIC_TEST_TP", "1"),
               # every decode step selects: the auto fallback may decode a ~1k-token request
               # dense (selected_ratio 1), which would hide what the target does
               "--dense-fallback", "off"]  # fmt: skip
    process = subprocess.Popen(command, env=os.environ | {"TACTIC_SEGMENT_SIZE": "512"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/ready", process, timeout=400)
        yield url
    finally:
        process.terminate()
        assert process.wait(timeout=120) == 0


def test_openai_client_gets_an_answer_with_tactic_usage(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    model = client.models.list().data[0].id
    results = {}
    for target in (0.5, 0.999):
        completion = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=16,
            temperature=0.0, extra_body={"tactic": {"target": target}, "ignore_eos": True},
        )  # fmt: skip
        usage = completion.usage
        assert completion.choices[0].finish_reason == "length"
        assert usage.completion_tokens == 16 and usage.prompt_tokens > 1000
        results[target] = usage.tactic
        assert 0 < usage.tactic["selected_ratio"] <= 1
        assert usage.tactic["decode_steps"] > 0 and usage.tactic["dense_fallback_steps"] == 0
    assert results[0.5]["selected_ratio"] < results[0.999]["selected_ratio"]
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=8,
        temperature=0.0, stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert sum(1 for chunk in stream if chunk.choices and chunk.choices[0].delta.content) >= 1


def test_metrics_hold_ours_and_sglangs(server):
    text = httpx.get(f"{server}/metrics").text
    names = {family.name for family in text_string_to_metric_families(text)}
    assert "tactic_selected_token_ratio" in names and "tactic_requests" in names
    assert any(name.startswith("sglang:") for name in names), sorted(names)


def test_openai_sampling_parameters_reach_sglang(server):
    """logprobs (chat and text, streamed or not), logit_bias and a penalty through SGLang; the
    parameters the server does not implement are refused as on the embedded engine."""
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    short = PROMPT[:400]
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": short}], max_tokens=6,
        temperature=0.0, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True},
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-3)

    options = dict(model=model, prompt=short, max_tokens=6, temperature=0.0, logprobs=2,
                   extra_body={"ignore_eos": True})  # fmt: skip
    # the first answer prefills cold; later ones extend over the radix cache's copy of the
    # prompt, whose bf16 arithmetic differs (0.015 nats at most, H200:
    # benchmarks/sglang_logprobs.py). Streamed and not are compared over the same cache state,
    # where they agree exactly (with the auto fallback they did not: 0.22 nats)
    cold = client.completions.create(**options).choices[0].logprobs
    whole = client.completions.create(**options).choices[0].logprobs
    assert whole.tokens == cold.tokens
    chunks = [c.choices[0].logprobs for c in client.completions.create(**options, stream=True)
              if c.choices and c.choices[0].logprobs]  # fmt: skip
    assert [t for c in chunks for t in c.tokens] == whole.tokens and len(whole.tokens) == 6
    assert [p for c in chunks for p in c.token_logprobs] == pytest.approx(whole.token_logprobs,
                                                                          abs=1e-3)  # fmt: skip

    forced = client.completions.create(**options | {"logprobs": 0}, logit_bias={"65": 100})
    assert len(set(forced.choices[0].logprobs.tokens)) == 1  # one token, said six times
    plain = client.completions.create(**options | {"max_tokens": 24}).choices[0].text
    penalised = client.completions.create(**options | {"max_tokens": 24},
                                          frequency_penalty=2.0).choices[0].text  # fmt: skip
    assert penalised != plain
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model=model, prompt="x", max_tokens=2, echo=True)


@pytest.mark.parametrize("extreme", [dict(temperature=1e-38), dict(top_p=1e-45),
                                     dict(temperature=2.0, top_p=1e-30)])  # fmt: skip
def test_extreme_sampling_fails_no_one_in_the_batch(server, extreme):
    """A near-zero temperature or top_p decoded in SGLang's batch beside an ordinary stream:
    both answer to their length (greedy, resp. the top token kept), neither fails the other."""
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    options = dict(model=model, messages=[{"role": "user", "content": PROMPT[:2000]}],
                   max_tokens=24, extra_body={"ignore_eos": True})  # fmt: skip

    def ordinary_stream():
        chunks = list(client.chat.completions.create(**options, temperature=1.0, stream=True))
        return [c.choices[0].finish_reason for c in chunks if c.choices][-1]

    with ThreadPoolExecutor(2) as pool:
        stream = pool.submit(ordinary_stream)
        odd = [pool.submit(client.chat.completions.create, **options, **extreme) for _ in "ab"]
        results = [future.result(timeout=120) for future in odd]
        assert stream.result(timeout=120) == "length"
    for result in results:
        assert result.choices[0].finish_reason == "length"
        assert result.usage.completion_tokens == 24


def test_a_client_leaving_while_queued_in_sglang_is_aborted(server):
    """Every batch place (--max-batch 4) held by a long stream: a fifth request queues in
    SGLang's scheduler; its client gives up. It leaves the queue while the four go on, and
    once they are closed too nothing is held; all five count as 499."""

    def sample(name: str, **labels) -> float:
        families = text_string_to_metric_families(httpx.get(f"{server}/metrics").text)
        return sum(s.value for family in families for s in family.samples
                   if s.name == name and labels.items() <= s.labels.items())  # fmt: skip

    def wait_until(condition, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.1)

    left_before = sample("tactic_requests_total", status="499")
    body = {"messages": [{"role": "user", "content": PROMPT[:400]}], "max_tokens": 6000,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.Client(base_url=server, timeout=60) as http, ExitStack() as streams:
        kept = []  # the line iterators: a dropped one closes its connection
        for _ in range(4):
            stream = streams.enter_context(http.stream("POST", "/v1/chat/completions", json=body))
            assert stream.status_code == 200
            kept.append(stream.iter_lines())
            assert next(kept[-1]).startswith("data: ")
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/chat/completions", json=body | {"stream": False, "max_tokens": 4},
                      timeout=httpx.Timeout(10.0, read=0.5))  # fmt: skip
        wait_until(lambda: sample("tactic_waiting_requests") == 0)
        assert sample("tactic_running_requests") == 4  # the long ones go on
    wait_until(lambda: sample("tactic_running_requests") == 0
               and sample("tactic_kv_cache_usage_ratio") == 0)  # fmt: skip
    wait_until(lambda: sample("tactic_requests_total", status="499") - left_before == 5)
