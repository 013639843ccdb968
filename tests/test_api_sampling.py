"""OpenAI's sampling parameters over a real socket (the `openai` client against a uvicorn server
in front of the embedded engine on a tiny model): logprobs in chat and text-completion form,
streamed too, against a plain-torch log_softmax of transformers' logits on the same checkpoint;
logit_bias banning and forcing tokens; penalties breaking a greedy repetition, without touching a
request decoded in the same steps; and the parameters the server does not implement refused with
a 400 that names them."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import httpx
import pytest
import torch

from loadtests.inprocess import serving
from tactic_server.api import create_app
from tactic_server.api.logprobs import TokenText
from tactic_server.engine.config import EngineConfig
from tactic_server.engine.engine import Engine
from tactic_server.tactic.config import TacticConfig
from tactic_server.testing.tiny_model import make_tiny_model

openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")

MAX_MODEL_LEN = 512
DENSE = {"tactic": {"enabled": False}}  # transformers' attention reads every token
PROMPT = "def add(a, b):\n    return"
REPEATING = "import numpy as np\n"  # greedy, the tiny model says "ame" five times in 24 tokens
TOP = 3
REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def engine(model_dir):
    config = EngineConfig(model_dir=str(model_dir), max_model_len=MAX_MODEL_LEN,
                          tactic=TacticConfig(segment_size=64, cluster_size=8))  # fmt: skip
    engine = Engine.from_config(config)
    yield engine
    asyncio.run(engine.shutdown())


@pytest.fixture(scope="module")
def url(engine):
    with serving(create_app(engine)) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def reference(model_dir):
    """Greedy continuation and log_softmax of transformers' float32 logits at each new token."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def continue_greedily(prompt_ids: list[int], new_tokens: int, banned_first: int | None = None):
        ids, steps = list(prompt_ids), []
        with torch.no_grad():
            for step in range(new_tokens):
                logits = model(torch.tensor([ids])).logits[0, -1].double()
                logprobs = torch.log_softmax(logits, dim=-1)
                choosing = logprobs.clone()
                if step == 0 and banned_first is not None:
                    choosing[banned_first] = float("-inf")
                token = int(choosing.argmax())
                steps.append((token, logprobs))
                ids.append(token)
        return steps

    return continue_greedily


def chat_prompt_ids(engine, content: str) -> list[int]:
    tokenizer = engine.tokenizer
    messages = [{"role": "user", "content": content}]
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def text_prompt_ids(engine, prompt: str) -> list[int]:
    return engine.tokenizer.encode(prompt, add_special_tokens=True)


def token_text(engine, token_id: int) -> str:
    return engine.tokenizer.decode([token_id])


def test_chat_logprobs_are_the_models_log_softmax_streamed_or_not(client, engine, reference):
    options = dict(model=engine.model_name, messages=[{"role": "user", "content": PROMPT}],
                   max_tokens=6, temperature=0, logprobs=True, top_logprobs=TOP,
                   extra_body=DENSE | {"ignore_eos": True})  # fmt: skip
    reply = client.chat.completions.create(**options)
    content = reply.choices[0].logprobs.content
    expected = reference(chat_prompt_ids(engine, PROMPT), 6)
    assert len(content) == 6
    for entry, (token, logprobs) in zip(content, expected, strict=True):
        assert entry.token == bytes(entry.bytes).decode("utf-8", errors="replace")
        if REPLACEMENT not in token_text(engine, token):  # else the token is part of a character
            assert entry.token == token_text(engine, token)
        assert entry.logprob == pytest.approx(float(logprobs[token]), abs=1e-4)
        top = torch.topk(logprobs, TOP)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(),
                                                                        abs=1e-4)  # fmt: skip
        assert len(entry.top_logprobs) == TOP

    streamed = [entry for chunk in client.chat.completions.create(**options, stream=True)
                if chunk.choices and chunk.choices[0].logprobs
                for entry in chunk.choices[0].logprobs.content]  # fmt: skip
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def test_completion_logprobs_have_openais_parallel_lists_streamed_or_not(
    client, engine, reference
):
    options = dict(model=engine.model_name, prompt=PROMPT, max_tokens=6, temperature=0,
                   logprobs=2, extra_body=DENSE | {"ignore_eos": True})  # fmt: skip
    choice = client.completions.create(**options).choices[0]
    logprobs = choice.logprobs
    expected = reference(text_prompt_ids(engine, PROMPT), 6)
    clean = [token_text(engine, token) for token, _ in expected]
    assert [t for t, c in zip(logprobs.tokens, clean, strict=True) if REPLACEMENT not in c] == [
        c for c in clean if REPLACEMENT not in c]  # fmt: skip
    assert logprobs.token_logprobs == pytest.approx(
        [float(lp[token]) for token, lp in expected], abs=1e-4)  # fmt: skip
    for alternatives, (_, lp) in zip(logprobs.top_logprobs, expected, strict=True):
        top = torch.topk(lp, 2)
        assert sorted(alternatives.values(), reverse=True) == pytest.approx(top.values.tolist(),
                                                                            abs=1e-4)  # fmt: skip
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(6)]

    chunks = [chunk.choices[0] for chunk in client.completions.create(**options, stream=True)
              if chunk.choices and chunk.choices[0].logprobs]  # fmt: skip
    assert [t for c in chunks for t in c.logprobs.tokens] == logprobs.tokens
    assert [o for c in chunks for o in c.logprobs.text_offset] == logprobs.text_offset


