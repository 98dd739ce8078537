"""The request and response shapes of OpenAI's API that `serve` speaks, as pydantic models.

They are what FastAPI validates requests against and what it publishes at /openapi.json.
Fields that OpenAI clients commonly send but a local model cannot honour (tools, response
formats, penalties) are accepted and ignored, as other OpenAI-compatible servers do; those
that would change what the client reads (logprobs, echo, best_of) are refused unless off.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

# What one request may ask for, all in one place (the README's "Limits" lists them). Each
# bounds the memory or the time a single request can take from everyone else.
MAX_BODY_BYTES = 1 << 20  # a request body (JSON), checked before it is parsed: else 413
# (The time to send a body, else 408, is a server setting: settings.BODY_TIMEOUT_S.)
MAX_CHOICES = 8  # `n`: answers per prompt
MAX_PROMPTS = 8  # prompts in one completions request
MAX_STOPS = 4  # stop texts, OpenAI's own limit
MAX_STOP_CHARS = 100  # characters of one stop text
MAX_MESSAGES = 256  # messages of one chat request (and text parts of one message)
# The prompt's tokens are limited by `serve --max-prompt-tokens` (default 2048); text over 16
# characters a token is refused before it is tokenized.
# Requests are validated strictly, as their JSON schema reads: "2" is not a number, 1 is not
# true. Fields OpenAI's clients send that a local model cannot honour are ignored.
REQUEST = ConfigDict(strict=True, extra="ignore")


def exactly(allowed: object) -> BeforeValidator:
    """Only `allowed` (or null), of its own type: 0 is not false here, as in JSON."""
    def check(value: Any) -> Any:
        if value is None or (type(value) is type(allowed) and value == allowed):
            return value
        raise ValueError(f"this server supports only {str(allowed).lower()} or null here")
    return BeforeValidator(check)


class ApiError(Exception):
    """A request the server refuses, answered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind
        self.headers = headers or {}  # such as Retry-After


StopText = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


class Sampling(BaseModel):
    """What both endpoints share. A missing or zero temperature means greedy decoding."""

    model_config = REQUEST

    model: str | None = Field(None, min_length=1,
                              description="A served model's id; the tuned run when missing "
                                          "(GET /v1/models lists them).")
    max_tokens: int | None = Field(None, ge=1, description="Capped by the server's limit.")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOPS)] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return tuple(s for s in stops if s)


class StreamOptions(BaseModel):
    model_config = REQUEST
    include_usage: bool = False


class CompletionRequest(Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(
        description="The instruction; the run's template is applied to it, as in training.")
    # Not supported, and refused rather than ignored: a client asking for them reads them.
    echo: Annotated[Literal[False], exactly(False)] = False
    best_of: Annotated[Literal[1] | None, exactly(1)] = None
    logprobs: Annotated[Literal[0] | None, exactly(0)] = None


class TextPart(BaseModel):
    model_config = REQUEST
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = REQUEST
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, description="Same as max_tokens.")
    logprobs: Annotated[Literal[False] | None, exactly(False)] = None  # not supported


# --- responses ------------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "instructlm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class Response(BaseModel):
    """What every answer carries: its id, when it was made and by which model."""

    id: str
    created: int
    model: str


class Completion(Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


Sampling.model_rebuild()


class Health(BaseModel):
    status: Literal["ok"]
