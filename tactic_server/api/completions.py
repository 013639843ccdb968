"""How one completion runs on the engine: the engine request built from a validated body, then
either the whole answer or OpenAI's server-sent-event stream of it. Chat and text completions
differ only in the objects they send, so each has a format class with the same five methods;
logprobs, when asked for, travel in the answer and in each text chunk."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING

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
    TokenLogprob,
)

from .errors import CLIENT_CLOSED_REQUEST, RETRY_AFTER_SECONDS, APIError, unexpected_error
from .logprobs import TokenText, chat_logprobs, completion_logprobs
from .metrics import RequestTracker
from .schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    GenerationFields,
    TacticUsageReport,
    Usage,
)

if TYPE_CHECKING:
    from tactic_server.engine.types import InferenceEngine

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
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=body.token_bias,
        logprobs=body.logprobs_wanted,
    )
    target = body.tactic_target()
    tactic = TacticParams(body.tactic_enabled(), default_target if target is None else target)
    return GenerationRequest(request_id, tuple(prompt_token_ids), sampling, tactic)


class InFlight:
    """The engine requests being answered, so that a stopping server can end those that outlast
    its drain period with an answer (503, or an error event in a stream) instead of cutting
    their connections: end_all aborts them on their engine, and they answer 503 for it."""

    def __init__(self) -> None:
        self.engines: dict[str, InferenceEngine] = {}  # by request id
        self.ended = False

    def end_all(self) -> None:
        self.ended = True
        if self.engines:
            logger.warning("ending %d requests still running after the drain period",
                           len(self.engines))  # fmt: skip
        for request_id, engine in list(self.engines.items()):
            engine.abort(request_id)

    def refuse_if_ended(self) -> None:
        if self.ended:
            raise APIError(
                503,
                "the server is shutting down and could not finish this request; retry",
                code="server_shutting_down",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )


class EngineCall:
    """One request on the engine from its first output on. `start` waits for that output, so the
    engine's refusals (queue full, prompt too long) surface before any response is sent. However
    the call ends (finished, client gone, error, the server's drain period over), the engine's
    stream is closed, which aborts the request and frees its KV."""

    def __init__(
        self,
        engine: InferenceEngine,
        outputs: AsyncIterator[GenerationOutput],
        first: GenerationOutput,
        tracker: RequestTracker,
        in_flight: InFlight,
    ) -> None:
        self._outputs = outputs
        self._first = first
        self._tracker = tracker
        self._in_flight = in_flight
        self.eos_token_ids: tuple[int, ...] = engine.tokenizer.eos_token_ids

    @classmethod
    async def start(cls, engine: InferenceEngine, request: GenerationRequest,
                    tracker: RequestTracker, in_flight: InFlight) -> EngineCall:  # fmt: skip
        in_flight.refuse_if_ended()
        outputs = engine.generate(request)
        in_flight.engines[request.request_id] = engine
        try:
            first = await anext(outputs)
        except BaseException:
            in_flight.engines.pop(request.request_id, None)
            await _close(outputs)
            raise
        return cls(engine, outputs, first, tracker, in_flight)

    async def outputs(self) -> AsyncIterator[GenerationOutput]:
        """The request's outputs; one that failed ("error", "abort") raises APIError."""
        last = self._first
        try:
            while True:
                self._tracker.on_output(last)
                if last.finish_reason == "abort":
                    self._in_flight.refuse_if_ended()  # else nobody is waiting for the answer
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
            self._in_flight.engines.pop(last.request_id, None)
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
    """tokens: how logprobs name their tokens; None when the request asked for no logprobs."""

    id: str
    created: int
    model: str
    tokens: TokenText | None = None

    def response(
        self, text: str, finish_reason: str, usage: Usage, logprobs: Sequence[TokenLogprob]
    ) -> ChatCompletion:
        choice = ChatChoice(message=ChatResponseMessage(content=text), finish_reason=finish_reason,
                            logprobs=self._logprobs(logprobs))  # fmt: skip
        return ChatCompletion(
            id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage
        )

    def opening_chunk(self) -> ChatCompletionChunk | None:
        return self._chunk(ChatDelta(role="assistant", content=""))

    def delta_chunk(
        self, text: str, logprobs: Sequence[TokenLogprob], text_offset: int
    ) -> ChatCompletionChunk:
        return self._chunk(ChatDelta(content=text), logprobs=self._logprobs(logprobs))

    def closing_chunk(self, finish_reason: str) -> ChatCompletionChunk:
        return self._chunk(ChatDelta(), finish_reason)

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )

    def _logprobs(self, entries: Sequence[TokenLogprob]) -> ChatLogprobs | None:
        return None if self.tokens is None else chat_logprobs(entries, self.tokens)

    def _chunk(
        self, delta: ChatDelta, finish_reason: str | None = None, logprobs=None
    ) -> ChatCompletionChunk:
        choice = ChatChunkChoice(delta=delta, finish_reason=finish_reason, logprobs=logprobs)
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[choice]
        )


