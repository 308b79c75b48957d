"""The OpenAI request bodies as pydantic models, validated from the raw JSON in strict mode: a value of the
wrong JSON type is refused (400) rather than coerced, and fields this API does not know are ignored. Value
ranges are the router's to check (one place for the request contract); only what is OpenAI's own (n, the
logprobs switches) is checked here."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


TokenId = Annotated[int, Field(ge=0, lt=1 << 32)]


class StreamOptions(_Body):
    include_usage: bool | None = None


class TextPart(_Body):
    """One part of a message's content; only text parts are understood."""

    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class _Sampling(_Body):
    """Fields both endpoints share."""

    model: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    logprobs: int | None = None


Endpoint = Literal["chat", "completion"]

FIELD_NAMES = frozenset(
    name
    for model in (ChatCompletionRequest, CompletionRequest, ChatMessage, TextPart, StreamOptions)
    for name in model.model_fields
)
"""Every field name of the bodies: what tells a field apart from a union member's tag in a pydantic
error location (('stop', 'list[str]', 0) is the field `stop[0]`)."""
