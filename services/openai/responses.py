"""The Responses API (`POST /v1/responses`) over the chat machinery, free of HTTP and gRPC: a Responses
request becomes a chat request (`to_chat`: input items to messages, `text.format` to response_format,
flat function tools to chat tools), planned and run like one; its answer comes back as a Response object
(`from_chat_body`) or, streamed, as Responses events translated from the chat chunks (`EventTranslator`).

Not served, and refused with a 400 naming the field: `previous_response_id` and `conversation` (nothing
is stored), `background`, tools other than functions, and input items other than messages, function
calls and their outputs. Ignored because ignoring them changes no output: `store`, `metadata`,
`reasoning` (SmolLM2 does not reason), `truncation: "disabled"`, `user`, `service_tier`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.openai.schemas import ChatCompletionRequest, StructuredOutputs


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


class InputContent(_Body):
    type: str
    text: str | None = None


class InputItem(_Body):
    type: str = "message"
    role: str | None = None
    content: str | list[InputContent] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None


class TextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    name: str = "response"
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(_Body):
    format: TextFormat | None = None


class FunctionTool(_Body):
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(_Body):
    type: Literal["function"]
    name: str


class ResponsesRequest(_Body):
    model: str = ""
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = None
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    # vLLM's extras, as on chat
    seed: int | None = None
    top_k: int | None = None
    structured_outputs: StructuredOutputs | None = None


RESPONSES_FIELDS = frozenset(
    name
    for model in (ResponsesRequest, InputItem, InputContent, TextConfig, TextFormat, FunctionTool, NamedFunction)
    for name in model.model_fields
) | {"schema"}

CHAT_TO_RESPONSES_PARAM = {
    "messages": "input",
    "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
    "response_format.json_schema": "text.format",
    "response_format.json_schema.schema": "text.format.schema",
}


class ResponsesError(Exception):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def responses_param(chat_param: str | None) -> str | None:
    """The Responses field a chat field error names."""
    if chat_param is None:
        return None
    if chat_param.startswith("messages["):
        return "input" + chat_param.removeprefix("messages")
    return CHAT_TO_RESPONSES_PARAM.get(chat_param, chat_param)


def _content_text(content: str | list[InputContent] | None, param: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        if part.type not in ("input_text", "output_text", "text") or part.text is None:
            raise ResponsesError(f"Content of type '{part.type}' is not supported: text only.", f"{param}[{j}].type")
        texts.append(part.text)
    return "\n".join(texts)


def to_chat(request: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request that answers a Responses request (ResponsesError naming a field it cannot serve)."""
    for name in ("previous_response_id", "conversation"):
        if getattr(request, name) is not None:
            raise ResponsesError(f"'{name}' is not supported: this server stores no responses.", name)
    if request.background:
        raise ResponsesError("'background' is not supported.", "background")
    messages: list[dict[str, Any]] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    if isinstance(request.input, str):
        messages.append({"role": "user", "content": request.input})
    else:
        for i, item in enumerate(request.input):
            if item.type == "message":
                messages.append(
                    {"role": item.role or "user", "content": _content_text(item.content, f"input[{i}].content")}
                )
            elif item.type == "function_call":
                call = {
                    "id": item.call_id or "",
                    "type": "function",
                    "function": {"name": item.name or "", "arguments": item.arguments or "{}"},
                }
                if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                    messages[-1]["tool_calls"].append(call)  # parallel calls of one turn
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif item.type == "function_call_output":
                messages.append({"role": "tool", "tool_call_id": item.call_id or "", "content": item.output or ""})
            else:
                raise ResponsesError(f"Input items of type '{item.type}' are not supported.", f"input[{i}].type")
    body: dict[str, Any] = {"model": request.model, "messages": messages}
    for name in ("temperature", "top_p", "stream", "parallel_tool_calls", "seed", "top_k"):
        if getattr(request, name) is not None:
            body[name] = getattr(request, name)
    if request.max_output_tokens is not None:
        body["max_completion_tokens"] = request.max_output_tokens
    if request.structured_outputs is not None:
        body["structured_outputs"] = request.structured_outputs.model_dump(by_alias=True, exclude_none=True)
    fmt = request.text.format if request.text is not None else None
    if fmt is not None:
        if fmt.type == "json_schema":
            if fmt.schema_ is None:
                raise ResponsesError("A json_schema format needs its schema.", "text.format.schema")
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": fmt.name, "schema": fmt.schema_, "strict": bool(fmt.strict)},
            }
        else:
            body["response_format"] = {"type": fmt.type}
    if request.tools:
        tools = []
        for i, tool in enumerate(request.tools):
            if tool.type != "function" or not tool.name:
                raise ResponsesError(
                    f"Tools of type '{tool.type}' are not supported: functions only.", f"tools[{i}].type"
                )
            function = {"name": tool.name, "parameters": tool.parameters or {"type": "object", "properties": {}}}
            if tool.description:
                function["description"] = tool.description
            tools.append({"type": "function", "function": function})
        body["tools"] = tools
    if request.tool_choice is not None:
        choice = request.tool_choice
        body["tool_choice"] = (
            choice if isinstance(choice, str) else {"type": "function", "function": {"name": choice.name}}
        )
    return ChatCompletionRequest.model_validate(body, strict=False)


def _message_item(text: str, status: str = "completed", item_id: str | None = None) -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id or f"msg_{uuid.uuid4().hex}",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        if text or status == "completed"
        else [],
    }


