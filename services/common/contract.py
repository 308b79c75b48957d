"""The request contract: every bound a generation request must respect, checked in one place.

The router checks the public request before any work; the tokenizer and the inference engine
check what reaches them again with the same functions, so an internal API called directly refuses
exactly what the public one refuses. Every violation is an `InvalidArgumentError` naming the field
by its path in the public API (`sampling.top_p`, `chat.messages[3].role`), which the gRPC edge
turns into INVALID_ARGUMENT with a `BadRequest.FieldViolation`.

Both protos' `SamplingParameters` have the same field names and presence (unset means the default
below), so one pair of functions reads and writes either.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from services.common.errors import InvalidArgumentError

MAX_PROMPT_BYTES = 1 << 20
"""A prompt (or a chat's contents together), in UTF-8 bytes; Envoy's request limit is the same 1 MiB."""
MAX_CHAT_MESSAGES = 256
CHAT_ROLES = ("system", "user", "assistant", "tool")
"""`tool` carries a tool's result back to the model (the chat template renders it as a turn of its own)."""
MAX_MODEL_NAME_CHARS = 256
MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]+")
"""Characters that are safe in logs, span attributes and metric exemplars as they are."""
MAX_STOP_STRINGS = 8
MAX_STOP_BYTES = 64
MAX_STOP_TOKEN_IDS = 64
"""Stop token ids a client may send; the engine also gets the model's end-of-sequence ids."""
MAX_ENGINE_STOP_TOKEN_IDS = MAX_STOP_TOKEN_IDS + 8
MAX_LOGPROBS = 20
MAX_TEMPERATURE = 100.0
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
MAX_PENALTY = 2.0
"""Bound of presence and frequency penalties (as OpenAI's)."""
PRIORITIES = range(0, 4)
"""meshserve.v1.Priority values: UNSPECIFIED, LOW, NORMAL, HIGH."""
DEFAULT_MAX_TOKENS = 256
MAX_CONSTRAINT_BYTES = 64 << 10
"""A JSON schema, regex or grammar, in UTF-8 bytes."""
MAX_SCHEMA_DEPTH = 32
"""Nesting of a JSON schema's JSON (objects and arrays): deeper is refused before any compiler sees it."""
MAX_CHOICES = 256
MAX_CHOICE_BYTES = 256
MAX_LOGIT_BIAS = 300
"""Entries of logit_bias (OpenAI's limit)."""
MAX_LOGIT_BIAS_VALUE = 100.0
CONSTRAINT_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
"""The arms of SamplingParameters' `constraint` oneof, in both protos."""
TENANT_HEADER = "x-meshserve-tenant"
"""Set by Envoy from the verified token's tenant claim (a client's own is removed at Envoy)."""
MAX_PRIORITY_HEADER = "x-meshserve-max-priority"
"""Set by Envoy from the token's max_priority claim: the highest priority the tenant may use."""
MODEL_VERSION_HEADER = "x-meshserve-model-version"
"""Set by a client: pins its request to a model version the router serves (services/router/rollout.py)."""


