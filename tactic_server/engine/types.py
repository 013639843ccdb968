"""What crosses the boundary between the HTTP front end and an engine (embedded or SGLang):
requests, streamed outputs, statistics, errors, and the observer the engine reports timings to."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from tactic_server.tactic.config import selects

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

# new tokens of a request that gives no limit (the API's chat route, --default-max-tokens):
# OpenAI's "the rest of the context" would keep a CPU busy for minutes at 32k
DEFAULT_MAX_TOKENS = 256
GREEDY_BELOW = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS)


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1 disable those filters; seed makes sampling
    reproducible per request; generation stops at max_tokens, at EOS (unless ignore_eos), or
    when the text ends with one of `stop` (the stop string is not returned).

    Before choosing, as OpenAI defines them: each token generated so far has its logit lowered
    by frequency_penalty per occurrence and presence_penalty once; logit_bias, (token id, bias)
    pairs, adds to those tokens' logits (-100 bans a token, 100 forces it). logprobs None returns
    none; n returns each chosen token's log-probability and the n most likely tokens', from the
    model's own distribution (before penalties, bias, temperature and filters, as vLLM returns
    them by default)."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        """A temperature this close to 0 divides logits into infinities: it means greedy, as in
        vLLM and SGLang (both engines follow this)."""
        return self.temperature < GREEDY_BELOW


SELECTION_METHODS = ("tactic", "oracle", "quest", "topk")


@dataclass(frozen=True)
class TacticParams:
    """Per-request attention: Tactic at target mass `target`, or dense when not enabled.
    For evaluation only (not reachable from the API), `method` swaps Tactic's selection for a
    baseline of tactic.baselines on the plain torch path: the oracle at `target`, or Quest and
    top-k at a fixed `budget` (share of the context, per KV head)."""

    enabled: bool = True
    target: float = 0.9
    method: str = "tactic"
    budget: float | None = None

    def __post_init__(self) -> None:
        if self.method not in SELECTION_METHODS:
            raise ValueError(f"method must be one of {', '.join(SELECTION_METHODS)}, "
                             f"got {self.method!r}")  # fmt: skip
        if (self.method in ("quest", "topk")) != (self.budget is not None):
            raise ValueError("quest and topk take a budget (share of the context), only they")
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")

    @property
    def selects(self) -> bool:
        """The one rule of both engines: a request selects unless its attention is dense, i.e.
        Tactic is off or its target is 1 (every token); a baseline always selects."""
        return self.enabled and (selects(self.target) or self.method != "tactic")

    @property
    def target_mass(self) -> float:
        """The target the decoder reads: 1 (every token) when the request is dense."""
        return self.target if self.selects else 1.0

    @property
    def kernels(self) -> bool:
        """Whether the selection kernels can run it (Tactic itself; baselines run in torch)."""
        return self.selects and self.method == "tactic"


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    tactic: TacticParams = field(default_factory=TacticParams)


@dataclass(frozen=True)
class TacticUsage:
    """Means over the request's decode steps, layers and heads so far; its decode steps, and
    how many of them decoded dense because selecting would not have paid (they count as
    reading every position); and of the steps that selected, the layer-steps that decoded dense
    because that layer's attention was flat (they too count as reading every position)."""

    selected_ratio: float
    estimated_mass: float
    attended_tokens: float
    decode_steps: int = 0
    dense_fallback_steps: int = 0
    dense_layer_steps: int = 0


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the `top` most likely tokens' (id, log-probability)
    pairs, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class GenerationOutput:
    """One streamed event of a request: the tokens and text added since the previous event, and,
    when the request asked for them, one TokenLogprob per token. finish_reason is None while
    generating, then "stop" (EOS or a stop string), "length" (max_tokens or the context),
    "abort" (cancelled) or "error"."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    tactic: TacticUsage | None = None
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class EngineStats:
    running_requests: int
    waiting_requests: int
    kv_cache_usage: float  # share of KV slots held by requests, 0..1 (cached prefixes no request
    # uses are evicted on demand, so they count as free)
    kv_slots_in_use: int
    kv_slots_total: int


class EngineError(Exception):
    """A request the engine refuses; the front end maps each subclass to an HTTP status."""


class QueueFull(EngineError):
    """The bounded waiting queue is full (429, with Retry-After)."""


class PromptTooLong(EngineError):
    """The prompt plus max_tokens does not fit the model's context (413)."""


def check_prompt(request: GenerationRequest, max_model_len: int) -> int:
    """The prompt's length, if at least one new token fits after it (else PromptTooLong):
    both engines refuse the same prompts with the same words."""
    prompt_len = len(request.prompt_token_ids)
    if prompt_len == 0:
        raise PromptTooLong("the prompt is empty")
    if prompt_len + 1 > max_model_len:
        raise PromptTooLong(
            f"the prompt has {prompt_len} tokens; this model's context is {max_model_len}"
        )
    return prompt_len


class EngineObserver(Protocol):
    """Timings the engine reports as they happen (the front end turns them into metrics)."""

    def on_clustering(self, seconds: float) -> None: ...

    def on_decode_step(self, seconds: float, batch_size: int) -> None: ...


class InferenceEngine(Protocol):
    """What the HTTP front end needs of an engine; the embedded Engine and SGLangEngine both
    provide it. generate streams one request (closing the stream aborts it); abort ends one by
    id; metrics is the engine's own Prometheus text beside the front end's (b"" for none)."""

    model_name: str
    max_model_len: int
    tokenizer: Tokenizer
    observer: EngineObserver | None

    @property
    def default_target(self) -> float: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]: ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    def metrics(self) -> bytes: ...

    async def shutdown(self, timeout: float = 30.0) -> None: ...
