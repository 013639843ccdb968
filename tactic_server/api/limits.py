"""What one request may cost the server before anything parses it: its body's bytes and the time
the body may take to arrive; and, as it is parsed (schemas.chat_request_model), its number of
messages. A body over the byte limit is refused with 413 when Content-Length declares too much,
or as soon as a chunked body passes the limit, once the rest of it (64 MiB and 5 s at most) has
been read and dropped unparsed, so that a client still sending reads the answer instead of a
reset connection; one that is still arriving when its time is up, with 408."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError, error_response

DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024  # 350k characters even in JSON's \u escapes
# What is read (and dropped) of a body refused for its size before the answer goes out: a client
# still sending would otherwise find the connection reset before it reads the 413 (nginx's
# lingering close does the same). Past either bound the answer goes out at once.
LINGER_BYTES = 64 * 1024 * 1024
LINGER_SECONDS = 5.0


@dataclass(frozen=True)
class RequestLimits:
    """max_body_bytes bounds the JSON parsed on the event loop (a few MiB of tiny objects take
    a tenth of a second); body_timeout (seconds) is the time from the request's headers to the
    end of its body; max_messages is OpenAI's own limit of a chat request (2,048)."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout: float = 30.0
    max_messages: int = 2048

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1 or self.body_timeout <= 0 or self.max_messages < 1:
            raise ValueError("request limits must be positive")


class BodyLimits:
    """ASGI middleware: reads the whole body (it is parsed in one piece anyway), counting bytes
    against the limit and time against the deadline, then hands it to the app; the connection's
    later messages (disconnect) pass through."""

    def __init__(self, app: ASGIApp, limits: RequestLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            if int(declared) <= LINGER_BYTES:
                await self._discard_rest(receive)
            await self._too_large(scope, receive, send)
            return
        body = bytearray()
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # nobody is left to answer
                    body += message.get("body", b"")
                    if len(body) > limit:
                        if message.get("more_body", False):
                            await self._discard_rest(receive)
                        await self._too_large(scope, receive, send)
                        return
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            message = (f"the request body did not arrive within {self.limits.body_timeout:g} s "
                       f"({len(body)} bytes came)")  # fmt: skip
            await self._refuse(408, message, "request_timeout", scope, receive, send)
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    async def _discard_rest(receive: Receive) -> None:
        """Reads and drops the rest of a refused body, LINGER_BYTES and LINGER_SECONDS at most
        (no parsing: what it costs is the bytes' arrival)."""
        dropped = 0
        try:
            async with asyncio.timeout(LINGER_SECONDS):
                while dropped <= LINGER_BYTES:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    dropped += len(message.get("body", b""))
                    if not message.get("more_body", False):
                        return
        except TimeoutError:
            return

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        """413: the body is (or was declared) over the byte limit."""
        await self._refuse(413, f"request body exceeds {self.limits.max_body_bytes} bytes",
                           "request_too_large", scope, receive, send)  # fmt: skip

    async def _refuse(self, status: int, message: str, code: str, scope: Scope,
                      receive: Receive, send: Send) -> None:  # fmt: skip
        # what remains of the body is not read (past the lingering bounds): the connection
        # cannot carry another request
        error = APIError(status, message, code=code, headers={"Connection": "close"})
        await error_response(error)(scope, receive, send)
