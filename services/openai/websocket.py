"""The WebSocket form of /v1/chat/completions and /v1/completions, free of the socket itself so it is tested on
its own (tests/unit/test_openai_websocket.py). The protocol (docs/public-endpoint.md, "WebSocket streaming"):

- the client sends one text frame holding exactly the JSON body it would POST (streaming implied);
- the server answers one text frame per chunk, the same JSON as the server-sent events' `data:` payloads
  (`core.event_json`, one conversion for both), then `[DONE]`, then closes with 1000;
- anything else ends the socket with an error frame in OpenAI's shape (`{"error": {...}}`, `param` naming the
  field) and a close code saying what kind of failure it was (`close_code`).

One request per connection: Envoy's per-tenant rate limit counts requests, and for a WebSocket it can only see
the upgrade, so a socket that took request after request would get past it. A frame that arrives while the
answer streams is refused as such (and cancels the answer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.openai import core
from services.openai.schemas import ChatCompletionRequest, CompletionRequest, Endpoint

PATHS: dict[Endpoint, str] = {"chat": "/v1/ws/chat/completions", "completion": "/v1/ws/completions"}
"""Where each endpoint is served as a WebSocket (Envoy enables the upgrade on these paths only)."""
DONE = "[DONE]"
"""The last frame of a stream that completed, as the server-sent events' `data: [DONE]`."""

CLOSE_NORMAL = 1000
CLOSE_UNSUPPORTED_DATA = 1003
"""A binary frame: requests are text."""
CLOSE_INVALID_PAYLOAD = 1007
"""A text frame that is not a JSON object (the server closes so itself for text that is not UTF-8)."""
CLOSE_POLICY_VIOLATION = 1008
"""A request the service refuses (a field's value or type, an unknown model, a second request, no request)."""
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013
"""The mesh at capacity or unavailable: what HTTP answers with 429/503 and Retry-After."""


def close_code(error: core.OpenAIError) -> int:
    """The close code that follows an error frame."""
    if error.code == "request_too_large":
        return CLOSE_MESSAGE_TOO_BIG
    if error.code == "invalid_json":
        return CLOSE_INVALID_PAYLOAD
    if error.code == "invalid_frame":
        return CLOSE_UNSUPPORTED_DATA
    if error.status in (429, 503):
        return CLOSE_TRY_AGAIN_LATER
    if error.status >= 500:
        return CLOSE_INTERNAL_ERROR
    return CLOSE_POLICY_VIOLATION


def close_reason(error: core.OpenAIError) -> str:
    """The close frame's reason: the error's code (a close reason holds at most 123 bytes)."""
    return (error.code or error.type)[:123]


def error_frame(error: core.OpenAIError) -> str:
    """The error in OpenAI's shape; `retry_after_ms` beside it where HTTP would send Retry-After (a socket has
    no response headers by then)."""
    body: dict[str, Any] = error.body()
    if error.retry_after_s is not None:
        body["retry_after_ms"] = max(1, round(error.retry_after_s * 1000))
    return core.event_json(body)


def read_request(
    message: Mapping[str, Any], endpoint: Endpoint, max_bytes: int
) -> ChatCompletionRequest | CompletionRequest:
    """The validated request a received frame (an ASGI `websocket.receive` message) holds, streaming; or
    OpenAIError naming the field, as the HTTP endpoint would refuse the same body."""
    text = message.get("text")
    if text is None:
        raise core.invalid(
            "A request is one text frame holding the JSON body; this was a binary frame.", None, "invalid_frame"
        )
    body = text.encode()
    if len(body) > max_bytes:
        raise core.OpenAIError(
            413,
            f"The request frame is larger than {max_bytes} bytes.",
            "invalid_request_error",
            None,
            "request_too_large",
        )
    request = core.parse_chat(body) if endpoint == "chat" else core.parse_completion(body)
    if request.stream is False:
        raise core.invalid("A WebSocket request always streams: leave 'stream' out or set it to true.", "stream")
    return request.model_copy(update={"stream": True})


def request_timeout_error(timeout_s: float) -> core.OpenAIError:
    return core.OpenAIError(
        408, f"No request frame within {timeout_s:g} s.", "invalid_request_error", None, "request_timeout"
    )


def second_request_error() -> core.OpenAIError:
    return core.invalid(
        "One request per connection: a frame arrived while the answer was streaming (the answer is cancelled); "
        "open a new connection for the next request.",
        None,
        "one_request_per_connection",
    )
