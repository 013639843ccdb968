"""The uvicorn server in front of the app, with the connection limits a production server keeps:
a deadline on each request's head (slow or silent clients: 408, or closed where nothing came),
uvicorn's keep-alive timeout and connection limit (503 with the error object beyond it), and a
drain period on SIGTERM after which the app ends what is still running with an error (a 503, or
an error event and [DONE] in a stream) instead of cutting connections. The body's own deadline
is the app's (limits.BodyLimits: 408)."""

from __future__ import annotations

import asyncio
import functools
import json
import socket
from dataclasses import dataclass

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import RETRY_AFTER_SECONDS, APIError, error_response

# after the drain period, the time the app's error answers get to go out before uvicorn cancels
ANSWER_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class ServerSettings:
    """Seconds and counts. header_timeout: from a connection's start, or its previous response,
    to a complete request head; keep_alive_timeout: an idle connection after a response;
    max_connections: connections and requests at once (uvicorn's limit_concurrency; beyond it,
    503 server_overloaded); drain_seconds: how long requests in flight may run on after SIGTERM
    (Kubernetes allows 30 s by default)."""

    header_timeout: float = 10.0
    keep_alive_timeout: float = 5.0
    max_connections: int = 512
    drain_seconds: float = 25.0

    def __post_init__(self) -> None:
        if min(self.header_timeout, self.keep_alive_timeout) <= 0 or self.drain_seconds < 0:
            raise ValueError("timeouts must be positive and drain_seconds at least 0")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")


OVERLOADED = error_response(APIError(
    503, "the server has as many connections or requests as it accepts; retry later",
    code="server_overloaded",
    headers={"Retry-After": str(RETRY_AFTER_SECONDS), "Connection": "close"},
))  # fmt: skip


class H11WithLimits(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with two answers of its own in OpenAI's error object:

    - beyond the connection limit, 503 `server_overloaded` with Retry-After (uvicorn's is plain
      text). uvicorn decides at the request head, reading `self.app` right after its own check;
      this class takes the check over: with its limit unset, reading `app` makes uvicorn's test
      (connections or requests at the limit) and gives OVERLOADED instead of the app;
    - a connection whose request head has not arrived header_timeout seconds after it opened or
      its previous response ended is answered 408 `request_timeout` and closed where part of a
      head came, closed silently where nothing did, as nginx closes it (uvicorn alone waits
      forever for a client that sends nothing, or a byte at a time)."""

    def __init__(self, *args, header_timeout: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_connections, self.limit_concurrency = self.limit_concurrency, None
        self.header_timeout = header_timeout
        self.header_deadline: asyncio.TimerHandle | None = None

    @property
    def app(self):
        limit = self.max_connections
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            self.logger.warning("over the connection limit: 503")
            return OVERLOADED
        return self._app

    @app.setter
    def app(self, app) -> None:
        self._app = app

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._await_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
        super().connection_lost(exc)

    def _await_head(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
        self.header_deadline = self.loop.call_later(self.header_timeout, self._head_overdue)

    def _head_overdue(self) -> None:
        # IDLE: h11 has not seen a complete request head since the deadline was set; what it
        # holds of one waits in its buffer
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        partial_head, _ = self.conn.trailing_data
        if partial_head:
            self.logger.info("answering 408 to a request head that did not arrive in time")
            self._send_request_timeout(len(partial_head))
        else:
            self.logger.info("closing a connection that sent nothing in time")
        self.transport.close()

    def _send_request_timeout(self, received: int) -> None:
        error = APIError(408, f"the request head did not arrive within {self.header_timeout:g} s "
                              f"({received} bytes came)", code="request_timeout")  # fmt: skip
        body = json.dumps(error.body()).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                   ("Connection", "close")]  # fmt: skip
        # h11 lets a server answer before a request head (for exactly this)
        for event in (h11.Response(status_code=408, headers=headers, reason=b"Request Timeout"),
                      h11.Data(data=body), h11.EndOfMessage()):  # fmt: skip
            self.transport.write(self.conn.send(event))


class Server(uvicorn.Server):
    """On SIGTERM uvicorn stops accepting and waits for requests in flight; after
    drain_seconds, the app's `end_requests` ends those still running."""

    def __init__(self, config: uvicorn.Config, drain_seconds: float, end_requests) -> None:
        super().__init__(config)
        self.drain_seconds = drain_seconds
        self.end_requests = end_requests

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        ending = asyncio.get_running_loop().call_later(self.drain_seconds, self.end_requests)
        try:
            await super().shutdown(sockets)
        finally:
            ending.cancel()


def make_server(app: FastAPI, settings: ServerSettings, **uvicorn_options) -> Server:
    """A server for `app` (made by create_app); uvicorn_options: host, port, log_level, ..."""
    config = uvicorn.Config(
        app,
        http=functools.partial(H11WithLimits, header_timeout=settings.header_timeout),
        timeout_keep_alive=settings.keep_alive_timeout,
        limit_concurrency=settings.max_connections,
        timeout_graceful_shutdown=settings.drain_seconds + ANSWER_GRACE_SECONDS,
        **uvicorn_options,
    )
    return Server(config, settings.drain_seconds, app.state.in_flight.end_all)
