"""The OpenAI-compatible wire format: request bodies (validated here, so a handler can trust them)
and the responses and stream chunks the server sends back."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

# Strict types, as OpenAI answers: "5" is not a number and 1 is not a boolean. Fields the server
# does not implement (logprobs, penalties, tools, user, ...) are ignored rather than refused, so
# that clients which always send them keep working.
_REQUEST = ConfigDict(strict=True, extra="ignore")



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
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    tactic: TacticOptions | None = None
    custom_params: CustomParams | None = None

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
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

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


class CompletionRequest(GenerationFields):
    prompt: Text = Field(min_length=1)

    # OpenAI's documented default for text completions, which vLLM keeps too; a chat request
    # without max_tokens gets the server's --default-max-tokens
    route_max_tokens: ClassVar[int | None] = 16


class TacticUsageReport(BaseModel):
    """Means over the request's decode steps, layers and heads."""

    selected_ratio: float  # attended tokens / context tokens
    estimated_mass: float  # the attention mass the selection is estimated to cover
    attended_tokens: float


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    tactic: TacticUsageReport | None  # None when the request ran dense attention


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    finish_reason: str
    logprobs: None = None


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
    logprobs: None = None


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
    logprobs: None = None


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
