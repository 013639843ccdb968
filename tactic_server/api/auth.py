"""Optional API key: every /v1 route then needs `Authorization: Bearer <key>`; probes and
/metrics stay open so that Kubernetes and Prometheus need no secret."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import Request

from .errors import APIError


def require_api_key(api_key: str) -> Callable[[Request], Awaitable[None]]:
    """A dependency refusing requests without the key (401); compared in constant time."""
    expected = api_key.encode()

    async def check(request: Request) -> None:
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        # header values arrive decoded as latin-1; compare the bytes that were sent
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            presented.strip().encode("latin-1"), expected
        ):
            raise APIError(
                401,
                "missing or invalid API key (send Authorization: Bearer <key>)",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check