def test_a_tokens_bytes_are_its_share_of_the_text(engine):
    """Byte-level tokens may each hold part of a character; their bytes join to the text."""
    text = "naïve café — ünïcode ✓ 漢字"
    tokens = TokenText(engine.tokenizer)
    ids = engine.tokenizer.encode(text)
    assert b"".join(tokens.bytes(token) for token in ids) == text.encode()
    assert any(REPLACEMENT in tokens.text(token) for token in ids)  # some hold part of one


def test_logit_bias_bans_and_forces_tokens(client, engine, reference):
    prompt_ids = text_prompt_ids(engine, PROMPT)
    greedy_first = reference(prompt_ids, 1)[0][0]
    options = dict(model=engine.model_name, prompt=PROMPT, max_tokens=4, temperature=0,
                   logprobs=0, extra_body=DENSE | {"ignore_eos": True})  # fmt: skip

    banned = client.completions.create(**options, logit_bias={str(greedy_first): -100})
    runner_up = reference(prompt_ids, 1, banned_first=greedy_first)[0][0]
    assert banned.choices[0].logprobs.tokens[0] == token_text(engine, runner_up)
    assert runner_up != greedy_first

    forced_token = engine.tokenizer.encode(" return")[0]
    forced = client.completions.create(**options, logit_bias={str(forced_token): 100})
    logprobs = forced.choices[0].logprobs
    assert logprobs.tokens == [token_text(engine, forced_token)] * 4
    # the logprobs are the model's own, not those of the biased distribution (which are ~0)
    assert logprobs.token_logprobs[0] == pytest.approx(
        float(reference(prompt_ids, 1)[0][1][forced_token]), abs=1e-4)  # fmt: skip


def test_penalties_break_a_greedy_repetition_and_leave_a_batch_neighbour_alone(
    url, client, engine
):
    options = dict(model=engine.model_name, prompt=REPEATING, max_tokens=24, temperature=0,
                   logprobs=0, extra_body=DENSE | {"ignore_eos": True})  # fmt: skip

    def tokens(**extra) -> list[str]:
        return client.completions.create(**(options | extra)).choices[0].logprobs.tokens

    plain = tokens()
    repeated, times = Counter(plain).most_common(1)[0]
    assert times >= 4  # the tiny model repeats itself when greedy
    for penalty in ("frequency_penalty", "presence_penalty"):
        penalised = tokens(**{penalty: 2.0})
        assert penalised.count(repeated) < times, penalty
        if penalty == "presence_penalty":  # once is all it may say it without paying
            assert penalised.count(repeated) <= 2
    rewarded = tokens(frequency_penalty=-2.0)  # a negative penalty rewards repetition
    assert Counter(rewarded).most_common(1)[0][1] > times

    # a penalised and biased request streams while a plain one runs to its end in its steps
    neighbour = {"model": engine.model_name, "prompt": REPEATING, "max_tokens": 400,
                 "ignore_eos": True, "stream": True, "frequency_penalty": 2.0,
                 "presence_penalty": 2.0, "logit_bias": {"7": 50}}  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/completions", json=neighbour, timeout=60) as stream:
        events = (line for line in stream.iter_lines() if line.startswith("data: "))
        assert '"text"' in next(events)
        alongside = tokens()
        assert all('"text"' in next(events) for _ in range(2))  # it is still going
    assert alongside == plain


def test_concurrent_requests_keep_their_own_logprobs(client, engine):
    """Eight requests at once, each with its own number of alternatives: each gets its own."""
    replies = {}

    def ask(top: int) -> None:
        replies[top] = client.chat.completions.create(
            model=engine.model_name, messages=[{"role": "user", "content": PROMPT}],
            max_tokens=5, temperature=0, logprobs=True, top_logprobs=top,
        )  # fmt: skip

    threads = [threading.Thread(target=ask, args=(top,)) for top in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for top, reply in replies.items():
        assert all(len(entry.top_logprobs) == top for entry in reply.choices[0].logprobs.content)
    assert len(replies) == 8


@pytest.mark.parametrize(
    ("route", "change", "param"),
    [
        ("completions", {"echo": True}, "echo"),
        ("completions", {"best_of": 2}, "best_of"),
        ("completions", {"logprobs": 21}, "logprobs"),
        ("chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
        ("chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]},
         "tools"),
        ("chat/completions", {"tool_choice": "auto"}, "tool_choice"),
        ("chat/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
        ("chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("chat/completions", {"logit_bias": {"999999": 5}}, "logit_bias"),
        ("chat/completions", {"logit_bias": {"hello": 5}}, "logit_bias"),
        ("chat/completions", {"logit_bias": {"3": 101}}, "logit_bias"),
        ("completions", {"presence_penalty": 2.5}, "presence_penalty"),
    ],
)  # fmt: skip
def test_parameters_not_honoured_are_refused_naming_them(url, engine, route, change, param):
    body = {"prompt": PROMPT} if route == "completions" else {
        "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
    reply = httpx.post(f"{url}/v1/{route}", json=body | {"max_tokens": 2} | change, timeout=60)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"].split(".")[0] == param and param in error["message"]
    assert error["type"] == "invalid_request_error"
    assert engine.stats().kv_slots_in_use == 0


def test_the_accepted_forms_of_those_parameters_are_served(client, engine):
    reply = client.chat.completions.create(
        model=engine.model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
        response_format={"type": "text"}, tool_choice="none", stream=False,
    )  # fmt: skip
    assert reply.choices[0].logprobs is None
    assert client.completions.create(model=engine.model_name, prompt="x", max_tokens=2,
                                     best_of=1, echo=False).choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(
            model=engine.model_name, messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": {"name": "lookup"}}],
        )  # fmt: skip
