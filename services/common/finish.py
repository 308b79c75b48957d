"""Why a generation ended: the one domain enum, and its conversions at each gRPC boundary.

The engine sets a `FinishReason` on a request's last output. Only STOP and LENGTH complete a
generation and cross the wire: the inference servicer writes them as meshserve.inference.v1's
`FinishReason` (`to_inference_proto`), the router reads that back (`from_inference_proto`) and
answers the client with meshserve.v1's (`to_public_proto`). ABORT and ERROR end a request without
completing it; the engine's caller turns them into a gRPC status instead (see
services/inference/async_engine.py), so they have no proto value.

The router and the inference service never import each other; both meet here.
"""

from __future__ import annotations

from enum import StrEnum

from meshserve.inference.v1 import inference_service_pb2 as inference_pb
from meshserve.v1 import generation_service_pb2 as public_pb


class FinishReason(StrEnum):
    """Why a request's generation ended. The values are the OpenAI and OpenTelemetry GenAI names."""

    STOP = "stop"
    """A stop token or a stop string ended it."""
    LENGTH = "length"
    """It reached max_tokens."""
    ABORT = "abort"
    """The caller went away or the engine stopped: another replica may continue it."""
    ERROR = "error"
    """It failed alone; the engine and its other requests go on."""

    @property
    def completes(self) -> bool:
        """True when the generation completed (STOP, LENGTH) rather than being cut off."""
        return self in (FinishReason.STOP, FinishReason.LENGTH)


_TO_INFERENCE: dict[FinishReason, inference_pb.FinishReason] = {
    FinishReason.STOP: inference_pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: inference_pb.FINISH_REASON_LENGTH,
}
_FROM_INFERENCE: dict[int, FinishReason] = {value: reason for reason, value in _TO_INFERENCE.items()}
_TO_PUBLIC: dict[FinishReason, public_pb.FinishReason] = {
    FinishReason.STOP: public_pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: public_pb.FINISH_REASON_LENGTH,
}
_FROM_PUBLIC: dict[int, FinishReason] = {value: reason for reason, value in _TO_PUBLIC.items()}


def to_inference_proto(reason: FinishReason | None) -> inference_pb.FinishReason:
    """meshserve.inference.v1.FinishReason of a response: UNSPECIFIED while the request goes on (None).

    Raises ValueError for ABORT and ERROR, which end a stream with a status, never a response."""
    if reason is None:
        return inference_pb.FINISH_REASON_UNSPECIFIED
    if reason not in _TO_INFERENCE:
        raise ValueError(f"finish reason {reason!r} ends a stream with a gRPC status, not a response")
    return _TO_INFERENCE[reason]


def from_inference_proto(value: int) -> FinishReason | None:
    """The reason an inference response carries; None (UNSPECIFIED) while the request goes on.

    Raises ValueError for a value this router does not know."""
    if value == inference_pb.FINISH_REASON_UNSPECIFIED:
        return None
    if value not in _FROM_INFERENCE:
        raise ValueError(f"unknown meshserve.inference.v1.FinishReason {value}")
    return _FROM_INFERENCE[value]


def to_public_proto(reason: FinishReason) -> public_pb.FinishReason:
    """meshserve.v1.FinishReason of a completed generation (STOP or LENGTH).

    Raises ValueError for ABORT and ERROR, which end a stream with a status, never a completion."""
    if reason not in _TO_PUBLIC:
        raise ValueError(f"finish reason {reason!r} ends a stream with a gRPC status, not a completion")
    return _TO_PUBLIC[reason]


def from_public_proto(value: int) -> FinishReason:
    """The reason a public GenerateComplete carries (a client of the public API, e.g. the OpenAI service).

    Raises ValueError for UNSPECIFIED or a value this client does not know."""
    if value not in _FROM_PUBLIC:
        raise ValueError(f"meshserve.v1.FinishReason {value} is not a completion's reason")
    return _FROM_PUBLIC[value]
