"""Structured outputs and tool calling for the OpenAI API, free of HTTP and gRPC: an OpenAI request's
`response_format`, `structured_outputs`, `tools`/`tool_choice` to the constraint the router passes to
the engine, the tools' prompt, and the model's output back to `tool_calls`.

SmolLM2's chat template has no tool support, so tools are described in a system turn of a documented
format (docs/structured-outputs.md, "Tool calling"), and a call is a JSON envelope the constraint makes
valid by construction:

    {"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}}]}

- `tool_choice: "required"` or a named function: the whole output is the envelope (a JSON schema whose
  `arguments` are each tool's `parameters`).
- `"auto"` (the default when tools are given): a Lark grammar allowing either the envelope or free text
  that does not start with `{`, so the first token tells which it is and text streams at once.
- `"none"`: no tools in the prompt and no constraint from them.

`parallel_tool_calls` unset means one call per answer (OpenAI's default is parallel): SmolLM2-135M, allowed
several, repeats its first call until max_tokens. `true` allows up to MAX_PARALLEL_CALLS.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from meshserve.v1 import generation_service_pb2 as pb
from services.openai.schemas import ChatCompletionRequest, ChatMessage, StructuredOutputs, Tool, _Sampling

MAX_TOOLS = 64
MAX_PARALLEL_CALLS = 8
"""Calls in one answer when parallel_tool_calls is true."""
ENVELOPE_KEY = "tool_calls"


class ToolsError(Exception):
    """A request whose structured-output fields cannot be served; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class ToolMode:
    """How a chat request uses its tools."""

    choice: str
    """"auto", "required" or "named"."""
    names: tuple[str, ...]
    """The functions the model may call."""


def _parameters(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object", "properties": {}}


def _envelope_schema(tools: list[Tool], parallel: bool) -> dict[str, Any]:
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t.function.name}, "arguments": _parameters(t)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    array: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1}
    array["maxItems"] = MAX_PARALLEL_CALLS if parallel else 1
    return {
        "type": "object",
        "properties": {ENVELOPE_KEY: array},
        "required": [ENVELOPE_KEY],
        "additionalProperties": False,
    }


def tool_mode(request: ChatCompletionRequest) -> tuple[ToolMode | None, list[Tool]]:
    """The tool mode of a request and the tools it offers (none when there are no tools or tool_choice is none)."""
    tools = request.tools or []
    choice = request.tool_choice
    if len(tools) > MAX_TOOLS:
        raise ToolsError(f"At most {MAX_TOOLS} tools, got {len(tools)}.", "tools")
    names = [t.function.name for t in tools]
    for i, name in enumerate(names):
        if not name or len(name) > 64 or not all(c.isalnum() or c in "_-" for c in name):
            raise ToolsError(
                "A function name is 1 to 64 characters of a-z, A-Z, 0-9, _ and -.", f"tools[{i}].function.name"
            )
    if len(set(names)) != len(names):
        raise ToolsError("Function names must be unique.", "tools")
    if choice is not None and not isinstance(choice, str):
        if choice.function.name not in names:
            raise ToolsError(
                f"tool_choice names the function {choice.function.name!r}, which is not in tools.", "tool_choice"
            )
        chosen = [t for t in tools if t.function.name == choice.function.name]
        return ToolMode("named", (choice.function.name,)), chosen
    if not tools or choice == "none":
        if choice == "required":
            raise ToolsError("tool_choice 'required' needs at least one tool.", "tool_choice")
        return None, []
    return ToolMode(choice or "auto", tuple(names)), tools


def tools_prompt(tools: list[Tool], mode: ToolMode) -> str:
    """The system text that describes the tools and the call format (docs/structured-outputs.md)."""
    lines = [
        "You can call functions. To call them, answer with only this JSON and nothing else:",
        '{"tool_calls":[{"name":"<function name>","arguments":{<the arguments>}}]}',
    ]
    if mode.choice == "auto":
        lines.append("If no function is needed, answer the user in plain text instead.")
    lines.append("The functions:")
    for tool in tools:
        described: dict[str, Any] = {"name": tool.function.name}
        if tool.function.description:
            described["description"] = tool.function.description
        described["parameters"] = _parameters(tool)
        lines.append(json.dumps(described, separators=(",", ":"), ensure_ascii=False))
    return "\n".join(lines)