def _call_item(call: dict[str, Any], status: str = "completed", item_id: str | None = None) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id or f"fc_{uuid.uuid4().hex}",
        "call_id": call["id"],
        "name": call["function"]["name"],
        "arguments": call["function"]["arguments"],
        "status": status,
    }


def _usage(chat_usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "input_tokens": chat_usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": chat_usage["prompt_tokens_details"]["cached_tokens"]},
        "output_tokens": chat_usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": chat_usage["total_tokens"],
    }


def response_object(
    request: ResponsesRequest,
    response_id: str,
    model: str,
    created: int,
    output: list[dict[str, Any]],
    status: str,
    usage: dict[str, Any] | None,
    finish_reason: str | None,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if finish_reason == "length" else None,
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "model": model,
        "output": output,
        "parallel_tool_calls": request.parallel_tool_calls is True,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "tool_choice": request.tool_choice
        if isinstance(request.tool_choice, str) or request.tool_choice is None
        else request.tool_choice.model_dump(),
        "tools": [t.model_dump(by_alias=True, exclude_none=True) for t in request.tools or []],
        "text": {"format": request.text.format.model_dump(by_alias=True, exclude_none=True)}
        if request.text and request.text.format
        else {"format": {"type": "text"}},
        "usage": usage,
        "metadata": {},
    }


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def from_chat_body(request: ResponsesRequest, chat: dict[str, Any]) -> dict[str, Any]:
    """A chat completion body (one choice) as a Response object."""
    choice = chat["choices"][0]
    message = choice["message"]
    output = (
        [_call_item(call) for call in message["tool_calls"]]
        if message.get("tool_calls")
        else [_message_item(message["content"] or "")]
    )
    finish = choice["finish_reason"]
    return response_object(
        request,
        "resp_" + chat["id"].removeprefix("chatcmpl-"),
        chat["model"],
        chat["created"],
        output,
        _status(finish),
        _usage(chat["usage"]),
        finish,
    )


class EventTranslator:
    """Chat completion chunks (one choice) to the Responses stream's events, numbered in order."""

    def __init__(self, request: ResponsesRequest, response_id: str, model: str) -> None:
        self.request = request
        self.response_id = response_id
        self.model = model
        self.created = int(time.time())
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self._text: list[str] = []
        self._message: dict[str, Any] | None = None
        self._calls: dict[int, dict[str, Any]] = {}  # chat tool_call index -> the output item
        self.finish_reason: str | None = None

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def _response(self, status: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        return response_object(
            self.request, self.response_id, self.model, self.created, self.output, status, usage, self.finish_reason
        )

    def start(self) -> list[dict[str, Any]]:
        return [
            self._event("response.created", response=self._response("in_progress")),
            self._event("response.in_progress", response=self._response("in_progress")),
        ]

    def _open_message(self) -> list[dict[str, Any]]:
        self._message = _message_item("", "in_progress")
        self.output.append(self._message)
        index = len(self.output) - 1
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            self._event("response.output_item.added", output_index=index, item=dict(self._message, content=[])),
            self._event(
                "response.content_part.added",
                item_id=self._message["id"],
                output_index=index,
                content_index=0,
                part=part,
            ),
        ]

    def chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """The events of one chat chunk (possibly none)."""
        events: list[dict[str, Any]] = []
        if not chunk.get("choices"):
            return events
        choice = chunk["choices"][0]
        delta = choice.get("delta") or {}
        if delta.get("content"):
            if self._message is None:
                events += self._open_message()
            assert self._message is not None
            self._text.append(delta["content"])
            events.append(
                self._event(
                    "response.output_text.delta",
                    item_id=self._message["id"],
                    output_index=self.output.index(self._message),
                    content_index=0,
                    delta=delta["content"],
                    logprobs=[],
                )
            )
        for call in delta.get("tool_calls") or []:
            if "id" in call:
                item = _call_item(
                    {"id": call["id"], "function": {"name": call["function"]["name"], "arguments": ""}}, "in_progress"
                )
                self._calls[call["index"]] = item
                self.output.append(item)
                events.append(
                    self._event("response.output_item.added", output_index=len(self.output) - 1, item=dict(item))
                )
            arguments = (call.get("function") or {}).get("arguments")
            if arguments:
                item = self._calls[call["index"]]
                item["arguments"] += arguments
                events.append(
                    self._event(
                        "response.function_call_arguments.delta",
                        item_id=item["id"],
                        output_index=self.output.index(item),
                        delta=arguments,
                    )
                )
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        return events

    def finish(self, chat_usage: dict[str, Any]) -> list[dict[str, Any]]:
        """The closing events, after the last chunk."""
        events: list[dict[str, Any]] = []
        if self._message is None and not self._calls:
            events += self._open_message()  # an empty answer is still one message
        status = _status(self.finish_reason)
        for index, item in enumerate(self.output):
            item["status"] = status
            if item is self._message:
                text = "".join(self._text)
                part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
                item["content"] = [part]
                events += [
                    self._event(
                        "response.output_text.done",
                        item_id=item["id"],
                        output_index=index,
                        content_index=0,
                        text=text,
                        logprobs=[],
                    ),
                    self._event(
                        "response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part
                    ),
                ]
            else:
                events.append(
                    self._event(
                        "response.function_call_arguments.done",
                        item_id=item["id"],
                        output_index=index,
                        arguments=item["arguments"],
                    )
                )
            events.append(self._event("response.output_item.done", output_index=index, item=dict(item)))
        kind = "response.completed" if status == "completed" else "response.incomplete"
        events.append(self._event(kind, response=self._response(status, _usage(chat_usage))))
        return events