@dataclass(frozen=True)
class Constraint:
    """The structure an output must have: one arm of the protos' `constraint` oneof."""

    kind: str
    """One of CONSTRAINT_KINDS."""
    spec: str = ""
    """The JSON schema (JSON text), the regex or the Lark grammar; empty for json_object and choice."""
    choices: tuple[str, ...] = ()
    """The strings of a choice."""

    @property
    def field(self) -> str:
        """Its field in the public API, for violations."""
        return f"sampling.{self.kind}"


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. The defaults are what an unset proto field means."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    """0 decodes greedily."""
    top_p: float = 1.0
    seed: int | None = None
    top_k: int = 0
    """Keep only the k most likely tokens; 0 disables."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one; 0 disables."""
    repetition_penalty: float = 1.0
    """Divides positive (multiplies negative) logits of tokens seen in prompt or output; 1 disables."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit per time it was generated."""
    min_tokens: int = 0
    """Stop tokens are suppressed until this many tokens were generated."""
    logprobs: int | None = None
    """Return the chosen token's log-probability and this many top alternatives (None: none)."""
    prompt_logprobs: int | None = None
    """Return the log-probability of every prompt token after the first, with this many alternatives."""
    constraint: Constraint | None = None
    """Grammar-constrained decoding: the output's structure (None: free)."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits before sampling, sorted by token id."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_history(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


SAMPLING_SCALAR_FIELDS = tuple(f.name for f in fields(SamplingParams) if f.name not in ("constraint", "logit_bias"))
"""The scalar fields, read and written by name: the one list of them (the protos' SamplingParameters and the
OpenAI service's request fields use the same names)."""


def constraint_from_proto(message: Any) -> Constraint | None:
    """The `constraint` oneof of a `SamplingParameters` message (public or internal)."""
    kind = message.WhichOneof("constraint")
    if kind is None or (kind == "json_object" and not message.json_object):
        return None
    if kind == "choice":
        return Constraint(kind, choices=tuple(message.choice.choices))
    if kind == "json_object":
        return Constraint(kind)
    return Constraint(kind, getattr(message, kind))


def sampling_from_proto(message: Any, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> SamplingParams:
    """The parameters a `SamplingParameters` message (public or internal) asks for: unset fields
    take the defaults, `max_tokens` the server's `default_max_tokens`. Not validated yet."""
    values: dict[str, Any] = {"max_tokens": default_max_tokens}
    for name in SAMPLING_SCALAR_FIELDS:
        if message.HasField(name):
            values[name] = getattr(message, name)
    values["constraint"] = constraint_from_proto(message)
    values["logit_bias"] = tuple(sorted(message.logit_bias.items()))
    return SamplingParams(**values)


def sampling_to_proto(params: SamplingParams, message: Any) -> Any:
    """Sets every field of `message` (a `SamplingParameters`) from validated `params`."""
    for name in SAMPLING_SCALAR_FIELDS:
        value = getattr(params, name)
        if value is not None:
            setattr(message, name, value)
    constraint = params.constraint
    if constraint is not None:
        if constraint.kind == "choice":
            message.choice.choices.extend(constraint.choices)
        elif constraint.kind == "json_object":
            message.json_object = True
        else:
            setattr(message, constraint.kind, constraint.spec)
    for token, bias in params.logit_bias:
        message.logit_bias[token] = bias
    return message


def _json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion (a hostile schema may be deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_SCHEMA_DEPTH:
            return depth
        stack.extend((child, depth + 1) for child in children)
    return deepest


def validate_constraint(constraint: Constraint | None) -> None:
    """The size bounds of a constraint (its compilation, bounded in time, is the inference replica's):
    InvalidArgumentError naming `sampling.<kind>`."""
    if constraint is None:
        return
    field = constraint.field
    if constraint.kind not in CONSTRAINT_KINDS:
        raise InvalidArgumentError("sampling.constraint", f"unknown constraint {constraint.kind!r}")
    if constraint.kind == "choice":
        if not 1 <= len(constraint.choices) <= MAX_CHOICES:
            raise InvalidArgumentError(f"{field}.choices", f"must hold 1 to {MAX_CHOICES} strings")
        for i, choice in enumerate(constraint.choices):
            if not 1 <= len(choice.encode()) <= MAX_CHOICE_BYTES:
                raise InvalidArgumentError(f"{field}.choices[{i}]", f"must be 1 to {MAX_CHOICE_BYTES} bytes")
        return
    if constraint.kind == "json_object":
        return
    if not constraint.spec.strip():
        raise InvalidArgumentError(field, "must not be empty")
    if len(constraint.spec.encode()) > MAX_CONSTRAINT_BYTES:
        raise InvalidArgumentError(field, f"at most {MAX_CONSTRAINT_BYTES} bytes of UTF-8")
    if constraint.kind == "json_schema":
        try:
            schema = json.loads(constraint.spec)
        except (ValueError, RecursionError) as error:
            raise InvalidArgumentError(field, f"is not valid JSON: {str(error)[:120]}") from None
        if not isinstance(schema, dict | bool):
            raise InvalidArgumentError(field, "must be a JSON object (a JSON schema)")
        if _json_depth(schema) > MAX_SCHEMA_DEPTH:
            raise InvalidArgumentError(field, f"nests deeper than {MAX_SCHEMA_DEPTH} levels")


def validate_logit_bias(logit_bias: Sequence[tuple[int, float]], vocab_size: int) -> None:
    if len(logit_bias) > MAX_LOGIT_BIAS:
        raise InvalidArgumentError("sampling.logit_bias", f"at most {MAX_LOGIT_BIAS} entries, got {len(logit_bias)}")
    for token, bias in logit_bias:
        if not 0 <= token < vocab_size:
            raise InvalidArgumentError(
                "sampling.logit_bias", f"token id {token} is outside the vocabulary of {vocab_size}"
            )
        if not (math.isfinite(bias) and -MAX_LOGIT_BIAS_VALUE <= bias <= MAX_LOGIT_BIAS_VALUE):
            raise InvalidArgumentError(
                "sampling.logit_bias", f"the bias of token {token} must be in [-100, 100], got {bias}"
            )


def validate_sampling(params: SamplingParams, max_new_tokens: int) -> None:
    """Raises InvalidArgumentError naming the first invalid field (paths as in the public API)."""

    def check(ok: bool, name: str, rule: str) -> None:
        if not ok:
            raise InvalidArgumentError(f"sampling.{name}", f"{name} must be {rule}, got {getattr(params, name)}")

    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        check(math.isfinite(getattr(params, name)), name, "a finite number")
    check(1 <= params.max_tokens <= max_new_tokens, "max_tokens", f"in [1, {max_new_tokens}]")
    check(0 <= params.temperature <= MAX_TEMPERATURE, "temperature", f"in [0, {MAX_TEMPERATURE:g}] (0 is greedy)")
    check(0 < params.top_p <= 1, "top_p", "in (0, 1]")
    check(params.top_k >= 0, "top_k", ">= 0 (0 disables it)")
    check(0 <= params.min_p <= 1, "min_p", "in [0, 1]")
    check(
        MIN_REPETITION_PENALTY <= params.repetition_penalty <= MAX_REPETITION_PENALTY,
        "repetition_penalty",
        f"in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}] (1 disables it)",
    )
    check(
        -MAX_PENALTY <= params.presence_penalty <= MAX_PENALTY,
        "presence_penalty",
        f"in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]",
    )
    check(
        -MAX_PENALTY <= params.frequency_penalty <= MAX_PENALTY,
        "frequency_penalty",
        f"in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]",
    )
    check(0 <= params.min_tokens <= params.max_tokens, "min_tokens", "in [0, max_tokens]")
    for name in ("logprobs", "prompt_logprobs"):
        if getattr(params, name) is not None:
            check(0 <= getattr(params, name) <= MAX_LOGPROBS, name, f"in [0, {MAX_LOGPROBS}]")
    validate_constraint(params.constraint)


def request_id_or_new(request_id: str) -> str:
    """The client's request id after checking it, or a new one when it is empty."""
    if not request_id:
        return uuid.uuid4().hex
    if len(request_id) > MAX_REQUEST_ID_CHARS or not _REQUEST_ID.fullmatch(request_id):
        raise InvalidArgumentError(
            "request_id", f"must be at most {MAX_REQUEST_ID_CHARS} characters of A-Z, a-z, 0-9, '.', '_', ':', '-'"
        )
    return request_id


def validate_token_ids(ids: Sequence[int], vocab_size: int, field: str, limit: int | None = None) -> None:
    """Token ids inside the vocabulary, and at most `limit` of them."""
    if limit is not None and len(ids) > limit:
        raise InvalidArgumentError(field, f"at most {limit} token ids, got {len(ids)}")
    for token in ids:
        if not 0 <= token < vocab_size:
            raise InvalidArgumentError(field, f"token id {token} is outside the vocabulary of {vocab_size}")


def validate_stop_strings(stop: Sequence[str]) -> None:
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidArgumentError("sampling.stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    for text in stop:
        if not 1 <= len(text.encode()) <= MAX_STOP_BYTES:
            raise InvalidArgumentError("sampling.stop", f"each stop string must be 1 to {MAX_STOP_BYTES} bytes")


def validate_prompt_text(text: str, field: str) -> None:
    if not text.strip():
        raise InvalidArgumentError(field, "must not be empty")
    if len(text) > MAX_PROMPT_BYTES or len(text.encode()) > MAX_PROMPT_BYTES:
        raise InvalidArgumentError(field, f"at most {MAX_PROMPT_BYTES} bytes of UTF-8")


def validate_chat(messages: Sequence[tuple[str, str]], field: str = "chat.messages") -> None:
    """At least one and at most MAX_CHAT_MESSAGES turns of known roles, MAX_PROMPT_BYTES in all."""
    if not messages:
        raise InvalidArgumentError(field, "must hold at least one message")
    if len(messages) > MAX_CHAT_MESSAGES:
        raise InvalidArgumentError(field, f"at most {MAX_CHAT_MESSAGES} messages, got {len(messages)}")
    total = 0
    for i, (role, content) in enumerate(messages):
        if role not in CHAT_ROLES:
            raise InvalidArgumentError(f"{field}[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}")
        total += len(content.encode())
    if total > MAX_PROMPT_BYTES:
        raise InvalidArgumentError(field, f"the messages' contents may hold at most {MAX_PROMPT_BYTES} bytes of UTF-8")


def check_fits_context(num_bytes: int, max_token_bytes: int, max_tokens: int, field: str) -> None:
    """Refuses, without tokenizing, input of `num_bytes` that must have more than `max_tokens` tokens:
    no token covers more than `max_token_bytes` bytes."""
    at_least = -(-num_bytes // max_token_bytes)
    if at_least > max_tokens:
        raise InvalidArgumentError(
            field, f"the prompt has at least {at_least} tokens; the limit (max_context_tokens) is {max_tokens}"
        )


def validate_priority(priority: int) -> None:
    if priority not in PRIORITIES:
        raise InvalidArgumentError("priority", f"unknown priority {priority}")


def validate_model_name(requested: str, served: str) -> None:
    if len(requested) > MAX_MODEL_NAME_CHARS or (requested and requested.lower() != served.lower()):
        raise InvalidArgumentError("model", f"unknown model; this endpoint serves {served!r}")


@dataclass(frozen=True)
class EngineLimits:
    """What one inference engine can serve."""

    vocab_size: int
    max_context: int
    max_new_tokens: int


def validate_generation(
    limits: EngineLimits,
    prompt_token_ids: Sequence[int],
    params: SamplingParams,
    stop_token_ids: Sequence[int] = (),
    resumed_token_ids: Sequence[int] = (),
    priority: int = 0,
) -> None:
    """Everything an inference engine checks before it queues a request (the router has checked the
    public request already; this is the same contract, re-checked at the engine's boundary)."""
    if not prompt_token_ids:
        raise InvalidArgumentError("prompt_token_ids", "the prompt has no tokens")
    validate_token_ids(prompt_token_ids, limits.vocab_size, "prompt_token_ids")
    validate_token_ids(resumed_token_ids, limits.vocab_size, "resumed_token_ids")
    validate_token_ids(stop_token_ids, limits.vocab_size, "stop_token_ids", MAX_ENGINE_STOP_TOKEN_IDS)
    validate_priority(priority)
    validate_sampling(params, limits.max_new_tokens)
    validate_logit_bias(params.logit_bias, limits.vocab_size)
    if len(resumed_token_ids) >= params.max_tokens:
        raise InvalidArgumentError(
            "resumed_token_ids",
            f"{len(resumed_token_ids)} resumed tokens leave nothing to generate under max_tokens ({params.max_tokens})",
        )
    if len(prompt_token_ids) + params.max_tokens > limits.max_context:
        raise InvalidArgumentError(
            "sampling.max_tokens",
            f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context of "
            f"{limits.max_context} tokens",
        )


MAX_VERSION_NAME = 63
"""A version name is a DNS label's length at most, of lowercase letters, digits, '.', '_' and '-'."""

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-")


def check_version_name(name: str, field: str) -> str:
    """`name` when it is a well-formed version name; InvalidArgumentError naming `field` otherwise."""
    if not name or len(name) > MAX_VERSION_NAME or not set(name) <= _NAME_CHARS or not name[0].isalnum():
        raise InvalidArgumentError(
            field,
            f"{name[:80]!r} is not a version name: 1 to {MAX_VERSION_NAME} lowercase letters, digits, '.', '_' "
            "or '-', starting with a letter or digit",
        )
    return name
