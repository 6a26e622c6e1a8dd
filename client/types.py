"""Pydantic models of the server's responses (OpenAI shapes plus deltaserve's delta entries), lenient on extras."""

from __future__ import annotations

from typing import Any, TypedDict

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator


class _Lenient(BaseModel):
    """Base of every response model: unknown fields are kept, never rejected (the server may add fields)."""

    model_config = ConfigDict(extra="allow")


# --- models --------------------------------------------------------------------------------------


class Model(_Lenient):
    """One servable model: the base (no parent) or a delta (parent = the base's id)."""

    id: str
    object: str = "model"
    created: int | None = None
    owned_by: str | None = None
    parent: str | None = None


class ModelList(_Lenient):
    """`GET /v1/models`: the base model and every delta."""

    object: str = "list"
    data: list[Model] = Field(default_factory=list)


# --- completions ---------------------------------------------------------------------------------


class Usage(_Lenient):
    """Token counts of one request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionChoice(_Lenient):
    """One generated text of `/v1/completions` (also the shape of a streamed chunk's choice)."""

    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    logprobs: Any = None


class Completion(_Lenient):
    """`POST /v1/completions` response."""

    id: str = ""
    object: str = "text_completion"
    created: int | None = None
    model: str = ""
    choices: list[CompletionChoice] = Field(default_factory=list)
    usage: Usage | None = None

    @property
    def text(self) -> str:
        """The first choice's text ('' when there is none)."""
        return self.choices[0].text if self.choices else ""


class CompletionChunk(Completion):
    """One `data:` event of a streamed `/v1/completions` response."""


# --- chat ----------------------------------------------------------------------------------------


class ChatMessage(_Lenient):
    """One chat message; also accepted as input to `chat()`."""

    role: str
    content: str | None = None


class ChatCompletionChoice(_Lenient):
    """One generated message of `/v1/chat/completions`."""

    index: int = 0
    message: ChatMessage
    finish_reason: str | None = None


class ChatCompletion(_Lenient):
    """`POST /v1/chat/completions` response."""

    id: str = ""
    object: str = "chat.completion"
    created: int | None = None
    model: str = ""
    choices: list[ChatCompletionChoice] = Field(default_factory=list)
    usage: Usage | None = None

    @property
    def text(self) -> str:
        """The first choice's message content ('' when there is none)."""
        return (self.choices[0].message.content or "") if self.choices else ""


class ChoiceDelta(_Lenient):
    """The increment a streamed chat chunk carries."""

    role: str | None = None
    content: str | None = None


class ChatCompletionChunkChoice(_Lenient):
    """One choice of a streamed chat chunk."""

    index: int = 0
    delta: ChoiceDelta = Field(default_factory=ChoiceDelta)
    finish_reason: str | None = None


class ChatCompletionChunk(_Lenient):
    """One `data:` event of a streamed `/v1/chat/completions` response."""

    id: str = ""
    object: str = "chat.completion.chunk"
    created: int | None = None
    model: str = ""
    choices: list[ChatCompletionChunkChoice] = Field(default_factory=list)
    usage: Usage | None = None

    @property
    def text(self) -> str:
        """The first choice's content increment ('' when there is none)."""
        return (self.choices[0].delta.content or "") if self.choices else ""


# --- deltas --------------------------------------------------------------------------------------


class DeltaInfo(_Lenient):
    """One stored delta (`/v1/deltas` entries and the upload summary): manifest, size, density, method, q."""

    name: str = Field(validation_alias=AliasChoices("name", "id"))
    object: str = "delta"
    parent: str | None = None
    method: str | None = None
    density: float | None = None
    drop_rate: float | None = None
    q: float | dict[str, float] | None = None  # global, or per tensor
    size_bytes: int | None = None
    residency: Any = None  # e.g. "disk" / "cpu" / "cuda"; shape is the server's to choose
    manifest: dict[str, Any] | None = None


class DeltaList(_Lenient):
    """`GET /v1/deltas`: an OpenAI-style list (a bare JSON array is accepted too)."""

    object: str = "list"
    data: list[DeltaInfo] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _accept_bare_list(cls, value: Any) -> Any:
        return {"data": value} if isinstance(value, list) else value


# --- request inputs ------------------------------------------------------------------------------


class SamplingParams(TypedDict, total=False):
    """Optional generation settings of `completions()` and `chat()`; anything left out (or None) takes
    the server's default."""

    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    stop: str | list[str] | None
