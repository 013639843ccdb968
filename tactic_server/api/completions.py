"""How one completion runs on the engine: the engine request built from a validated body, then
either the whole answer or OpenAI's server-sent-event stream of it. Chat and text completions
differ only in the objects they send, so each has a format class with the same five methods."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

import anyio
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.datastructures import State

from tactic_server.engine.types import (
    GenerationOutput,
    GenerationRequest,
    SamplingParams,
    TacticParams,
)

from .errors import CLIENT_CLOSED_REQUEST, APIError, unexpected_error
from .metrics import RequestTracker
from .schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatResponseMessage,
    Completion,
    CompletionChoice,
    GenerationFields,
    TacticUsageReport,
    Usage,
)

logger = logging.getLogger(__name__)



def generation_request(
    body: GenerationFields,
    request_id: str,
    prompt_token_ids: list[int],
    max_model_len: int,
    default_target: float,
    default_max_tokens: int,
) -> GenerationRequest:
    """A request without max_tokens gets its route's default (16 for text completions, as
    OpenAI documents it), else the server's, and never more than the context leaves; a request
    that asks for more than fits is refused by the engine (413)."""
    max_tokens = body.token_limit
    if max_tokens is None:
        default = body.route_max_tokens or default_max_tokens
        max_tokens = max(1, min(default, max_model_len - len(prompt_token_ids)))
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=body.stop_strings,
        ignore_eos=body.ignore_eos,
    )
    target = body.tactic_target()
    tactic = TacticParams(body.tactic_enabled(), default_target if target is None else target)
    return GenerationRequest(request_id, tuple(prompt_token_ids), sampling, tactic)


class EngineCall:
    """One request on the engine from its first output on. `start` waits for that output, so the
    engine's refusals (queue full, prompt too long) surface before any response is sent. However
    the call ends (finished, client gone, error), the engine's stream is closed, which aborts the
    request and frees its KV."""

    def __init__(
        self,
        outputs: AsyncIterator[GenerationOutput],
        first: GenerationOutput,
        tracker: RequestTracker,
    ) -> None:
        self._outputs = outputs
        self._first = first
        self._tracker = tracker

    @classmethod
    async def start(cls, engine, request: GenerationRequest, tracker: RequestTracker) -> EngineCall:
        outputs = engine.generate(request)
        try:
            first = await anext(outputs)
        except BaseException:
            await _close(outputs)
            raise
        return cls(outputs, first, tracker)

    async def outputs(self) -> AsyncIterator[GenerationOutput]:
        """The request's outputs; one that failed ("error", "abort") raises APIError."""
        last = self._first
        try:
            while True:
                self._tracker.on_output(last)
                if last.finish_reason in ("error", "abort"):
                    logger.warning(
                        "%s ended with %s: %s", last.request_id, last.finish_reason, last.error
                    )
                    raise APIError(
                        500,
                        # what failed stays in the log, under the request's id: exception text
                        # can carry internals (paths, shapes, other requests' state)
                        f"generation failed (request {last.request_id}; the server log has why)",
                        code="generation_failed",
                    )
                yield last
                if last.finish_reason is not None:
                    return
                last = await anext(self._outputs)
        finally:
            await _close(self._outputs)
            self._tracker.finish(last)


async def _close(outputs: AsyncIterator[GenerationOutput]) -> None:
    # shielded: this runs while the request's task is being cancelled (the client left)
    with anyio.CancelScope(shield=True):
        await outputs.aclose()


def usage(output: GenerationOutput) -> Usage:
    tactic = output.tactic
    return Usage(
        prompt_tokens=output.prompt_tokens,
        completion_tokens=output.completion_tokens,
        total_tokens=output.prompt_tokens + output.completion_tokens,
        tactic=None if tactic is None else TacticUsageReport(**dataclasses.asdict(tactic)),
    )


