"""Every error leaves the server as OpenAI's error object, {"error": {"message", "type", "param",
"code"}}, with one status per cause:

  400  malformed JSON and every invalid field (OpenAI answers 400 for both, and its clients raise
       BadRequestError on it; FastAPI's default 422 is not used), a parameter the server does not
       implement (echo, best_of > 1, tools, ...: named in `param`), more messages than the limit,
       max_tokens alone beyond the model's context, a logit_bias token outside the vocabulary
  401  missing or wrong API key
  404  unknown model or route
  408  request body still arriving when its deadline passed; part of a request head came but
       not all of it within the header timeout (server.H11WithLimits; a connection that sent
       nothing is closed without an answer)
  413  request body over the byte limit; a prompt (checked by its length before tokenising, then
       by its tokens) or prompt plus max_tokens beyond the model's context
  429  engine queue full (with Retry-After)
  500  anything unexpected (the message carries an id that is also in the log; the server goes on)
  503  model still loading, the server stopped before the request finished, or more connections
       or requests than --max-connections (server_overloaded, answered by server.H11WithLimits
       in uvicorn's place); all with Retry-After
A stream that fails after its 200 ends with the error object as an event, then [DONE].
"""

from __future__ import annotations

import logging
import os
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tactic_server.engine.types import PromptTooLong, QueueFull

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1

_TYPE_BY_STATUS = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer


def error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return _TYPE_BY_STATUS.get(status, "invalid_request_error")


class APIError(Exception):
    """An error the handlers answer with its status and OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": error_type(self.status),
                "param": self.param,
                "code": self.code,
            }
        }


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _validation_error(exc: RequestValidationError) -> APIError:
    problems = exc.errors()
    if any(problem["type"] == "json_invalid" for problem in problems):
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    # loc starts with where the value came from ("body"); the rest is the parameter's path
    paths = [[str(part) for part in problem["loc"][1:]] for problem in problems]
    message = "; ".join(
        f"{'.'.join(path)}: {problem['msg']}" if path else problem["msg"]
        for path, problem in zip(paths, problems, strict=True)
    )
    # a value matching no member of a union fails once per member, each path ending in the
    # member's type name: name the parameter they share
    shared = os.path.commonprefix(paths) or paths[0]
    return APIError(400, message, param=".".join(shared) or None, code=problems[0]["type"])


def unexpected_error(where: str, exc: Exception) -> APIError:
    """A 500 whose message names an id; the traceback is logged under the same id."""
    error_id = uuid.uuid4().hex
    logger.error("unexpected error %s in %s", error_id, where, exc_info=exc)
    return APIError(500, f"internal server error (id {error_id})", code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(APIError(exc.status_code, str(exc.detail), headers=exc.headers))

    async def on_queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        message = str(exc) or "the server is at capacity; retry later"
        retry = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        return error_response(APIError(429, message, code="queue_full", headers=retry))

    async def on_prompt_too_long(request: Request, exc: PromptTooLong) -> JSONResponse:
        message = str(exc) or "the prompt plus max_tokens does not fit the model's context"
        return error_response(APIError(413, message, code="context_length_exceeded"))

    async def on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(unexpected_error(f"{request.method} {request.url.path}", exc))

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(QueueFull, on_queue_full)
    app.add_exception_handler(PromptTooLong, on_prompt_too_long)
    app.add_exception_handler(Exception, on_unexpected_error)
