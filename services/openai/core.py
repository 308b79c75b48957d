"""The OpenAI-compatible API's logic, free of HTTP and gRPC so it is tested on its own
(tests/unit/test_openai_mapping.py):

- `parse_chat` / `parse_completion`: the raw JSON body to a validated request (400 naming the field);
- `plan_chat` / `plan_completion`: that request to one meshserve.v1 GenerateRequest per choice (`n`
  choices of every prompt, run as parallel Generate calls);
- `ResponseBuilder`: the router's GenerateResponse stream of each choice to OpenAI's response body, or to
  its server-sent-event chunks;
- `to_openai_error`: a domain error (what the router's status says) to OpenAI's error shape and HTTP status.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from meshserve.v1 import generation_service_pb2 as pb
from services.common.contract import CONSTRAINT_KINDS, SAMPLING_SCALAR_FIELDS
from services.common.errors import (
    DownstreamError,
    InvalidArgumentError,
    ResourceExhaustedError,
    ServingError,
    UnavailableError,
)
from services.common.finish import from_public_proto
from services.openai import tools as tools_
from services.openai.schemas import FIELD_NAMES, ChatCompletionRequest, CompletionRequest, Endpoint, _Sampling

MAX_N = 4
"""Choices per prompt (`n`), each a Generate call of its own."""
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""OpenAI's (and vLLM's) default for /v1/completions; chat leaves it to the router's default."""


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        """Retry-After in whole seconds (the HTTP form) and retry-after-ms, which the openai SDKs prefer."""
        if self.retry_after_s is None:
            return {}
        return {
            "retry-after": str(max(1, math.ceil(self.retry_after_s))),
            "retry-after-ms": str(max(1, round(self.retry_after_s * 1000))),
        }


def invalid(message: str, param: str | None, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param, code)


# 1. Parsing


def _param_of(location: tuple[str | int, ...], names: frozenset[str] = FIELD_NAMES) -> str:
    """A pydantic error location as an OpenAI param path: ('messages', 0, 'content') -> messages[0].content.
    Union members add their tag to the location ('stop', 'list[str]', 0); tags are not field names."""
    param = ""
    for part in location:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part in names:
            param += f".{part}" if param else part
    return param


def _parse(model: type[BaseModel], body: bytes, names: frozenset[str] = FIELD_NAMES) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        errors = error.errors()
        first = errors[0]
        # A union's members each report an error; the deepest path of the first field's is the most precise
        # (stop: ["a", 3] -> stop[1], not "stop should be a string").
        same_field = [e for e in errors if e["loc"][:1] == first["loc"][:1]]
        first = max(same_field, key=lambda e: (len(_param_of(e["loc"], names)), not e["type"].endswith("_type")))
        if first["type"] == "json_invalid":
            raise invalid(
                f"We could not parse the JSON body of your request: {first['msg']}", None, "invalid_json"
            ) from None
        if first["type"] == "model_type":
            raise invalid("The request body must be a JSON object.", None, "invalid_json") from None
        param = _param_of(first["loc"], names)
        if first["type"] == "missing":
            raise invalid(f"Missing required parameter: '{param}'.", param, "missing_required_parameter") from None
        if first["type"].endswith("_type"):
            raise invalid(f"Invalid type for '{param}': {first['msg'].lower()}.", param, "invalid_type") from None
        raise invalid(f"Invalid value for '{param}': {first['msg'].lower()}.", param) from None


def parse_chat(body: bytes) -> ChatCompletionRequest:
    """A /v1/chat/completions body, or OpenAIError(400) naming the field."""
    return _parse(ChatCompletionRequest, body)


def parse_completion(body: bytes) -> CompletionRequest:
    """A /v1/completions body, or OpenAIError(400) naming the field."""
    return _parse(CompletionRequest, body)


# 2. Planning the Generate calls