def tool_constraint(tools: list[Tool], mode: ToolMode, parallel: bool) -> pb.SamplingParameters:
    """The constraint that makes every call valid against its function's parameters."""
    schema = _envelope_schema(tools, parallel)
    sampling = pb.SamplingParameters()
    if mode.choice == "auto":
        # either the envelope or text whose first character is not "{" (nor whitespace before one)
        sampling.grammar = "start: TEXT | call\ncall: %json " + json.dumps(schema) + "\nTEXT: /[^{\\s](.|\\n)*/\n"
    else:
        sampling.json_schema = json.dumps(schema, separators=(",", ":"))
    return sampling


def format_constraint(request: _Sampling) -> tuple[pb.SamplingParameters, str] | None:
    """The constraint of `response_format` or `structured_outputs` (at most one of them), and its param."""
    sampling = pb.SamplingParameters()
    fmt = request.response_format
    extra = request.structured_outputs
    if fmt is not None and fmt.type != "text" and extra is not None:
        raise ToolsError("Set response_format or structured_outputs, not both.", "structured_outputs")
    if fmt is not None and fmt.type == "json_object":
        sampling.json_object = True
        return sampling, "response_format"
    if fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise ToolsError("response_format json_schema needs json_schema.schema.", "response_format.json_schema")
        sampling.json_schema = json.dumps(fmt.json_schema.schema_, separators=(",", ":"))
        return sampling, "response_format.json_schema.schema"
    if extra is not None:
        return _structured_outputs(extra, sampling)
    return None


def _structured_outputs(extra: StructuredOutputs, sampling: pb.SamplingParameters) -> tuple[pb.SamplingParameters, str]:
    set_fields = [
        name
        for name, value in (
            ("json", extra.json_),
            ("json_object", extra.json_object),
            ("regex", extra.regex),
            ("choice", extra.choice),
            ("grammar", extra.grammar),
        )
        if value is not None
    ]
    if len(set_fields) != 1:
        raise ToolsError(
            "structured_outputs takes exactly one of json, json_object, regex, choice, grammar.", "structured_outputs"
        )
    name = set_fields[0]
    if name == "json":
        sampling.json_schema = json.dumps(extra.json_, separators=(",", ":"))
    elif name == "json_object":
        sampling.json_object = bool(extra.json_object)
    elif name == "choice":
        sampling.choice.choices.extend(extra.choice or [])
    elif name == "regex":
        sampling.regex = extra.regex or ""
    else:
        sampling.grammar = extra.grammar or ""
    return sampling, f"structured_outputs.{name}"


def assistant_content(message: ChatMessage, content: str) -> str:
    """An assistant turn as the model sees it: its text, or its tool calls in the envelope format."""
    if not message.tool_calls:
        return content
    calls = []
    for call in message.tool_calls:
        try:
            arguments = json.loads(call.function.arguments)
        except ValueError:
            arguments = call.function.arguments
        calls.append({"name": call.function.name, "arguments": arguments})
    return json.dumps({ENVELOPE_KEY: calls}, separators=(",", ":"), ensure_ascii=False)


def parse_tool_calls(text: str) -> list[dict[str, Any]] | None:
    """The OpenAI tool_calls of an output that is a call envelope, else None (text)."""
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get(ENVELOPE_KEY), list):
        return None
    calls = []
    for call in value[ENVELOPE_KEY]:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {
                    "name": call["name"],
                    "arguments": json.dumps(call.get("arguments", {}), separators=(",", ":"), ensure_ascii=False),
                },
            }
        )
    return calls
