"""Public GenerateRequest -> the router's domain request, validating every field before any work."""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.v1 import generation_service_pb2 as pb

from services.common.errors import InvalidArgumentError
from services.inference.sampling import SamplingParams


@dataclass(frozen=True)
class ModelLimits:
    """What the inference replicas accept, learned from GetModelInfo at start-up."""

    model_name: str
    max_context_tokens: int
    max_new_tokens: int


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt: str | None
    chat: list[tuple[str, str]] | None
    token_ids: list[int] | None
    sampling: SamplingParams
    priority: int = pb.PRIORITY_NORMAL


def to_generation_request(request: pb.GenerateRequest, limits: ModelLimits, default_max_tokens: int, request_id: str) -> GenerationRequest:
    if request.model and request.model.lower() != limits.model_name.lower():
        raise InvalidArgumentError("model", f"unknown model {request.model!r}; this endpoint serves {limits.model_name!r}")
    kind = request.WhichOneof("input")
    prompt = chat = token_ids = None
    if kind is None:
        raise InvalidArgumentError("input", "set one of prompt, chat or token_ids")
    if kind == "prompt":
        if not request.prompt.strip():
            raise InvalidArgumentError("prompt", "must not be empty")
        prompt = request.prompt
    elif kind == "chat":
        if not request.chat.messages:
            raise InvalidArgumentError("chat.messages", "must hold at least one message")
        chat = [(m.role, m.content) for m in request.chat.messages]
    else:
        if not request.token_ids.ids:
            raise InvalidArgumentError("token_ids.ids", "must not be empty")
        token_ids = list(request.token_ids.ids)

    s = request.sampling
    max_tokens = s.max_tokens if s.HasField("max_tokens") else min(default_max_tokens, limits.max_new_tokens)
    if not 1 <= max_tokens <= limits.max_new_tokens:
        raise InvalidArgumentError("sampling.max_tokens", f"must be in [1, {limits.max_new_tokens}], got {max_tokens}")
    temperature = s.temperature if s.HasField("temperature") else 1.0
    if not temperature >= 0:  # also rejects NaN
        raise InvalidArgumentError("sampling.temperature", f"must be >= 0, got {temperature}")
    top_p = s.top_p if s.HasField("top_p") else 1.0
    if not 0 < top_p <= 1:
        raise InvalidArgumentError("sampling.top_p", f"must be in (0, 1], got {top_p}")
    seed = s.seed if s.HasField("seed") else None
    if request.priority not in pb.Priority.values():
        raise InvalidArgumentError("priority", f"unknown priority {request.priority}")
    priority = request.priority or pb.PRIORITY_NORMAL
    return GenerationRequest(request_id, prompt, chat, token_ids, SamplingParams(max_tokens, temperature, top_p, seed), priority)
