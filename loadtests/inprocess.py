"""A server in this process: uvicorn on a free local port in a background thread, for tests and
for load runs that bring their own embedded engine."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from tactic_server.api.server import ServerSettings, make_server


@contextmanager
def serving(app, settings: ServerSettings | None = None) -> Iterator[str]:
    """Serve `app` (made by create_app) on 127.0.0.1 (a free port) as `tactic-server serve`
    serves it (settings None: its defaults); yields its URL and stops the server after."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = make_server(app, settings or ServerSettings(), log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        listener.close()


def free_port() -> int:
    """A TCP port nobody listens on now (for a server started in another process)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url: str, process=None, timeout: float = 120.0) -> None:
    """Until GET url answers 200; fails if `process` (a Popen) exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        assert process is None or process.poll() is None, "the server exited"
        assert time.monotonic() < deadline, f"{url} did not answer 200 in {timeout:.0f} s"
        try:
            if httpx.get(url).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
