"""`tactic-server serve` as a process, as the README starts it: serves the bundled default model,
and on SIGTERM finishes the request in flight, then exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import httpx

from loadtests.inprocess import free_port, wait_for


def test_sigterm_drains_the_stream_in_flight_and_exits_zero(tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tactic_server.cli", "serve", "--port", str(port)],
        env=os.environ | {"TACTIC_SERVER_CACHE": str(tmp_path)},
    )
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