@dataclass(frozen=True)
class Plan:
    """The Generate calls answering one OpenAI request, and how to present their results."""

    endpoint: Endpoint
    id: str
    """The response id (chatcmpl-… / cmpl-…); Generate request ids are derived from it."""
    model: str
    """The model name responses carry."""
    requests: list[pb.GenerateRequest]
    """One per choice, in choice-index order: prompt i's choices are i*n .. i*n+n-1."""
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None
    """Alternatives per token when token logprobs were asked for, else None."""
    max_tokens_param: str
    """The field the client set the token limit with (max_tokens or max_completion_tokens)."""
    created: int = field(default_factory=lambda: int(time.time()))
    tools: tools_.ToolMode | None = None
    """How the model may call tools (None: it may not); outputs that are call envelopes become tool_calls."""
    constraint_param: str | None = None
    """The OpenAI field the request's constraint came from (response_format, tools, structured_outputs.*)."""


_SAME_AS_OURS = tuple(
    name
    for name in SAMPLING_SCALAR_FIELDS
    if name in _Sampling.model_fields and name not in ("max_tokens", "top_k", "seed")
)
"""OpenAI (and vLLM) sampling fields that mean what ours of the same name mean, copied as they are; max_tokens
has its aliases, top_k vLLM's -1, seed a value per choice (below)."""


def _sampling(request: _Sampling, max_tokens: int | None, logprobs: int | None) -> pb.SamplingParameters:
    _check_seed(request)
    sampling = pb.SamplingParameters()
    for name in _SAME_AS_OURS:
        value = getattr(request, name)
        if value is not None:
            setattr(sampling, name, value)
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    if request.top_k is not None:
        sampling.top_k = 0 if request.top_k == -1 else request.top_k  # vLLM's -1 also means "disabled"
    if request.stop is not None:
        sampling.stop.extend([request.stop] if isinstance(request.stop, str) else request.stop)
    if logprobs is not None:
        sampling.logprobs = logprobs
    for key, bias in (request.logit_bias or {}).items():
        if not key.isdigit() or int(key) >= 1 << 32:
            raise invalid(f"Invalid 'logit_bias': {key!r} is not a token id.", "logit_bias")
        sampling.logit_bias[int(key)] = bias
    return sampling


def _constrain(sampling: pb.SamplingParameters, constraint: pb.SamplingParameters | None) -> None:
    if constraint is not None:
        sampling.MergeFrom(constraint)


def _structure(request: _Sampling) -> tuple[pb.SamplingParameters, str] | None:
    try:
        return tools_.format_constraint(request)
    except tools_.ToolsError as error:
        raise invalid(error.message, error.param) from None


def _check_int32(request: _Sampling, names: tuple[str, ...]) -> None:
    # the proto's int32 fields; larger values get the router's range message instead of a protobuf error
    for name in names:
        value = getattr(request, name, None)
        if value is not None and not -(1 << 31) <= value < 1 << 31:
            raise invalid(f"Invalid '{name}': {value} is out of range.", name)


def _check_seed(request: _Sampling) -> None:
    # vLLM takes any int64 and so do we; a negative seed is its two's complement in the proto's uint64.
    # Beyond int64 a seed would wrap onto another's, so two different seeds would answer alike.
    if request.seed is not None and not -(1 << 63) <= request.seed < 1 << 63:
        raise invalid(f"Invalid 'seed': {request.seed} is out of range (a 64-bit signed integer).", "seed")


def _choices(request: _Sampling, prompts: int, max_choices: int) -> int:
    n = 1 if request.n is None else request.n
    if not 1 <= n <= MAX_N:
        raise invalid(f"Invalid 'n': {n} is not in [1, {MAX_N}].", "n")
    if prompts * n > max_choices:
        raise invalid(
            f"At most {max_choices} generations per request: {prompts} prompts x n={n}.", "n" if n > 1 else "prompt"
        )
    return n