@dataclass(frozen=True)
class ChatFormat:
    id: str
    created: int
    model: str

    def response(self, text: str, finish_reason: str, usage: Usage) -> ChatCompletion:
        choice = ChatChoice(message=ChatResponseMessage(content=text), finish_reason=finish_reason)
        return ChatCompletion(
            id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage
        )

    def opening_chunk(self) -> ChatCompletionChunk | None:
        return self._chunk(ChatDelta(role="assistant", content=""))

    def delta_chunk(self, text: str) -> ChatCompletionChunk:
        return self._chunk(ChatDelta(content=text))

    def closing_chunk(self, finish_reason: str) -> ChatCompletionChunk:
        return self._chunk(ChatDelta(), finish_reason)

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )

    def _chunk(self, delta: ChatDelta, finish_reason: str | None = None) -> ChatCompletionChunk:
        choice = ChatChunkChoice(delta=delta, finish_reason=finish_reason)
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[choice]
        )


@dataclass(frozen=True)
class TextFormat:
    id: str
    created: int
    model: str

    def response(self, text: str, finish_reason: str, usage: Usage) -> Completion:
        return self._completion(text, finish_reason, usage)

    def opening_chunk(self) -> Completion | None:
        return None

    def delta_chunk(self, text: str) -> Completion:
        return self._completion(text, None)

    def closing_chunk(self, finish_reason: str) -> Completion:
        return self._completion("", finish_reason)

    def usage_chunk(self, usage: Usage) -> Completion:
        return Completion(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )

    def _completion(
        self, text: str, finish_reason: str | None, usage: Usage | None = None
    ) -> Completion:
        choice = CompletionChoice(text=text, finish_reason=finish_reason)
        return Completion(
            id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage
        )


class ClientLeft(Exception):
    """The client disconnected before its answer was ready."""


async def unless_client_leaves(request: Request, awaitable):
    """awaitable's result, or ClientLeft as soon as the client disconnects; the awaitable is
    then cancelled, which closes its engine stream and so aborts the engine request (queued or
    running) and frees what it held."""
    work = asyncio.ensure_future(awaitable)
    client_left = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait((work, client_left), return_when=asyncio.FIRST_COMPLETED)
    finally:
        client_left.cancel()
        if not work.done():
            work.cancel()
    if work in done:
        return work.result()
    raise ClientLeft


async def complete(
    call: EngineCall, format: ChatFormat | TextFormat, request: Request
) -> BaseModel | Response:
    """The whole answer; generation stops if the client disconnects while waiting for it."""
    try:
        return await unless_client_leaves(request, _collect(call, format))
    except ClientLeft:
        return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _collect(call: EngineCall, format: ChatFormat | TextFormat) -> BaseModel:
    pieces: list[str] = []
    async with aclosing(call.outputs()) as outputs:
        async for output in outputs:
            pieces.append(output.text)
            last = output
    return format.response("".join(pieces), last.finish_reason, usage(last))


async def _disconnected(request: Request) -> None:
    # the body has been read, so the next message is the disconnect (or the end of the response)
    while (await request.receive())["type"] != "http.disconnect":
        pass


def stream(
    call: EngineCall, format: ChatFormat | TextFormat, include_usage: bool, state: State
) -> StreamingResponse:
    """Server-sent events as OpenAI sends them: an opening chunk (chat: the role), one chunk per
    piece of text, a closing chunk with finish_reason, the usage chunk if asked for, [DONE].
    A failure after the response started becomes an error event; the route's status for the
    request counter goes to `state.status`."""

    async def events() -> AsyncIterator[str]:
        try:
            if (opening := format.opening_chunk()) is not None:
                yield _event(opening)
            async with aclosing(call.outputs()) as outputs:
                async for output in outputs:
                    if output.text:
                        yield _event(format.delta_chunk(output.text))
                    last = output
            yield _event(format.closing_chunk(last.finish_reason))
            if include_usage:
                yield _event(format.usage_chunk(usage(last)))
            yield "data: [DONE]\n\n"
        except anyio.get_cancelled_exc_class():
            state.status = str(CLIENT_CLOSED_REQUEST)
            raise
        except Exception as exc:  # the status line is sent: the client gets an error event
            error = exc if isinstance(exc, APIError) else unexpected_error(format.id, exc)
            state.status = str(error.status)
            yield f"data: {json.dumps(error.body())}\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def _event(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"
