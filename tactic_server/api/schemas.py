"""The OpenAI-compatible wire format: request bodies (validated here, so a handler can trust them)
and the responses and stream chunks the server sends back."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

# Strict types, as OpenAI answers: "5" is not a number and 1 is not a boolean. OpenAI parameters
# that change the answer are honoured or refused (400 naming them); the others (user, metadata,
# store, ...) are ignored, so that clients which always send them keep working.
_REQUEST = ConfigDict(strict=True, extra="ignore")

MAX_TOP_LOGPROBS = 20  # OpenAI's bound for chat (its text completions allow 5; vLLM's is 20)


def _unicode(text: str) -> str:
    """JSON may carry a lone surrogate (\\ud800), which is no character: refused here (400),
    before a tokenizer meets it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text holds a lone surrogate, which is not valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]
TargetMass = Annotated[float, Field(gt=0.0, le=1.0)]
StopString = Annotated[Text, Field(min_length=1)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]
TokenBias = Annotated[float, Field(ge=-100.0, le=100.0)]


class TextPart(BaseModel):
    model_config = _REQUEST
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = _REQUEST
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart]

    @property
    def template_role(self) -> str:
        """The role chat templates know: current OpenAI SDKs send "developer" for "system"."""
        return "system" if self.role == "developer" else self.role

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = _REQUEST
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # json_schema & co. come along
    type: str


def _unsupported(name: str, detail: str = "") -> ValueError:
    return ValueError(f"{name} is not supported by this server{detail}")


class TacticOptions(BaseModel):
    """Per-request attention: `target` is the attention mass P each head must cover;
    `enabled: false` runs dense attention."""

    model_config = _REQUEST
    target: TargetMass | None = None
    enabled: bool = True


class CustomParams(BaseModel):
    """SGLang's free-form `custom_params`; the server reads `tactic_target` from it."""

    model_config = _REQUEST
    tactic_target: TargetMass | None = None


class GenerationFields(BaseModel):
    """What chat and text completions share: the model, sampling, streaming and Tactic."""

    model_config = _REQUEST
    model: str | None = None  # None: the served model
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # extension: 0 keeps every token
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: StopString | list[StopString] | None = Field(None)
    ignore_eos: bool = False  # extension: generate exactly max_tokens (benchmarks, load tests)
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    # token id (as a string, as JSON keys are) -> added to its logit; -100 bans, 100 forces it
    logit_bias: dict[str, TokenBias] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    response_format: ResponseFormat | None = None
    tactic: TacticOptions | None = None
    custom_params: CustomParams | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or {}:
            if not key.isdigit() or not key.isascii():
                raise ValueError(f"the keys are token ids; {key[:20]!r} is none")
        return bias

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, options, info: ValidationInfo):
        if options is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return options

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, response_format: ResponseFormat | None) -> ResponseFormat | None:
        if response_format is not None and response_format.type != "text":
            raise _unsupported(f"response_format {response_format.type!r}", "; only 'text' is")
        return response_format

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences are supported")
        return stop

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @model_validator(mode="after")
    def _one_token_limit(self) -> GenerationFields:
        limits = {self.max_tokens, self.max_completion_tokens} - {None}
        if len(limits) > 1:
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        return self

    route_max_tokens: ClassVar[int | None] = None  # the route's own default of max_tokens

    @property
    def logprobs_wanted(self) -> int | None:
        """How many most likely alternatives each token's logprob comes with; None: no
        logprobs (each route reads its own fields)."""
        return None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def token_bias(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(token), bias) for token, bias in (self.logit_bias or {}).items())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def tactic_target(self) -> float | None:
        """The requested target mass; `tactic.target` wins over `custom_params.tactic_target`;
        None leaves the server's default."""
        if self.tactic is not None and self.tactic.target is not None:
            return self.tactic.target
        return self.custom_params.tactic_target if self.custom_params else None

    def tactic_enabled(self) -> bool:
        return self.tactic is None or self.tactic.enabled


class ChatCompletionRequest(GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return top

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, tools: list[dict] | None) -> list[dict] | None:
        if tools:
            raise _unsupported("tools (function calling)")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, choice: str | dict | None) -> str | dict | None:
        if choice not in (None, "none"):
            raise _unsupported("tool_choice (function calling)")
        return choice

    @property
    def logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def chat_request_model(max_messages: int) -> type[ChatCompletionRequest]:
    """ChatCompletionRequest with at most max_messages messages: a longer list is refused as it
    is parsed, before its messages are validated one by one (70,000 of them would hold the event
    loop for most of a second), and the limit shows in the OpenAPI schema."""
    return create_model(
        "ChatCompletionRequest",
        __base__=ChatCompletionRequest,
        messages=(list[ChatMessage], Field(min_length=1, max_length=max_messages)),
    )


class CompletionRequest(GenerationFields):
    prompt: Text = Field(min_length=1)
    logprobs: TopLogprobs | None = None  # the number of most likely alternatives per token
    echo: bool = False
    best_of: int | None = Field(None, ge=1)

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise _unsupported("echo")
        return echo

    @field_validator("best_of")
    @classmethod
    def _one_candidate(cls, best_of: int | None) -> int | None:
        if best_of is not None and best_of > 1:
            raise _unsupported("best_of > 1", "; only one candidate is generated")
        return best_of

    @property
    def logprobs_wanted(self) -> int | None:
        return self.logprobs

    # OpenAI's documented default for text completions, which vLLM keeps too; a chat request
    # without max_tokens gets the server's --default-max-tokens
    route_max_tokens: ClassVar[int | None] = 16


class TacticUsageReport(BaseModel):
    """Means over the request's decode steps, layers and heads."""

    selected_ratio: float  # attended tokens / context tokens
    estimated_mass: float  # the attention mass the selection is estimated to cover
    attended_tokens: float
    decode_steps: int = 0
    dense_fallback_steps: int = 0  # steps decoded dense: selecting would not have paid
    # layer-steps of selecting steps decoded dense: that layer's attention was flat
    dense_layer_steps: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    tactic: TacticUsageReport | None  # None when the request ran dense attention


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]  # where each token's text starts in the completion's text


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    finish_reason: str
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]  # empty in the closing usage chunk
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    """A text completion, and also each chunk of a streamed one (as OpenAI sends them)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tactic-server"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
