"""Request bodies over a byte limit are refused with 413 before anything parses them: at once when
Content-Length declares too much, else as soon as a streamed (chunked) body passes the limit."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError, error_response

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024  # about 2M tokens of JSON-escaped text


class BodySizeLimit:
    """ASGI middleware: reads the whole body (it is parsed in one piece anyway), counting, then
    hands it to the app; the connection's later messages (disconnect) pass through."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._refuse(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # nobody is left to answer
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(
            413, f"request body exceeds {self.max_body_bytes} bytes", code="request_too_large"
        )
        await error_response(error)(scope, receive, send)