def _fan_out(
    inputs: list[dict[str, Any]], n: int, request: _Sampling, sampling: pb.SamplingParameters, model: str, base_id: str
) -> list[pb.GenerateRequest]:
    """n requests per input. A seeded request's choices get seeds seed, seed+1, ... so they differ and
    each stays reproducible."""
    requests = []
    for i, input_fields in enumerate(inputs):
        for j in range(n):
            index = i * n + j
            choice_sampling = pb.SamplingParameters()
            choice_sampling.CopyFrom(sampling)
            if request.seed is not None:
                choice_sampling.seed = (request.seed + j) % (1 << 64)
            request_id = base_id if len(inputs) * n == 1 else f"{base_id}-{index}"
            requests.append(
                pb.GenerateRequest(model=model, sampling=choice_sampling, request_id=request_id, **input_fields)
            )
    return requests


def _message_content(content: Any, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise invalid(
                f"Invalid content part type '{part.type}': only text parts are supported.",
                f"messages[{index}].content[{j}].type",
                "unsupported_content",
            )
        texts.append(part.text)
    return "\n".join(texts)


def plan_chat(request: ChatCompletionRequest, model_name: str, max_choices: int = MAX_N) -> Plan:
    """One GenerateRequest (chat input) per choice. `model` goes to the router as the client sent it (the
    router knows what it serves); `model_name`, the served model's, is what responses carry."""
    _check_int32(request, ("max_tokens", "max_completion_tokens", "top_k", "min_tokens", "top_logprobs"))
    if not request.messages:
        raise invalid("'messages' must hold at least one message.", "messages")
    if request.top_logprobs is not None and not request.logprobs:
        raise invalid("'top_logprobs' needs 'logprobs' set to true.", "top_logprobs")
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    max_tokens: int | None = request.max_tokens
    max_tokens_param = "max_tokens"
    if request.max_completion_tokens is not None:
        max_tokens, max_tokens_param = request.max_completion_tokens, "max_completion_tokens"
    # "developer" is OpenAI's newer name for the system role
    messages = [
        pb.ChatMessage(
            role="system" if m.role == "developer" else m.role,
            content=tools_.assistant_content(m, _message_content(m.content, i)),
        )
        for i, m in enumerate(request.messages)
    ]
    structure = _structure(request)
    constraint, constraint_param = structure if structure is not None else (None, None)
    try:
        mode, offered = tools_.tool_mode(request)
    except tools_.ToolsError as error:
        raise invalid(error.message, error.param) from None
    if mode is not None:
        if constraint is not None:
            raise invalid(
                "response_format or structured_outputs with tools is not served; set tool_choice to 'none'.",
                constraint_param,
                "unsupported_parameter",
            )
        described = tools_.tools_prompt(offered, mode)
        if messages[0].role == "system":
            messages[0].content = f"{messages[0].content}\n\n{described}"
        else:
            messages.insert(0, pb.ChatMessage(role="system", content=described))
        constraint = tools_.tool_constraint(offered, mode, request.parallel_tool_calls is True)
        constraint_param = "tools"
    n = _choices(request, 1, max_choices)
    plan_id = f"chatcmpl-{uuid.uuid4().hex}"
    sampling = _sampling(request, max_tokens, logprobs)
    _constrain(sampling, constraint)
    requests = _fan_out(
        [{"chat": pb.ChatMessages(messages=messages)}],
        n,
        request,
        sampling,
        request.model,
        plan_id,
    )
    return Plan(
        "chat",
        plan_id,
        model_name,
        requests,
        n,
        bool(request.stream),
        bool(request.stream and request.stream_options and request.stream_options.include_usage),
        logprobs,
        max_tokens_param,
        tools=mode,
        constraint_param=constraint_param,
    )


def plan_completion(request: CompletionRequest, model_name: str, max_choices: int = MAX_N) -> Plan:
    """One GenerateRequest per choice of every prompt (a string, token ids, or a list of either)."""
    _check_int32(request, ("max_tokens", "top_k", "min_tokens", "logprobs"))
    prompt = request.prompt
    if isinstance(prompt, str):
        inputs: list[dict[str, Any]] = [{"prompt": prompt}]
    elif not prompt:
        raise invalid("'prompt' must not be empty.", "prompt")
    elif isinstance(prompt[0], int):
        inputs = [{"token_ids": pb.TokenIds(ids=prompt)}]
    elif isinstance(prompt[0], str):
        inputs = [{"prompt": p} for p in prompt]
    else:
        inputs = [{"token_ids": pb.TokenIds(ids=p)} for p in prompt]
    n = _choices(request, len(inputs), max_choices)
    max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if request.max_tokens is None else request.max_tokens
    plan_id = f"cmpl-{uuid.uuid4().hex}"
    sampling = _sampling(request, max_tokens, request.logprobs)
    structure = _structure(request)
    _constrain(sampling, structure[0] if structure else None)
    requests = _fan_out(inputs, n, request, sampling, request.model, plan_id)
    return Plan(
        "completion",
        plan_id,
        model_name,
        requests,
        n,
        bool(request.stream),
        bool(request.stream and request.stream_options and request.stream_options.include_usage),
        request.logprobs,
        "max_tokens",
        constraint_param=structure[1] if structure else None,
    )


def plan(request: ChatCompletionRequest | CompletionRequest, model_name: str, max_choices: int = MAX_N) -> Plan:
    if isinstance(request, ChatCompletionRequest):
        return plan_chat(request, model_name, max_choices)
    return plan_completion(request, model_name, max_choices)


# 3. Errors


def openai_param(field_path: str, plan: Plan | None) -> str | None:
    """The OpenAI field a meshserve field violation names: sampling.top_p -> top_p, chat.messages[0].role ->
    messages[0].role, sampling.logprobs -> top_logprobs (chat) or logprobs (completions)."""
    endpoint = plan.endpoint if plan else "chat"
    constraint_fields = tuple(f"sampling.{kind}" for kind in CONSTRAINT_KINDS)
    if field_path.startswith(constraint_fields) and plan is not None and plan.constraint_param:
        return plan.constraint_param
    if field_path == "sampling.max_tokens":
        return plan.max_tokens_param if plan else "max_tokens"
    if field_path == "sampling.logprobs":
        return "top_logprobs" if endpoint == "chat" else "logprobs"
    if field_path.startswith("sampling."):
        return field_path.removeprefix("sampling.")
    if field_path.startswith("chat.messages"):
        return field_path.removeprefix("chat.")
    if field_path == "chat" or (field_path == "input" and endpoint == "chat"):
        return "messages"
    if field_path in ("input", "prompt", "token_ids", "token_ids.ids") or field_path.startswith("ids["):
        return "prompt"
    return field_path or None


_DOWNSTREAM = {
    # gRPC status -> (HTTP status, OpenAI error type, code)
    "DEADLINE_EXCEEDED": (504, "timeout_error", "deadline_exceeded"),
    "UNAUTHENTICATED": (401, "invalid_request_error", "invalid_api_key"),
    "PERMISSION_DENIED": (403, "permission_error", "permission_denied"),
    "NOT_FOUND": (404, "invalid_request_error", "not_found"),
    "FAILED_PRECONDITION": (400, "invalid_request_error", "failed_precondition"),
    "OUT_OF_RANGE": (400, "invalid_request_error", "invalid_value"),
    "UNIMPLEMENTED": (501, "server_error", "not_implemented"),
    "CANCELLED": (499, "server_error", "cancelled"),  # nobody is left to read it: the client went away
}


def to_openai_error(error: Exception, plan: Plan | None) -> OpenAIError:
    """The HTTP status and OpenAI error body for what the router answered (see README, "Errors")."""
    if isinstance(error, OpenAIError):
        return error
    if isinstance(error, InvalidArgumentError):
        param = openai_param(error.field, plan)
        if param == "model":
            # OpenAI (and vLLM) answer an unknown model with 404 model_not_found
            return OpenAIError(
                404,
                f"The model does not exist: {error.description}",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        return invalid(f"Invalid '{param}': {error.description}", param)
    if isinstance(error, ResourceExhaustedError):
        return OpenAIError(
            429,
            f"The server is at capacity, retry later: {error}",
            "rate_limit_error",
            None,
            "server_overloaded",
            error.retry_after_s,
        )
    if isinstance(error, UnavailableError):
        return OpenAIError(
            503,
            f"The service is unavailable, retry later: {error}",
            "server_error",
            None,
            "service_unavailable",
            error.retry_after_s,
        )
    if isinstance(error, DownstreamError) and error.code in _DOWNSTREAM:
        status, kind, code = _DOWNSTREAM[error.code]
        return OpenAIError(status, str(error) or error.code.lower().replace("_", " "), kind, None, code)
    if isinstance(error, ServingError):
        return OpenAIError(
            500,
            f"The server had an error while processing your request: {error}",
            "server_error",
            None,
            "internal_error",
        )
    return OpenAIError(
        500, "The server had an error while processing your request.", "server_error", None, "internal_error"
    )


# 4. Deadlines

TIMEOUT_HEADER = "x-meshserve-timeout-s"
"""A deadline for the whole request, in seconds, passed to the router as the gRPC deadline."""
SDK_READ_TIMEOUT_HEADER = "x-stainless-read-timeout"
"""What the openai SDKs send: how long they wait for a response. For a non-streaming request that is the
whole generation, so it becomes the deadline; a stream's read timeout is per event and is not used."""


def request_timeout(headers: Mapping[str, str], stream: bool) -> float | None:
    """The gRPC deadline (seconds) a request asks for, or None."""
    value = headers.get(TIMEOUT_HEADER)
    if value is not None:
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not 0 < seconds < 1e6:
            raise invalid(f"Invalid header {TIMEOUT_HEADER}: {value!r} is not a number of seconds > 0.", None)
        return seconds
    sdk_timeout = headers.get(SDK_READ_TIMEOUT_HEADER)
    if not stream and sdk_timeout is not None:
        try:
            seconds = float(sdk_timeout)
        except ValueError:
            return None
        if 0 < seconds < 1e6:
            return seconds
    return None


# 5. Responses


def token_text(texts: Mapping[int, str], token_id: int) -> str:
    return texts.get(token_id, f"token_id:{token_id}")


def logprob_token_ids(response: pb.GenerateResponse) -> set[int]:
    """Token ids whose text a chunk's logprobs name (chosen tokens and alternatives)."""
    ids: set[int] = set()
    if response.HasField("chunk"):
        for item in response.chunk.logprobs:
            ids.add(item.token_id)
            ids.update(alternative.token_id for alternative in item.alternatives)
    return ids


def _logprob(value: float) -> float:
    # JSON has no -inf; OpenAI's convention for "never" is -9999.0
    return value if math.isfinite(value) else -9999.0


@dataclass
class ChoiceState:
    """What one choice's Generate stream has produced so far."""

    index: int
    text: list[str] = field(default_factory=list)
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    text_offset: int = 0
    """Characters of completion text so far (completions' logprobs.text_offset)."""
    started: bool = False
    held: list[str] = field(default_factory=list)
    """Streamed text not sent yet: it may be (or is) a tool-call envelope, sent as tool_calls at the end."""
    streams_text: bool = False
    """With tools: the output turned out to be text (its first character is not "{"), streamed as content."""


class ResponseBuilder:
    """Builds one OpenAI response from the Generate streams of its choices, fed in any interleaving:
    `add` for each GenerateResponse, then `body()` (non-streaming), or `chunks()` per response and
    `final_chunks()` at the end (streaming, as JSON objects for server-sent events)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.choices = [ChoiceState(i) for i in range(len(plan.requests))]

    # non-streaming

    def logprob_token_ids(self) -> set[int]:
        """Every token id the collected logprobs name (whose text `body` needs)."""
        return {
            token_id
            for choice in self.choices
            for item in choice.logprobs
            for token_id in (item.token_id, *(a.token_id for a in item.alternatives))
        }

    def add(self, index: int, response: pb.GenerateResponse) -> None:
        choice = self.choices[index]
        if response.HasField("chunk"):
            choice.text.append(response.chunk.text)
            choice.logprobs.extend(response.chunk.logprobs)
        else:
            self._complete(choice, response.complete)

    def _complete(self, choice: ChoiceState, complete: pb.GenerateComplete) -> None:
        choice.finish_reason = str(from_public_proto(complete.finish_reason))
        choice.prompt_tokens = complete.prompt_tokens
        choice.completion_tokens = complete.completion_tokens
        choice.cached_tokens = complete.cached_prompt_tokens

    def usage(self) -> dict[str, Any]:
        """Prompt tokens count once per prompt (its first choice), as OpenAI bills n choices."""
        firsts = self.choices[:: self.plan.n]
        prompt = sum(c.prompt_tokens for c in firsts)
        completion = sum(c.completion_tokens for c in self.choices)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in firsts)},
        }

    def body(self, texts: Mapping[int, str]) -> dict[str, Any]:
        """The whole response; `texts` names the tokens of logprobs."""
        choices = []
        for choice in self.choices:
            text = "".join(choice.text)
            if self.plan.endpoint == "chat":
                calls = self._tool_calls(text, choice)
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if calls is not None:
                    message = {"role": "assistant", "content": None, "tool_calls": calls}
                choices.append(
                    {
                        "index": choice.index,
                        "message": message,
                        "logprobs": self._chat_logprobs(choice.logprobs, texts),
                        "finish_reason": choice.finish_reason,
                    }
                )
            else:
                choices.append(
                    {
                        "index": choice.index,
                        "text": text,
                        "logprobs": self._completion_logprobs(choice.logprobs, texts, 0),
                        "finish_reason": choice.finish_reason,
                    }
                )
        return {
            "id": self.plan.id,
            "object": "chat.completion" if self.plan.endpoint == "chat" else "text_completion",
            "created": self.plan.created,
            "model": self.plan.model,
            "choices": choices,
            "usage": self.usage(),
            "system_fingerprint": None,
        }

    def _tool_calls(self, text: str, choice: ChoiceState) -> list[dict[str, Any]] | None:
        """The output's tool calls when the request offered tools and the output is a complete call envelope;
        the choice's finish reason becomes "tool_calls"."""
        if self.plan.tools is None or choice.finish_reason != "stop":
            return None
        calls = tools_.parse_tool_calls(text)
        if calls is not None:
            choice.finish_reason = "tool_calls"
        return calls

    def _hold_for_tools(self, choice: ChoiceState, text: str) -> str | None:
        """With tools, the text to stream now (None: hold it). Text that starts with "{" is a call envelope
        (the constraint allows nothing else to start so), held until the output completes."""
        if self.plan.tools is None or choice.streams_text:
            return text
        choice.held.append(text)
        held = "".join(choice.held)
        if not held or (self.plan.tools.choice != "auto" or held.startswith("{")):
            return None
        choice.streams_text, choice.held = True, []
        return held

    def _tool_call_chunks(self, index: int, choice: ChoiceState) -> list[dict[str, Any]]:
        """At the end of a choice that held its text: its tool_calls deltas (one naming each call, one with
        its arguments), or the held text as content when it is no complete envelope (cut by max_tokens)."""
        held = "".join(choice.held)
        choice.held = []
        if not held:
            return []
        calls = self._tool_calls(held, choice)
        if calls is None:
            return [self._chunk({"index": index, "delta": {"content": held}, "logprobs": None, "finish_reason": None})]
        out = []
        for i, call in enumerate(calls):
            named = {
                "index": i,
                "id": call["id"],
                "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""},
            }
            arguments = {"index": i, "function": {"arguments": call["function"]["arguments"]}}
            for delta in (named, arguments):
                out.append(
                    self._chunk(
                        {"index": index, "delta": {"tool_calls": [delta]}, "logprobs": None, "finish_reason": None}
                    )
                )
        return out

    # logprobs in the two OpenAI formats

    def _chat_logprobs(self, items: list[pb.TokenLogprob], texts: Mapping[int, str]) -> dict[str, Any] | None:
        if self.plan.logprobs is None:
            return None

        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            token = token_text(texts, token_id)
            return {"token": token, "logprob": _logprob(logprob), "bytes": list(token.encode())}

        return {
            "content": [
                {
                    **entry(item.token_id, item.logprob),
                    "top_logprobs": [entry(a.token_id, a.logprob) for a in item.alternatives[: self.plan.logprobs]],
                }
                for item in items
            ],
            "refusal": None,
        }

    def _completion_logprobs(
        self, items: list[pb.TokenLogprob], texts: Mapping[int, str], offset: int
    ) -> dict[str, Any] | None:
        if self.plan.logprobs is None:
            return None
        tokens, token_logprobs, top, offsets = [], [], [], []
        for item in items:
            token = token_text(texts, item.token_id)
            tokens.append(token)
            token_logprobs.append(_logprob(item.logprob))
            top.append({token_text(texts, a.token_id): _logprob(a.logprob) for a in item.alternatives})
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    # streaming

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        chunk = {
            "id": self.plan.id,
            "object": "chat.completion.chunk" if self.plan.endpoint == "chat" else "text_completion",
            "created": self.plan.created,
            "model": self.plan.model,
            "choices": [choice],
            "system_fingerprint": None,
        }
        if self.plan.include_usage:
            chunk["usage"] = None  # every chunk but the last, as OpenAI sends them
        return chunk

    def chunks(self, index: int, response: pb.GenerateResponse, texts: Mapping[int, str]) -> list[dict[str, Any]]:
        """The chunks to send for one GenerateResponse of choice `index` (possibly none)."""
        choice = self.choices[index]
        out = []
        if self.plan.endpoint == "chat" and not choice.started:
            out.append(
                self._chunk(
                    {
                        "index": index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                )
            )
        choice.started = True
        if response.HasField("chunk"):
            chunk = response.chunk
            if not chunk.text and not (self.plan.logprobs is not None and chunk.logprobs):
                return out  # nothing to show yet (a multi-byte character still incomplete)
            if self.plan.endpoint == "chat":
                shown = self._hold_for_tools(choice, chunk.text)
                if shown is not None:
                    out.append(
                        self._chunk(
                            {
                                "index": index,
                                "delta": {"content": shown},
                                "logprobs": self._chat_logprobs(list(chunk.logprobs), texts),
                                "finish_reason": None,
                            }
                        )
                    )
            else:
                logprobs = self._completion_logprobs(list(chunk.logprobs), texts, choice.text_offset)
                out.append(
                    self._chunk({"index": index, "text": chunk.text, "logprobs": logprobs, "finish_reason": None})
                )
            if self.plan.logprobs is not None:
                choice.text_offset += sum(len(token_text(texts, item.token_id)) for item in chunk.logprobs)
            choice.text.append(chunk.text)
            return out
        self._complete(choice, response.complete)
        if self.plan.endpoint == "chat":
            out += self._tool_call_chunks(index, choice)
            out.append(
                self._chunk({"index": index, "delta": {}, "logprobs": None, "finish_reason": choice.finish_reason})
            )
        else:
            out.append(
                self._chunk({"index": index, "text": "", "logprobs": None, "finish_reason": choice.finish_reason})
            )
        return out

    def final_chunks(self) -> list[dict[str, Any]]:
        """After every choice completed: the usage chunk (choices empty), when stream_options.include_usage."""
        if not self.plan.include_usage:
            return []
        return [
            {
                "id": self.plan.id,
                "object": "chat.completion.chunk" if self.plan.endpoint == "chat" else "text_completion",
                "created": self.plan.created,
                "model": self.plan.model,
                "choices": [],
                "usage": self.usage(),
                "system_fingerprint": None,
            }
        ]


def event_json(event: Mapping[str, Any]) -> str:
    """One stream event as JSON: a server-sent event's data and a WebSocket text frame, the same text."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)


def sse(event: Mapping[str, Any]) -> bytes:
    """One server-sent event."""
    return b"data: " + event_json(event).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def models_list(info: pb.GetModelInfoResponse, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(info, created)]}


def model_card(info: pb.GetModelInfoResponse, created: int) -> dict[str, Any]:
    """OpenAI's model object, with vLLM's max_model_len and the revision (the GGUF's sha256)."""
    return {
        "id": info.model,
        "object": "model",
        "created": created,
        "owned_by": "meshserve",
        "max_model_len": info.max_context_tokens,
        "revision": info.revision,
    }
