"""Hostile requests for the fuzz tests of issue 11, and what the request contract says of each.

Hypothesis strategies draw public (meshserve.v1), inference and tokenizer requests over every field with
extreme values: NaN, +-inf, -0, denormals, float32 max and the neighbours of each bound; int32, uint32 and
uint64 extremes; empty, huge and odd Unicode strings; every oneof arm and none; unknown enum values; and,
on the wire, unknown fields, a second oneof arm and a duplicated sub-message (protobuf merges them).
They are drawn as wire bytes, so the request a server sees is the one the oracle reads back.

The oracles (`public_expectation`, `inference_expectation`, `encode_expectation`) restate the bounds that
services/common/contract.py documents, independently of it: a bound the services get wrong fails the tests.
They say whether a request must be refused, and which fields an INVALID_ARGUMENT may name. Where the
outcome depends on something the oracle does not compute (how many tokens a text has), the request may be
accepted or refused naming the fields listed, but no other outcome passes.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import re
import struct
from dataclasses import dataclass

import grpc
import numpy as np
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import strategies as st

from meshserve.inference.v1 import inference_service_pb2 as inference_pb
from meshserve.tokenizer.v1 import tokenizer_service_pb2 as tokenizer_pb
from meshserve.v1 import generation_service_pb2 as pb

# --- the contract's numbers (README's API section; services/common/contract.py) ---
MODEL = "SmolLM2-135M-Instruct"
VOCAB = 49152
CONTEXT = 2048
MAX_NEW_TOKENS = 1024
DEFAULT_MAX_TOKENS = 256
MAX_TEXT_BYTES = 1 << 20
MAX_MODEL_CHARS = 256
MAX_MESSAGES = 256
ROLES = ("system", "user", "assistant", "tool")
MAX_STOP = 8
MAX_STOP_BYTES = 64
MAX_STOP_IDS = 64
MAX_INTERNAL_STOP_IDS = 72  # the client's 64 and the model's end-of-sequence ids
MAX_LOGPROBS = 20
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{0,128}")
ENVOY_MAX_REQUEST_BYTES = 1 << 20  # the gRPC frame (5 bytes + message) Envoy's buffer filter holds
GRPC_MAX_MESSAGE_BYTES = 4 << 20  # services/common/server.py
LONGEST_TOKEN_BYTES = 81  # SmolLM2's longest token ("\n" and 80 spaces): tokens >= bytes / 81

OK_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
HOST_PORT = re.compile(r"(\b\d{1,3}(\.\d{1,3}){3}|localhost|\[[0-9a-fA-F:]+\]):\d{2,5}\b")


# --- wire encoding, for what the generated classes cannot express ---
def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def length_delimited(number: int, payload: bytes) -> bytes:
    return tag(number, 2) + varint(len(payload)) + payload


# --- value pools ---
def _f32(x: float) -> float:
    return float(np.float32(x))


def _next32(x: float, toward: float) -> float:
    return float(np.nextafter(np.float32(x), np.float32(toward)))


INT32 = [-(2**31), -(2**31) + 1, -2, -1, 0, 1, 2, 2**31 - 1]
UINT32 = [0, 1, 2, VOCAB - 1, VOCAB, VOCAB + 1, 2**31 - 1, 2**31, 4_000_000_000, 2**32 - 1]
UINT64 = [0, 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
FLOAT_BOUNDS = [0.0, 0.01, 1.0, 2.0, -2.0, 20.0, 100.0]
FLOATS = sorted(
    {
        math.nan,
        math.inf,
        -math.inf,
        -0.0,
        1e-45,
        -1e-45,
        1.1754944e-38,
        3.4028234663852886e38,
        -3.4028234663852886e38,
        0.5,
        -1.0,
        1e10,
        -1e10,
    }
    | {_f32(b) for b in FLOAT_BOUNDS}
    | {_next32(b, math.inf) for b in FLOAT_BOUNDS}
    | {_next32(b, -math.inf) for b in FLOAT_BOUNDS},
    key=lambda x: (math.isnan(x), x),
)
ODD = [
    "",
    " ",
    "\t\n ",
    "\x00",
    "\x7f",
    "\u200b",
    "\u202e",
    "\ufeff",
    "\uffff",
    "\U0010ffff",
    "\U000e0001",
    "e\u0301",
    "\u0130",
    "\u1680",
    "\u3000",
    "\u2028",
    "😀",
    "👩‍👩‍👧",
    "世界",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "{{ 7 * 7 }}",
    "{% for x in range(99999999) %}x{% endfor %}",
    "%s%n%x",
    "../../etc/passwd",
    "\\",
    "\"'",
]
# strings and their repeat counts, for huge values: the repeat is cheap to draw, the bytes are real
UNITS = ["a", "é", "😀", " ", "hello world ", "\n" + " " * 80, "#" * 80, "<|im_start|>"]
HUGE_BYTES = [
    65,
    129,
    257,
    4_096,
    100_000,
    165_000,
    170_000,
    500_000,
    1_000_000,
    (1 << 20) - 64,
    1 << 20,
    (1 << 20) + 1,
]
SHORT_PROMPTS = [
    "Hello",
    "Once upon a time",
    "What is 2+2?",
    "Name a color.",
    "The weather today",
    "Say hi.",
    "Write a haiku about rain.",
    "1, 2, 3,",
]

utf8_text = st.text(st.characters(codec="utf-8"), max_size=24)  # proto strings are UTF-8: no lone surrogates
odd_strings = st.one_of(st.sampled_from(ODD), utf8_text)


@st.composite
def huge_strings(draw) -> str:
    unit = draw(st.sampled_from(UNITS))
    size = draw(st.sampled_from(HUGE_BYTES))
    return unit * max(1, size // len(unit.encode()))


hostile_strings = st.one_of(odd_strings, huge_strings())
hostile_floats = st.one_of(st.sampled_from(FLOATS), st.floats(width=32))
hostile_int32 = st.one_of(
    st.sampled_from(INT32 + [20, 21, 256, 1023, 1024, 1025, 2047, 2048]), st.integers(-(2**31), 2**31 - 1)
)
hostile_uint32 = st.one_of(
    st.sampled_from(UINT32 + [20, 21, 256, 1023, 1024, 1025, 2047, 2048]), st.integers(0, 2**32 - 1)
)
hostile_token = st.one_of(st.sampled_from(UINT32), st.integers(0, VOCAB - 1), st.integers(0, 2**32 - 1))
valid_token = st.integers(3, VOCAB - 1)  # not an end-of-sequence or padding id: accepted prompts run


@st.composite
def hostile_token_lists(draw, lengths=(0, 1, 2, 3, 7, 63, 64, 65, 72, 73, 2047, 2048, 5000)) -> list[int]:
    """Short lists of any ids, or long lists of one valid id with at most one extreme in them."""
    if draw(st.booleans()):
        return draw(st.lists(hostile_token, max_size=8))
    ids = [draw(valid_token)] * draw(st.sampled_from(lengths))
    if ids and draw(st.booleans()):
        ids[draw(st.integers(0, len(ids) - 1))] = draw(hostile_token)
    return ids


@st.composite
def request_ids(draw, hostile: bool) -> str:
    if not hostile:
        return draw(st.one_of(st.just(""), st.from_regex(r"[A-Za-z0-9._:-]{1,40}", fullmatch=True)))
    return draw(
        st.one_of(
            st.sampled_from(["a" * 128, "a" * 129, "r" * 100_000, "id with space", "é", "a\n", "a/b", "..", "-", ":"]),
            hostile_strings,
        )
    )


@st.composite
def _hostile_fields(draw, fields: list[str]) -> set[str]:
    """Which fields get extreme values: none in about one request of six (those are served, and
    cost an accepted stream each), else one to three (names listed more than once are drawn more often)."""
    k = draw(st.sampled_from([0, 1, 1, 1, 2, 2, 3]))
    return set(draw(st.lists(st.sampled_from(fields), min_size=k, max_size=k)))


# --- public requests ---
PUBLIC_FIELDS = [
    "model",
    "input",
    "input",
    "input",
    "request_id",
    "priority",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    "stop_token_ids",
    "min_tokens",
    "logprobs",
    "prompt_logprobs",
    "wire",
]
SAMPLING_FLOATS = ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"]
SAMPLING_INTS = ["max_tokens", "top_k", "min_tokens", "logprobs", "prompt_logprobs"]


@st.composite
def _benign_sampling(draw, message, max_tokens_field: str = "max_tokens") -> None:
    """Valid values or none, a few at a time; max_tokens small so accepted requests are cheap."""
    if draw(st.booleans()):
        setattr(message, max_tokens_field, draw(st.integers(1, 12)))
    if draw(st.booleans()):
        message.temperature = draw(st.sampled_from([0.0, 0.0, 0.7, 1.0, 1.5]))
    if draw(st.integers(0, 3)) == 0:
        message.top_p = draw(st.sampled_from([0.1, 0.9, 1.0]))
    if draw(st.integers(0, 3)) == 0:
        message.top_k = draw(st.sampled_from([0, 1, 40]))
    if draw(st.integers(0, 3)) == 0:
        message.min_p = draw(st.sampled_from([0.0, 0.05, 1.0]))
    if draw(st.integers(0, 3)) == 0:
        message.repetition_penalty = draw(st.sampled_from([1.0, 1.2, 0.5]))
    if draw(st.integers(0, 3)) == 0:
        message.presence_penalty = draw(st.sampled_from([-2.0, 0.5, 2.0]))
    if draw(st.integers(0, 3)) == 0:
        message.frequency_penalty = draw(st.sampled_from([-2.0, 0.5, 2.0]))
    if draw(st.integers(0, 3)) == 0:
        message.seed = draw(st.integers(0, 2**64 - 1))
    if draw(st.integers(0, 4)) == 0:
        message.logprobs = draw(st.integers(0, MAX_LOGPROBS))
    if draw(st.integers(0, 4)) == 0:
        message.prompt_logprobs = draw(st.integers(0, 3))


@st.composite
def _chat(draw, message_cls, hostile: bool):
    if not hostile:
        n = draw(st.integers(1, 3))
        roles = draw(st.lists(st.sampled_from(ROLES), min_size=n, max_size=n))
        return [message_cls(role=r, content=draw(st.sampled_from(SHORT_PROMPTS))) for r in roles]
    n = draw(st.sampled_from([0, 1, 2, 3, 255, 256, 257, 1000, 20_000]))
    role = draw(
        st.one_of(st.sampled_from(ROLES), st.sampled_from(["", "User", "function", "wizard", "system "]), odd_strings)
    )
    # contents huge alone, or 4 kB x 256 (1 MiB in all), or tiny x 20,000: never past a few MB in all
    content = draw(
        st.one_of(st.sampled_from(SHORT_PROMPTS), odd_strings, huge_strings())
        if n <= 3
        else st.one_of(st.sampled_from(["", "hi", "x" * 4000] if n <= 257 else ["", "hi"]), odd_strings)
    )
    messages = [message_cls(role=role, content=content) for _ in range(n)]
    if n and draw(st.booleans()):  # one message unlike the others
        messages[draw(st.integers(0, n - 1))] = message_cls(
            role=draw(st.one_of(st.sampled_from(ROLES), odd_strings)), content=draw(hostile_strings)
        )
    return messages


@st.composite
def _wire_extra(draw, sampling_number: int, prompt_number: int | None) -> bytes:
    """Well-formed protobuf a generated class would not write: unknown fields of every wire type, a
    repeated oneof arm (the last wins), a second sampling sub-message (merged into the first)."""
    kind = draw(st.sampled_from(["varint", "bytes", "fixed32", "fixed64", "group", "max_number", "arm", "sampling"]))
    if kind == "varint":
        return tag(15, 0) + varint(draw(st.sampled_from(UINT64)))
    if kind == "bytes":
        return length_delimited(1000, b"x" * draw(st.sampled_from([0, 10, 100_000])))
    if kind == "fixed32":
        return tag(16, 5) + struct.pack("<f", math.nan)
    if kind == "fixed64":
        return tag(17, 1) + struct.pack("<d", -math.inf)
    if kind == "group":
        return tag(18, 3) + tag(1, 0) + varint(7) + tag(18, 4)
    if kind == "max_number":
        return tag(2**29 - 1, 0) + varint(1)
    if kind == "arm" and prompt_number is not None:
        return length_delimited(prompt_number, draw(st.sampled_from(SHORT_PROMPTS + [""])).encode())
    # a second sampling message: temperature (field 2, float) set once more
    return length_delimited(sampling_number, tag(2, 5) + struct.pack("<f", draw(hostile_floats)))


@st.composite
def public_requests(draw) -> bytes:
    """A meshserve.v1.GenerateRequest as wire bytes: a few fields (often none) hostile, the rest benign."""
    hostile = draw(_hostile_fields(PUBLIC_FIELDS))
    request = pb.GenerateRequest()
    request.model = draw(hostile_strings if "model" in hostile else st.sampled_from(["", "", MODEL, MODEL.upper()]))
    arm = draw(
        st.sampled_from(
            ["none", "prompt", "chat", "token_ids"] if "input" in hostile else ["prompt", "chat", "token_ids"]
        )
    )
    if arm == "prompt":
        request.prompt = draw(hostile_strings if "input" in hostile else st.sampled_from(SHORT_PROMPTS))
    elif arm == "chat":
        request.chat.messages.extend(draw(_chat(pb.ChatMessage, "input" in hostile)))
    elif arm == "token_ids":
        ids = draw(hostile_token_lists() if "input" in hostile else st.lists(valid_token, min_size=1, max_size=8))
        request.token_ids.ids.extend(ids)
    request.request_id = draw(request_ids("request_id" in hostile))
    request.priority = draw(hostile_int32 if "priority" in hostile else st.sampled_from([0, 1, 2, 3]))
    request.no_cache = draw(st.booleans())
    s = request.sampling
    draw(_benign_sampling(s))
    for name in SAMPLING_INTS:
        if name in hostile:
            setattr(s, name, draw(hostile_int32))
    for name in SAMPLING_FLOATS:
        if name in hostile:
            setattr(s, name, draw(hostile_floats))
    if "seed" in hostile:
        s.seed = draw(st.sampled_from(UINT64))
    if "stop" in hostile:
        s.stop.extend(
            draw(
                st.one_of(
                    st.lists(
                        st.one_of(odd_strings, st.sampled_from(["a" * 64, "a" * 65, "é" * 32, "é" * 33, "😀" * 17])),
                        max_size=10,
                    ),
                    st.sampled_from([["x"] * 8, ["x"] * 9, ["x"] * 10_000]),
                )
            )
        )
    elif draw(st.integers(0, 5)) == 0:
        s.stop.append(draw(st.sampled_from([".", "\n\n", "Paris"])))
    if "stop_token_ids" in hostile:
        s.stop_token_ids.extend(draw(hostile_token_lists(lengths=(0, 1, 63, 64, 65, 100_000))))
    elif draw(st.integers(0, 5)) == 0:
        s.stop_token_ids.append(draw(valid_token))
    wire = request.SerializeToString()
    if "wire" in hostile:
        wire += draw(_wire_extra(sampling_number=5, prompt_number=2))
    return wire


@dataclass(frozen=True)
class Expectation:
    """What the contract says of one request."""

    refuse: bool
    """The request must not be served."""
    fields: frozenset[str]
    """An INVALID_ARGUMENT must name one of these (and only a request that may be refused has any)."""
    too_large: bool | None = False
    """The message is past a size limit in front of the validation (RESOURCE_EXHAUSTED); None: at the limit."""
    reasons: tuple[str, ...] = ()


class _Rules:
    def __init__(self) -> None:
        self.must: set[str] = set()
        self.may: set[str] = set()
        self.reasons: list[str] = []

    def bad(self, field: str, why: str) -> None:
        self.must.add(field)
        self.reasons.append(f"{field}: {why}")

    def maybe(self, *fields: str) -> None:
        self.may.update(fields)

    def refuse_naming(self, fields: tuple[str, ...], why: str) -> None:
        """Must be refused, naming any of `fields`."""
        self.must.add(fields[0])
        self.may.update(fields)
        self.reasons.append(f"{'/'.join(fields)}: {why}")

    def expectation(self, too_large: bool | None = False) -> Expectation:
        return Expectation(bool(self.must), frozenset(self.must | self.may), too_large, tuple(self.reasons))


def _sampling_rules(rules: _Rules, s, max_new_tokens: int, prefix: str = "sampling.") -> int | None:
    """Checks the sampling fields shared by the public and the internal message; returns the
    effective max_tokens when it is valid."""
    max_tokens = s.max_tokens if s.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    max_ok = 1 <= max_tokens <= max_new_tokens
    if not max_ok:
        rules.bad(prefix + "max_tokens", f"{max_tokens} not in [1, {max_new_tokens}]")
    bounds = {
        "temperature": (0, 100, False, 1.0),
        "top_p": (0, 1, True, 1.0),
        "min_p": (0, 1, False, 0.0),
        "repetition_penalty": (0.01, 100, False, 1.0),
        "presence_penalty": (-2, 2, False, 0.0),
        "frequency_penalty": (-2, 2, False, 0.0),
    }
    for name, (low, high, open_low, default) in bounds.items():
        value = getattr(s, name) if s.HasField(name) else default
        if name == "repetition_penalty" and abs(value - 0.01) < 1e-7:
            rules.maybe(prefix + name)  # float32(0.01) is just below 0.01: either reading is fair
            continue
        if not math.isfinite(value) or value > high or value < low or (open_low and value == low):
            rules.bad(prefix + name, f"{value} not in {'(' if open_low else '['}{low}, {high}]")
    top_k = s.top_k if s.HasField("top_k") else 0
    if top_k < 0:
        rules.bad(prefix + "top_k", f"{top_k} < 0")
    min_tokens = s.min_tokens if s.HasField("min_tokens") else 0
    if min_tokens < 0 or (max_ok and min_tokens > max_tokens):
        rules.bad(prefix + "min_tokens", f"{min_tokens} not in [0, max_tokens]")
    elif not max_ok:
        rules.maybe(prefix + "min_tokens")
    for name in ("logprobs", "prompt_logprobs"):
        if s.HasField(name) and not 0 <= getattr(s, name) <= MAX_LOGPROBS:
            rules.bad(prefix + name, f"{getattr(s, name)} not in [0, {MAX_LOGPROBS}]")
    return max_tokens if max_ok else None


def _context_rules(
    rules: _Rules, fields: tuple[str, ...], low: int, high: int, max_tokens: int | None, context: int = CONTEXT
) -> None:
    """The prompt has between `low` and `high` tokens: it must fit the context with max_tokens."""
    if max_tokens is None:
        rules.maybe(*fields)
    elif low >= context or low + max_tokens > context:
        rules.refuse_naming(fields, f"at least {low} prompt tokens + {max_tokens} > {context}")
    elif high + max_tokens > context:
        rules.maybe(*fields)


def _text_token_bounds(n_bytes: int) -> tuple[int, int]:
    """Every token is 1..LONGEST_TOKEN_BYTES bytes of text."""
    return -(-n_bytes // LONGEST_TOKEN_BYTES), n_bytes


def _envoy_size(wire: bytes) -> bool | None:
    size = len(wire) + 5
    return True if size > ENVOY_MAX_REQUEST_BYTES + 32 else None if size > ENVOY_MAX_REQUEST_BYTES - 32 else False


def _model_rules(rules: _Rules, model: str) -> None:
    if model and model.lower() != MODEL.lower():
        rules.bad("model", "not the served model")


def _text_input_rules(rules: _Rules, r, max_tokens: int | None, context_fields: dict[str, tuple[str, ...]]) -> None:
    """The prompt or chat arm of a GenerateRequest or TokenizeRequest; `context_fields` names what a
    refusal for the context may name, per arm (none: the context is not checked)."""
    arm = r.WhichOneof("input")
    if arm is None:
        rules.bad("input", "no input")
    elif arm == "prompt":
        n_bytes = len(r.prompt.encode())
        if not r.prompt.strip():
            rules.bad("prompt", "empty or whitespace")
        elif n_bytes > MAX_TEXT_BYTES:
            rules.bad("prompt", f"{n_bytes} bytes > {MAX_TEXT_BYTES}")
        elif "prompt" in context_fields:
            _context_rules(rules, context_fields["prompt"], *_text_token_bounds(n_bytes), max_tokens)
    elif arm == "chat":
        messages = r.chat.messages
        content = sum(len(m.content.encode()) for m in messages)
        if not messages or len(messages) > MAX_MESSAGES:
            rules.bad("chat.messages", f"{len(messages)} messages, 1..{MAX_MESSAGES}")
        if content > MAX_TEXT_BYTES:
            rules.bad("chat.messages", f"{content} bytes of content > {MAX_TEXT_BYTES}")
        roles_ok = True
        for i, m in enumerate(messages):
            if m.role not in ROLES:  # a refusal may name any bad role; the first is reason enough
                if roles_ok:
                    rules.bad(f"chat.messages[{i}].role", f"role {m.role[:20]!r}")
                rules.maybe(f"chat.messages[{i}].role")
                roles_ok = False
        if (
            messages
            and len(messages) <= MAX_MESSAGES
            and content <= MAX_TEXT_BYTES
            and roles_ok
            and "chat" in context_fields
        ):
            # the template adds at most ~24 bytes a message, a system prompt and the generation prompt
            low = -(-sum(len(m.content.encode()) + len(m.role) for m in messages) // LONGEST_TOKEN_BYTES)
            high = sum(len(m.content.encode()) + len(m.role) + 32 for m in messages) + 160
            _context_rules(rules, context_fields["chat"], low, high, max_tokens)


def public_expectation(wire: bytes) -> Expectation:
    r = pb.GenerateRequest.FromString(wire)
    rules = _Rules()
    _model_rules(rules, r.model)
    max_tokens = _sampling_rules(rules, r.sampling, MAX_NEW_TOKENS)
    s = r.sampling
    if len(s.stop) > MAX_STOP or any(not 1 <= len(x.encode()) <= MAX_STOP_BYTES for x in s.stop):
        rules.bad("sampling.stop", f"{len(s.stop)} stop strings, at most {MAX_STOP} of 1..{MAX_STOP_BYTES} bytes")
    if len(s.stop_token_ids) > MAX_STOP_IDS or any(t >= VOCAB for t in s.stop_token_ids):
        rules.bad("sampling.stop_token_ids", f"{len(s.stop_token_ids)} ids, at most {MAX_STOP_IDS}, each < {VOCAB}")
    if not REQUEST_ID.fullmatch(r.request_id):
        rules.bad("request_id", f"{len(r.request_id)} characters, not [A-Za-z0-9._:-]{{0,128}}")
    if not 0 <= r.priority <= 3:
        rules.bad("priority", f"unknown priority {r.priority}")
    if r.WhichOneof("input") == "token_ids":
        ids = r.token_ids.ids
        if not ids or any(t >= VOCAB for t in ids):
            rules.bad("token_ids.ids", f"{len(ids)} ids, each < {VOCAB}")
        if len(ids) >= CONTEXT:
            rules.bad("token_ids", f"{len(ids)} ids >= {CONTEXT}")
        elif ids and all(t < VOCAB for t in ids):
            _context_rules(rules, ("token_ids", "sampling.max_tokens"), len(ids), len(ids), max_tokens)
    else:
        _text_input_rules(
            rules,
            r,
            max_tokens,
            {"prompt": ("prompt", "sampling.max_tokens"), "chat": ("chat", "chat.messages", "sampling.max_tokens")},
        )
    return rules.expectation(_envoy_size(wire))


# --- the public Tokenize and Abort ---
@st.composite
def tokenize_requests(draw) -> bytes:
    hostile = draw(_hostile_fields(["model", "input", "input", "wire"]))
    request = pb.TokenizeRequest()
    request.model = draw(hostile_strings if "model" in hostile else st.sampled_from(["", MODEL]))
    arm = draw(st.sampled_from(["none", "prompt", "chat"] if "input" in hostile else ["prompt", "chat"]))
    if arm == "prompt":
        request.prompt = draw(hostile_strings if "input" in hostile else st.sampled_from(SHORT_PROMPTS))
    elif arm == "chat":
        request.chat.messages.extend(draw(_chat(pb.ChatMessage, "input" in hostile)))
    wire = request.SerializeToString()
    if "wire" in hostile:
        wire += draw(_wire_extra(sampling_number=5, prompt_number=2))
    return wire


def tokenize_expectation(wire: bytes) -> Expectation:
    """Tokenize checks its input as Generate does; past the context it may answer the count or refuse."""
    r = pb.TokenizeRequest.FromString(wire)
    rules = _Rules()
    _model_rules(rules, r.model)
    _text_input_rules(rules, r, None, {"prompt": ("prompt",), "chat": ("chat", "chat.messages")})
    return rules.expectation(_envoy_size(wire))


@st.composite
def abort_requests(draw) -> bytes:
    wire = pb.AbortRequest(request_id=draw(request_ids(draw(st.booleans())))).SerializeToString()
    if draw(st.booleans()):
        wire += draw(_wire_extra(sampling_number=5, prompt_number=None))
    return wire


def abort_expectation(wire: bytes) -> Expectation:
    """An id to abort must be a request id; one that names no running request of the caller is not an error."""
    r = pb.AbortRequest.FromString(wire)
    rules = _Rules()
    if not r.request_id or not REQUEST_ID.fullmatch(r.request_id):
        rules.bad("request_id", f"{len(r.request_id)} characters, not [A-Za-z0-9._:-]{{1,128}}")
    return rules.expectation(_envoy_size(wire))


# --- internal inference requests ---
INFERENCE_FIELDS = [
    "request_id",
    "prompt_token_ids",
    "prompt_token_ids",
    "resumed_token_ids",
    "stop_token_ids",
    "priority",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "min_tokens",
    "logprobs",
    "prompt_logprobs",
    "wire",
]


@st.composite
def inference_requests(draw) -> bytes:
    """A meshserve.inference.v1.GenerateRequest as wire bytes, as a router (or anyone reaching the
    replica's port) could send it."""
    hostile = draw(_hostile_fields(INFERENCE_FIELDS))
    r = inference_pb.GenerateRequest()
    r.request_id = draw(request_ids("request_id" in hostile))
    r.prompt_token_ids.extend(
        draw(
            hostile_token_lists(lengths=(0, 1, 2, 5, 255, 256, 511, 512, 513, 5000))
            if "prompt_token_ids" in hostile
            else st.lists(valid_token, min_size=1, max_size=8)
        )
    )
    if "resumed_token_ids" in hostile:
        r.resumed_token_ids.extend(draw(hostile_token_lists(lengths=(0, 1, 2, 11, 12, 255, 256, 257))))
    elif draw(st.integers(0, 3)) == 0:
        r.resumed_token_ids.extend(draw(st.lists(valid_token, max_size=2)))
    if "stop_token_ids" in hostile:
        r.stop_token_ids.extend(draw(hostile_token_lists(lengths=(0, 1, 71, 72, 73, 100_000))))
    else:
        r.stop_token_ids.append(2)
    r.priority = draw(hostile_int32 if "priority" in hostile else st.sampled_from([0, 1, 2, 3]))
    s = r.sampling
    draw(_benign_sampling(s))
    if not s.HasField("max_tokens") and "max_tokens" not in hostile and draw(st.integers(0, 3)):
        s.max_tokens = draw(
            st.integers(min(len(r.resumed_token_ids) + 1, 12), 12)
        )  # cheap when accepted; else the default
    for name in SAMPLING_INTS:
        if name in hostile:
            setattr(s, name, draw(hostile_uint32))
    for name in SAMPLING_FLOATS:
        if name in hostile:
            setattr(s, name, draw(hostile_floats))
    if "seed" in hostile:
        s.seed = draw(st.sampled_from(UINT64))
    wire = r.SerializeToString()
    if "wire" in hostile:
        wire += draw(_wire_extra(sampling_number=3, prompt_number=None))
    return wire


def inference_expectation(wire: bytes, max_context: int, max_new_tokens: int) -> Expectation:
    r = inference_pb.GenerateRequest.FromString(wire)
    rules = _Rules()
    max_tokens = _sampling_rules(rules, r.sampling, max_new_tokens)
    if not REQUEST_ID.fullmatch(r.request_id):
        rules.bad("request_id", f"{len(r.request_id)} characters, not [A-Za-z0-9._:-]{{0,128}}")
    if not 0 <= r.priority <= 3:
        rules.bad("priority", f"priority {r.priority}")
    prompt = r.prompt_token_ids
    if not prompt or any(t >= VOCAB for t in prompt):
        rules.bad("prompt_token_ids", f"{len(prompt)} ids, each < {VOCAB}")
    resumed = r.resumed_token_ids
    if any(t >= VOCAB for t in resumed) or (max_tokens is not None and len(resumed) >= max_tokens):
        rules.bad("resumed_token_ids", f"{len(resumed)} ids, each < {VOCAB}, fewer than max_tokens")
    elif max_tokens is None and resumed:
        rules.maybe("resumed_token_ids")
    if len(r.stop_token_ids) > MAX_INTERNAL_STOP_IDS or any(t >= VOCAB for t in r.stop_token_ids):
        rules.bad("stop_token_ids", f"{len(r.stop_token_ids)} ids, at most {MAX_INTERNAL_STOP_IDS}, each < {VOCAB}")
    if prompt:
        _context_rules(
            rules, ("prompt_token_ids", "sampling.max_tokens"), len(prompt), len(prompt), max_tokens, max_context
        )
    too_large = len(wire) > GRPC_MAX_MESSAGE_BYTES
    return rules.expectation(too_large)


# --- tokenizer requests ---
@st.composite
def encode_requests(draw) -> bytes:
    hostile = draw(_hostile_fields(["input", "input", "max_tokens", "wire"]))
    r = tokenizer_pb.EncodeRequest()
    arm = draw(st.sampled_from(["none", "text", "chat"] if "input" in hostile else ["text", "chat"]))
    if arm == "text":
        r.text = draw(hostile_strings if "input" in hostile else st.sampled_from(SHORT_PROMPTS))
    elif arm == "chat":
        r.chat.messages.extend(draw(_chat(tokenizer_pb.ChatMessage, "input" in hostile)))
    if "max_tokens" in hostile:
        r.max_tokens = draw(hostile_uint32)
    elif draw(st.booleans()):
        r.max_tokens = draw(st.sampled_from([CONTEXT - 1, CONTEXT - DEFAULT_MAX_TOKENS]))
    wire = r.SerializeToString()
    if "wire" in hostile:
        wire += draw(_wire_extra(sampling_number=1000, prompt_number=1))
    return wire


def encode_expectation(wire: bytes) -> Expectation:
    r = tokenizer_pb.EncodeRequest.FromString(wire)
    rules = _Rules()
    limit = r.max_tokens if r.HasField("max_tokens") else None
    arm = r.WhichOneof("input")

    def bounded(fields: tuple[str, ...], low: int, high: int) -> None:
        if limit is None:
            return
        if limit == 0:  # "more than 0 tokens" is every input, or a limit of none: the contract does not say
            rules.maybe(*fields)
        elif low > limit:
            rules.refuse_naming(fields, f"at least {low} tokens > max_tokens {limit}")
        elif high > limit:
            rules.maybe(*fields)  # refused when tokenizing shows it, or returned: either keeps the promise

    if arm is None:
        rules.bad("input", "no input")
    elif arm == "text":
        n_bytes = len(r.text.encode())
        if not r.text:
            rules.bad("text", "empty")
        elif n_bytes > MAX_TEXT_BYTES:
            rules.bad("text", f"{n_bytes} bytes > {MAX_TEXT_BYTES}")
        else:
            if not r.text.strip():
                rules.maybe("text")
            bounded(("text",), *_text_token_bounds(n_bytes))
    else:
        messages = r.chat.messages
        content = sum(len(m.content.encode()) for m in messages)
        if not messages or len(messages) > MAX_MESSAGES:
            rules.bad("chat.messages", f"{len(messages)} messages, 1..{MAX_MESSAGES}")
        if content > MAX_TEXT_BYTES:
            rules.maybe("chat.messages", "chat")
        roles_ok = True
        for i, m in enumerate(messages):
            if m.role not in ROLES:  # a refusal may name any bad role; the first is reason enough
                if roles_ok:
                    rules.bad(f"chat.messages[{i}].role", f"role {m.role[:20]!r}")
                rules.maybe(f"chat.messages[{i}].role")
                roles_ok = False
        if messages and len(messages) <= MAX_MESSAGES and roles_ok:
            low = -(-sum(len(m.content.encode()) + len(m.role) for m in messages) // LONGEST_TOKEN_BYTES)
            high = sum(len(m.content.encode()) + len(m.role) + 32 for m in messages) + 160
            bounded(("chat", "chat.messages"), low, high)
    return rules.expectation(len(wire) > GRPC_MAX_MESSAGE_BYTES)


decode_ids = hostile_token_lists(lengths=(0, 1, 2, 100, 100_000))
# DecodeStream holds back ids until they complete a character, and decodes what it holds at each step:
# n ids that never complete one cost O(n^2) or worse (8,000 of id 231 take 40 s), so the fuzz stays at
# what one generation can produce
decode_stream_ids = hostile_token_lists(lengths=(0, 1, 2, 100, 1024))


def decode_expectation(ids: list[int]) -> Expectation:
    """Decode and DecodeStream: every id inside the vocabulary."""
    rules = _Rules()
    if any(t >= VOCAB for t in ids):
        rules.bad("ids", f"an id >= {VOCAB}")
    return rules.expectation()


# --- outcomes ---
@dataclass
class Outcome:
    """How one fuzzed call ended."""

    code: grpc.StatusCode
    details: str = ""
    field: str | None = None
    retry_info: bool = False
    latency_s: float = 0.0
    accepted: bool = False
    """The call streamed a response before it ended or was cancelled."""
    late_error: grpc.StatusCode | None = None
    """A status other than OK that ended an accepted stream before the client cancelled it."""
    notes: list[str] = dataclasses.field(default_factory=list)


def outcome_of_error(error: grpc.RpcError, latency_s: float) -> Outcome:
    outcome = Outcome(error.code(), error.details() or "", latency_s=latency_s)
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # the details disagree with the status line: say so, do not crash
        outcome.notes.append("grpc-status-details-bin does not match the status")
        status = None
    for detail in status.details if status else []:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad) and bad.field_violations and outcome.field is None:
            outcome.field = bad.field_violations[0].field
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            outcome.retry_info = True
    return outcome


def names(reported: str | None, allowed: frozenset[str]) -> bool:
    """`reported` is one of `allowed`, or an element of one ("sampling.stop[3]" of "sampling.stop")."""
    if reported is None:
        return False
    if reported in allowed:
        return True
    base = re.fullmatch(r"(.*)\[\d+\]", reported)
    return base is not None and base.group(1) in allowed


def problems(expect: Expectation, outcome: Outcome, retry_info_on_overload: bool = True) -> list[str]:
    """What is wrong with `outcome` for a request the contract judges as `expect` (empty: nothing)."""
    found: list[str] = list(outcome.notes)
    code = outcome.code
    if code not in OK_CODES:
        found.append(f"ended {code.name}: {outcome.details[:200]!r}")
    if outcome.late_error is not None:
        found.append(
            f"accepted, then ended {outcome.late_error.name} before the client cancelled: {outcome.details[:200]!r}"
        )
    if HOST_PORT.search(outcome.details):
        found.append(f"the message names an internal address: {outcome.details[:200]!r}")
    if expect.too_large:
        if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
            found.append(f"past the size limit, yet {code.name} (expected RESOURCE_EXHAUSTED)")
        return found
    if code == grpc.StatusCode.OK and expect.refuse:
        found.append(f"accepted; the contract refuses it: {'; '.join(expect.reasons)[:300]}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        if outcome.field is None:
            found.append(f"INVALID_ARGUMENT without a BadRequest field violation: {outcome.details[:200]!r}")
        elif not names(outcome.field, expect.fields):
            allowed = sorted(expect.fields) or "none: the request is valid"
            found.append(f"refused naming {outcome.field!r} ({outcome.details[:160]!r}); allowed: {allowed}")
    if (
        code == grpc.StatusCode.RESOURCE_EXHAUSTED
        and expect.too_large is False
        and retry_info_on_overload
        and not outcome.retry_info
    ):
        found.append(f"RESOURCE_EXHAUSTED without RetryInfo, under the size limit: {outcome.details[:200]!r}")
    return found


def describe(wire: bytes, message_cls) -> str:
    """A short, printable account of a request (huge values abbreviated)."""
    text = str(message_cls.FromString(wire))
    text = re.sub(r'"((?:[^"\\\n]|\\.){60})(?:[^"\\\n]|\\.){40,}"', lambda m: f'"{m.group(1)}..."', text)
    text = re.sub(r"((?:[ \t]*\w+: \d+\n){3})(?:[ \t]*\w+: \d+\n){10,}", r"\1  ...\n", text)
    lines = text.splitlines()
    if len(lines) > 30:
        lines = lines[:12] + [f"  ... {len(lines) - 24} lines ..."] + lines[-12:]
    account = f"({len(wire)} bytes) " + " | ".join(line.strip() for line in lines)
    if len(wire) <= 512:  # enough to replay it: message_cls.FromString(base64.b64decode(...))
        account += f"\n    wire (base64): {base64.b64encode(wire).decode()}"
    return account


def percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q)) if values else 0.0
