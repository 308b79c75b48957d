"""Public GenerateRequest -> the router's domain request, validating every field before any work."""

from __future__ import annotations

from dataclasses import dataclass, field

from meshserve.v1 import generation_service_pb2 as pb

from services.common.errors import InvalidArgumentError
from services.inference.sampling import SamplingParams, validate_sampling


MAX_STOP_STRINGS = 8
MAX_STOP_BYTES = 64


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
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)


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
    if len(s.stop) > MAX_STOP_STRINGS or any(len(x.encode()) > MAX_STOP_BYTES for x in s.stop):
        raise InvalidArgumentError("sampling.stop", f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_BYTES} bytes")
    optional = lambda name, default: getattr(s, name) if s.HasField(name) else default  # noqa: E731
    sampling = SamplingParams(
        max_tokens=optional("max_tokens", min(default_max_tokens, limits.max_new_tokens)),
        temperature=optional("temperature", 1.0),
        top_p=optional("top_p", 1.0),
        seed=optional("seed", None),
        top_k=s.top_k,
        min_p=s.min_p,
        repetition_penalty=optional("repetition_penalty", 1.0),
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        min_tokens=s.min_tokens,
        logprobs=optional("logprobs", None),
        prompt_logprobs=optional("prompt_logprobs", None),
    )
    validate_sampling(sampling, limits.max_new_tokens)
    if request.priority not in pb.Priority.values():
        raise InvalidArgumentError("priority", f"unknown priority {request.priority}")
    priority = request.priority or pb.PRIORITY_NORMAL
    return GenerationRequest(
        request_id, prompt, chat, token_ids, sampling, priority,
        stop=list(s.stop), stop_token_ids=list(s.stop_token_ids),
    )
