"""`tactic-server serve` as a process, as the README starts it: without --model and with nothing
pulled it serves the bundled model; started with `--model tactic-code-13m` as the README's
pass-key examples say, it answers them as the README says; on SIGTERM it finishes the request
in flight, then exits 0."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from loadtests.inprocess import free_port, wait_for


def test_sigterm_drains_the_stream_in_flight_and_exits_zero(tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "tactic_server.cli", "serve", "--port", str(port)],
            stderr=sink, env=os.environ | {"TACTIC_SERVER_CACHE": str(tmp_path)},
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/ready", process)
        body = {"messages": [{"role": "user", "content": "Tell me a story."}], "stream": True,
                "max_tokens": 200, "ignore_eos": True}  # fmt: skip
        events = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as reply:
            lines = reply.iter_lines()
            events.append(next(line for line in lines if line.startswith("data:")))
            threading.Timer(0.05, process.send_signal, (signal.SIGTERM,)).start()
            events.extend(line for line in lines if line.startswith("data:"))
        assert events[-1] == "data: [DONE]"  # the stream ran to its end after SIGTERM
        assert sum('"content"' in event for event in events) >= 100
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert "gemma-3-270m is not pulled" in log.read_text()  # an empty cache: the bundled model
    assert "serving the bundled tactic-code-13m" in log.read_text()


README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def readme_block(language: str, containing: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)
    return next(block for block in blocks if containing in block)


def test_the_readme_examples_find_the_pass_key(tmp_path):
    """The first two requests a newcomer sends, copied from the README: the curl body and the
    openai snippet, run as they stand against `tactic-server serve` on the bundled model."""
    openai = pytest.importorskip("openai")
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "tactic_server.cli", "serve", "--model", "tactic-code-13m",
             "--port", str(port)],
            stderr=sink, env=os.environ | {"TACTIC_SERVER_CACHE": str(tmp_path)},
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/ready", process)
        curl = readme_block("bash", "/v1/completions")
        body = json.loads(re.search(r"-d '(.*?)'\n", curl, flags=re.S).group(1))
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        assert reply["choices"][0]["text"] == " 58213"
        assert reply["choices"][0]["finish_reason"] == "stop"
        assert 0 < reply["usage"]["tactic"]["selected_ratio"] < 1

        snippet = readme_block("python", "OpenAI(")
        scope = {"OpenAI": openai.OpenAI, "print": lambda *values: None}
        exec(snippet.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace(
            "from openai import OpenAI\n", ""), scope)  # fmt: skip
        reply = scope["reply"]
        assert reply.choices[0].text == " 58213"
        assert reply.usage.prompt_tokens > 7000  # a long prompt, of which Tactic reads a part
        assert reply.usage.tactic["selected_ratio"] < 0.6

        # without max_tokens: OpenAI's 16 for text completions (ignore_eos: exactly that many)
        short = {"prompt": "import numpy as np\n", "ignore_eos": True}
        reply = httpx.post(f"{url}/v1/completions", json=short, timeout=60).json()
        assert reply["usage"]["completion_tokens"] == 16
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert "loading " in log.read_text() and "tactic-code-13m" in log.read_text()
