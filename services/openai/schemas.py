"""The OpenAI request bodies as pydantic models, validated from the raw JSON in strict mode: a value of the
wrong JSON type is refused (400) rather than coerced, and fields this API does not know are ignored. Value
ranges are the router's to check (one place for the request contract); only what is OpenAI's own (n, the
logprobs switches) is checked here."""

from __future__ import annotations

from typing import Annotated, Any, Literal

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


class ToolCallFunction(_Body):
    name: str
    arguments: str
    """The arguments as JSON text (OpenAI's form)."""


class ToolCall(_Body):
    """A tool call of an earlier assistant turn, sent back with the conversation."""

    id: str = ""
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class JsonSchemaFormat(_Body):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDefinition(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs` extra: the constraints OpenAI's API has no field for."""

    json_: dict[str, Any] | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


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
    logit_bias: dict[str, float] | None = None
    structured_outputs: StructuredOutputs | None = None
    response_format: ResponseFormat | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    logprobs: int | None = None


Endpoint = Literal["chat", "completion"]

FIELD_NAMES = frozenset(
    name
    for model in (
        ChatCompletionRequest,
        CompletionRequest,
        ChatMessage,
        TextPart,
        StreamOptions,
        ToolCall,
        ToolCallFunction,
        ResponseFormat,
        Tool,
        FunctionDefinition,
        NamedToolChoice,
        NamedFunction,
    )
    for name in model.model_fields
) | {"schema", "json", "json_object", "regex", "choice", "grammar"}
"""Every field name of the bodies (and the aliases): what tells a field apart from a union member's tag in a pydantic
error location (('stop', 'list[str]', 0) is the field `stop[0]`)."""
