"""The WebSocket protocol's pure parts (services/openai/websocket.py): what a frame is, and how each error
ends a socket."""

from __future__ import annotations

import json

import pytest

from services.common.errors import ResourceExhaustedError, UnavailableError
from services.openai import core
from services.openai import websocket as ws

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}


def refusal(message: dict, endpoint="chat", max_bytes=1 << 20) -> core.OpenAIError:
    with pytest.raises(core.OpenAIError) as raised:
        ws.read_request(message, endpoint, max_bytes)
    return raised.value


def test_a_text_frame_is_the_post_body_streaming():
    request = ws.read_request({"type": "websocket.receive", "text": json.dumps(CHAT)}, "chat", 1 << 20)
    assert request.stream is True and request.messages[0].content == "Hi"
    completion = ws.read_request({"text": json.dumps({"prompt": "Hi", "stream": True})}, "completion", 1 << 20)
    assert completion.stream is True and completion.prompt == "Hi"


def test_a_binary_frame_is_unsupported_data():
    error = refusal({"type": "websocket.receive", "bytes": json.dumps(CHAT).encode()})
    assert error.code == "invalid_frame" and ws.close_code(error) == ws.CLOSE_UNSUPPORTED_DATA


def test_the_limit_counts_utf8_bytes_not_characters():
    text = json.dumps({**CHAT, "user": "é" * 40}, ensure_ascii=False)  # é: 1 character, 2 bytes
    limit = len(text.encode()) - 1
    assert len(text) < limit
    error = refusal({"text": text}, max_bytes=limit)
    assert error.code == "request_too_large" and str(limit) in error.message
    assert ws.close_code(error) == ws.CLOSE_MESSAGE_TOO_BIG
    assert ws.read_request({"text": text}, "chat", limit + 1).user == "é" * 40


@pytest.mark.parametrize(
    ("text", "param", "close"),
    [
        ("{", None, ws.CLOSE_INVALID_PAYLOAD),
        ('"a string"', None, ws.CLOSE_INVALID_PAYLOAD),
        (json.dumps({**CHAT, "top_p": "high"}), "top_p", ws.CLOSE_POLICY_VIOLATION),
        (json.dumps({**CHAT, "stream": False}), "stream", ws.CLOSE_POLICY_VIOLATION),
    ],
)
def test_a_frame_that_is_not_a_request_names_the_field(text, param, close):
    error = refusal({"text": text})
    assert error.status == 400 and error.param == param and ws.close_code(error) == close


@pytest.mark.parametrize(
    ("error", "close"),
    [
        (core.to_openai_error(ResourceExhaustedError("full", retry_after_s=0.25), None), ws.CLOSE_TRY_AGAIN_LATER),
        (core.to_openai_error(UnavailableError("draining"), None), ws.CLOSE_TRY_AGAIN_LATER),
        (core.OpenAIError(500, "boom", "server_error", None, "internal_error"), ws.CLOSE_INTERNAL_ERROR),
        (core.OpenAIError(504, "late", "timeout_error", None, "deadline_exceeded"), ws.CLOSE_INTERNAL_ERROR),
        (ws.second_request_error(), ws.CLOSE_POLICY_VIOLATION),
        (ws.request_timeout_error(30), ws.CLOSE_POLICY_VIOLATION),
    ],
)
def test_every_error_has_its_close_code_and_a_reason_that_fits(error, close):
    assert ws.close_code(error) == close
    assert ws.close_reason(error) == error.code and len(ws.close_reason(error).encode()) <= 123


def test_the_error_frame_is_openais_shape_with_the_retry_hint_beside_it():
    overloaded = core.to_openai_error(ResourceExhaustedError("full", retry_after_s=0.25), None)
    frame = json.loads(ws.error_frame(overloaded))
    assert frame == {**overloaded.body(), "retry_after_ms": 250}
    assert json.loads(ws.error_frame(ws.second_request_error())) == ws.second_request_error().body()