@dataclass(frozen=True)
class TextFormat:
    id: str
    created: int
    model: str
    tokens: TokenText | None = None

    def response(
        self, text: str, finish_reason: str, usage: Usage, logprobs: Sequence[TokenLogprob]
    ) -> Completion:
        return self._completion(text, finish_reason, usage, self._logprobs(logprobs, 0))

    def opening_chunk(self) -> Completion | None:
        return None

    def delta_chunk(
        self, text: str, logprobs: Sequence[TokenLogprob], text_offset: int
    ) -> Completion:
        return self._completion(text, None, logprobs=self._logprobs(logprobs, text_offset))

    def closing_chunk(self, finish_reason: str) -> Completion:
        return self._completion("", finish_reason)

    def usage_chunk(self, usage: Usage) -> Completion:
        return Completion(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )

    def _logprobs(
        self, entries: Sequence[TokenLogprob], text_offset: int
    ) -> CompletionLogprobs | None:
        if self.tokens is None:
            return None
        return completion_logprobs(entries, self.tokens, text_offset)

    def _completion(
        self,
        text: str,
        finish_reason: str | None,
        usage: Usage | None = None,
        logprobs: CompletionLogprobs | None = None,
    ) -> Completion:
        choice = CompletionChoice(text=text, finish_reason=finish_reason, logprobs=logprobs)
        return Completion(
            id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage
        )


def answer_logprobs(
    output: GenerationOutput, eos_token_ids: tuple[int, ...]
) -> tuple[TokenLogprob, ...]:
    """The output's logprobs of tokens that are text: not of the EOS that ended the request."""
    entries = output.logprobs
    if output.finish_reason == "stop" and entries and entries[-1].token_id in eos_token_ids:
        return entries[:-1]
    return entries


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
    logprobs: list[TokenLogprob] = []
    async with aclosing(call.outputs()) as outputs:
        async for output in outputs:
            pieces.append(output.text)
            logprobs.extend(answer_logprobs(output, call.eos_token_ids))
            last = output
    return format.response("".join(pieces), last.finish_reason, usage(last), logprobs)


async def _disconnected(request: Request) -> None:
    # the body has been read, so the next message is the disconnect (or the end of the response)
    while (await request.receive())["type"] != "http.disconnect":
        pass


def stream(
    call: EngineCall, format: ChatFormat | TextFormat, include_usage: bool, state: State
) -> StreamingResponse:
    """Server-sent events as OpenAI sends them: an opening chunk (chat: the role), one chunk per
    piece of text, a closing chunk with finish_reason, the usage chunk if asked for, [DONE].
    A failure after the response started becomes an error event, then [DONE] (as vLLM ends
    it); the route's status for the request counter goes to `state.status`."""

    async def events() -> AsyncIterator[str]:
        try:
            if (opening := format.opening_chunk()) is not None:
                yield _event(opening)
            sent_characters = 0
            async with aclosing(call.outputs()) as outputs:
                async for output in outputs:
                    logprobs = answer_logprobs(output, call.eos_token_ids)
                    if output.text or logprobs:
                        yield _event(format.delta_chunk(output.text, logprobs, sent_characters))
                        sent_characters += len(output.text)
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
            yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def _event(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"
