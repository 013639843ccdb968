"""The HTTP server: OpenAI-compatible routes in front of an engine, probes and /metrics.

The engine is either given, or loaded in a worker thread once the server listens (the CLI's
way): /health answers at once, /ready and the /v1 routes answer 503 until the model is loaded."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from tactic_server.engine.types import (
    DEFAULT_MAX_TOKENS,
    GenerationRequest,
    InferenceEngine,
    SamplingParams,
    TacticParams,
)

from .auth import require_api_key
from .completions import (
    ChatFormat,
    ClientLeft,
    EngineCall,
    InFlight,
    TextFormat,
    complete,
    generation_request,
    stream,
    unless_client_leaves,
)
from .errors import (
    CLIENT_CLOSED_REQUEST,
    RETRY_AFTER_SECONDS,
    APIError,
    install_error_handlers,
)
from .limits import BodyLimits, RequestLimits
from .logprobs import TokenText
from .metrics import CountRequests, ServerMetrics
from .request_id import RequestId
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationFields,
    ModelCard,
    ModelList,
    chat_request_model,
)

if TYPE_CHECKING:
    from tactic_server.engine.types import InferenceEngine

logger = logging.getLogger(__name__)

COMPLETION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


def refuse_before_tokenizing(
    body: GenerationFields,
    prompt: str | list[dict],
    engine: InferenceEngine,
) -> None:
    """What cannot fit is refused at once, not after seconds of rendering and tokenising (too
    many messages were refused while parsing): max_tokens alone beyond the context (400), a
    logit_bias for a token the vocabulary lacks (400), or a prompt with more characters than
    max_model_len tokens could hold (413)."""
    max_model_len = engine.max_model_len
    if body.token_limit is not None and body.token_limit >= max_model_len:
        raise APIError(
            400,
            f"max_tokens is {body.token_limit}; this model's context is {max_model_len} tokens, "
            "prompt included",
            param="max_tokens",
            code="context_length_exceeded",
        )
    vocab_size = engine.tokenizer.vocab_size
    unknown = [token for token, _ in body.token_bias if token >= vocab_size]
    if unknown:
        raise APIError(
            400,
            f"logit_bias names token {unknown[0]}; the vocabulary has {vocab_size} tokens",
            param="logit_bias",
            code="invalid_logit_bias",
        )
    texts = [prompt] if isinstance(prompt, str) else [message["content"] for message in prompt]
    characters = sum(len(text) for text in texts)
    if characters > max_model_len * engine.tokenizer.max_token_chars:
        raise APIError(
            413,
            f"the prompt has {characters} characters, more than {max_model_len} tokens can hold",
            param="messages" if not isinstance(prompt, str) else "prompt",
            code="context_length_exceeded",
        )


WARM_UP_TOKENS = 640  # more than one cluster segment (512), so selection runs too


async def warm_up_engine(engine: InferenceEngine) -> float:
    """Before a loaded engine is called ready: one short prompt, dense and with Tactic, then
    the Tactic one again (a prefix-cache hit on SGLang). The first requests on a fresh GPU
    machine otherwise compile kernels (FlashInfer's prefill JIT: a first answer took 118 s
    after /ready on the H200). Not counted in /metrics (no observer yet). Returns seconds."""
    began = time.perf_counter()
    length = max(1, min(WARM_UP_TOKENS, engine.max_model_len - 4))
    prompt = tuple(1 + i % 97 for i in range(length))
    sampling = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    tactic = TacticParams(True, engine.default_target)
    for name, params in (("dense", TacticParams(False)), ("tactic", tactic), ("cached", tactic)):
        async for _ in engine.generate(GenerationRequest(f"warm-up-{name}", prompt, sampling,
                                                         params)):  # fmt: skip
            pass
    seconds = time.perf_counter() - began
    logger.info("warmed up in %.1f s", seconds)
    return seconds


def create_app(
    engine: InferenceEngine | None = None,
    *,
    load_engine: Callable[[], InferenceEngine] | None = None,
    on_load_failure: Callable[[BaseException], None] | None = None,
    api_key: str | None = None,
    limits: RequestLimits | None = None,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    warm_up: bool = True,
) -> FastAPI:
    """Serve `engine`, or the engine `load_engine()` returns (the app then owns it and shuts it
    down, finishing requests in flight, when the server stops). If loading fails, /health
    answers 503 and `on_load_failure` is called (the CLI stops the server). A chat request
    without max_tokens generates at most `default_max_tokens`; limits None: the defaults.
    warm_up: a loaded engine answers `warm_up_engine`'s requests before /ready says so.
    `app.state.in_flight` is what a stopping server ends after its drain period
    (server.make_server)."""
    if (engine is None) == (load_engine is None):
        raise ValueError("pass either an engine or load_engine")
    limits = limits or RequestLimits()
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if load_engine is None:
            yield
            return
        loading = asyncio.create_task(load_and_warm_up())
        loading.add_done_callback(attach_loaded_engine)
        try:
            yield
        finally:
            loading.cancel()  # a load in progress ends with the process
            if app.state.engine is not None:
                await app.state.engine.shutdown()

    async def load_and_warm_up() -> InferenceEngine:
        loaded = await asyncio.to_thread(load_engine)
        if warm_up:
            try:
                await warm_up_engine(loaded)
            except BaseException:
                await loaded.shutdown()
                raise
        return loaded

    def attach_loaded_engine(loading: asyncio.Task) -> None:
        if loading.cancelled():
            return
        if (error := loading.exception()) is not None:
            logger.error("could not load the model", exc_info=error)
            app.state.load_error = error
            if on_load_failure is not None:
                on_load_failure(error)
            return
        attach(loading.result())

    def attach(loaded: InferenceEngine) -> None:
        loaded.observer = metrics
        app.state.engine = loaded
        logger.info("serving %s (context %d tokens)", loaded.model_name, loaded.max_model_len)

    def ready_engine(model: str | None = None) -> InferenceEngine:
        engine = app.state.engine
        if engine is None:
            raise APIError(
                503,
                "the model is still loading",
                code="model_not_ready",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        if model is not None and model != engine.model_name:
            raise APIError(
                404,
                f"model {model!r} does not exist; this server serves {engine.model_name!r}",
                param="model",
                code="model_not_found",
            )
        return engine

    app = FastAPI(title="Tactic Server", version="0.1.0", lifespan=lifespan)
    app.state.engine = None
    app.state.load_error = None
    app.state.in_flight = in_flight = InFlight()
    metrics = ServerMetrics(lambda: app.state.engine.stats() if app.state.engine else None)
    if engine is not None:
        attach(engine)
    install_error_handlers(app)
    # the last added runs first: count every completion request, even one refused for its size
    app.add_middleware(BodyLimits, limits=limits)
    app.add_middleware(CountRequests, metrics=metrics, paths=COMPLETION_PATHS)
    app.add_middleware(RequestId)  # outermost: even a refusal by size carries the id

    async def run(
        body: GenerationFields,
        prompt: str | list[dict],
        format_type,
        id_prefix: str,
        request: Request,
    ):
        """Render and tokenise in a worker thread (the tokenizer lets go of the GIL, so probes
        and streams go on meanwhile), then run on the engine."""
        engine = ready_engine(body.model)
        tokenizer = engine.tokenizer
        refuse_before_tokenizing(body, prompt, engine)

        def prompt_token_ids() -> list[int]:
            if isinstance(prompt, str):  # a plain prompt gets BOS, as transformers adds it
                return tokenizer.encode(prompt, add_special_tokens=True)
            try:
                text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
            except Exception as exc:  # the model's template refuses these messages (a role)
                raise APIError(
                    400,
                    f"the model's chat template refused the messages: {exc}",
                    param="messages",
                    code="invalid_messages",
                ) from exc
            return tokenizer.encode(text)  # the template writes BOS itself

        request_id = f"{id_prefix}-{request.state.request_id}"
        prompt_ids = await asyncio.to_thread(prompt_token_ids)
        generation = generation_request(
            body, request_id, prompt_ids, engine.max_model_len,
            engine.default_target, default_max_tokens,
        )  # fmt: skip
        logger.debug(
            "%s: %d prompt tokens, %s, %s",
            request_id,
            len(prompt_ids),
            generation.sampling,
            generation.tactic,
        )
        try:  # a request still queued when its client leaves is aborted there, not prefilled
            call = await unless_client_leaves(
                request,
                EngineCall.start(engine, generation, metrics.track(generation.tactic), in_flight),
            )
        except ClientLeft:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        tokens = None if body.logprobs_wanted is None else TokenText(tokenizer)
        format = format_type(request_id, int(time.time()), engine.model_name, tokens)
        if body.stream:
            return stream(call, format, body.include_usage, request.state)
        return await complete(call, format, request)

    v1 = APIRouter(
        prefix="/v1", dependencies=[Depends(require_api_key(api_key))] if api_key else []
    )

    async def chat_completions(body: ChatCompletionRequest, request: Request):
        messages = [{"role": message.template_role, "content": message.text()}
                    for message in body.messages]  # fmt: skip
        return await run(body, messages, ChatFormat, "chatcmpl", request)

    # FastAPI parses the body as its annotation says: this app's model, with its message limit
    chat_completions.__annotations__["body"] = chat_request_model(limits.max_messages)
    v1.post("/chat/completions")(chat_completions)

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await run(body, body.prompt, TextFormat, "cmpl", request)

    @v1.get("/models")
    async def models() -> ModelList:
        engine = ready_engine()
        card = ModelCard(id=engine.model_name, created=started, max_model_len=engine.max_model_len)
        return ModelList(data=[card])

    app.include_router(v1)

    @app.get("/health")
    async def health() -> dict:
        """Alive (while loading too); 503 once loading the model has failed."""
        if app.state.load_error is not None:
            raise APIError(
                503, f"loading the model failed: {app.state.load_error}", code="model_load_failed"
            )
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict:
        ready_engine()
        return {"status": "ready"}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body = metrics.exposition()
        engine = app.state.engine
        if engine is not None:
            body += engine.metrics()  # the engine's own families (SGLang's), beside ours
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app
