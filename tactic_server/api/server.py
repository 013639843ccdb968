"""The uvicorn server in front of the app, with the connection limits a production server keeps:
a deadline on each request's head (slow or silent clients), uvicorn's keep-alive timeout and
connection limit, and a drain period on SIGTERM after which the app ends what is still running
with an error (a 503, or an error event and [DONE] in a stream) instead of cutting connections.
The body's own deadline is the app's (limits.BodyLimits: 408)."""

from __future__ import annotations

import asyncio
import functools
import socket
from dataclasses import dataclass

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

# after the drain period, the time the app's error answers get to go out before uvicorn cancels
ANSWER_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class ServerSettings:
    """Seconds and counts. header_timeout: from a connection's start, or its previous response,
    to a complete request head; keep_alive_timeout: an idle connection after a response;
    max_connections: connections and requests at once (uvicorn's limit_concurrency; beyond it,
    503); drain_seconds: how long requests in flight may run on after SIGTERM (Kubernetes
    allows 30 s by default)."""

    header_timeout: float = 10.0
    keep_alive_timeout: float = 5.0
    max_connections: int = 512
    drain_seconds: float = 25.0

    def __post_init__(self) -> None:
        if min(self.header_timeout, self.keep_alive_timeout) <= 0 or self.drain_seconds < 0:
            raise ValueError("timeouts must be positive and drain_seconds at least 0")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")


class H11WithHeaderTimeout(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request head has not arrived
    header_timeout seconds after the connection opened or its previous response ended (uvicorn
    alone waits forever for a client that sends nothing, or a byte at a time)."""

    def __init__(self, *args, header_timeout: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.header_deadline: asyncio.TimerHandle | None = None

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
        # IDLE: h11 has not seen a complete request head since the deadline was set
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.info("closing a connection whose request head did not arrive in time")
            self.transport.close()


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
        http=functools.partial(H11WithHeaderTimeout, header_timeout=settings.header_timeout),
        timeout_keep_alive=settings.keep_alive_timeout,
        limit_concurrency=settings.max_connections,
        timeout_graceful_shutdown=settings.drain_seconds + ANSWER_GRACE_SECONDS,
        **uvicorn_options,
    )
    return Server(config, settings.drain_seconds, app.state.in_flight.end_all)
