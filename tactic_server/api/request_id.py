"""Every response carries X-Request-Id: the client's own, when it sent a sane one (a proxy's or a
tracer's, up to 128 of [A-Za-z0-9._-]), else the server's id of the request, with which its
completion's id ends and its log lines are named. The server's id is always new, since clients
may repeat theirs."""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
_SANE = re.compile(rb"[A-Za-z0-9._-]{1,128}")


class RequestId:
    """ASGI middleware: a new id into scope["state"]["request_id"], the header onto the
    response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(HEADER, b"")
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        header = given if _SANE.fullmatch(given) else request_id.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
                message = message | {"headers": [*headers, (HEADER, header)]}
            await send(message)

        await self.app(scope, receive, send_with_id)
