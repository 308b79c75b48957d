"""Public GenerateRequest -> the router's domain request, checked against the request contract
(services/common/contract.py) before any work."""

from __future__ import annotations

from dataclasses import dataclass, field

from meshserve.v1 import generation_service_pb2 as pb
from services.common.contract import (
    MAX_STOP_TOKEN_IDS,
    SamplingParams,
    request_id_or_new,
    sampling_from_proto,
    validate_chat,
    validate_logit_bias,
    validate_model_name,
    validate_priority,
    validate_prompt_text,
    validate_sampling,
    validate_stop_strings,
    validate_token_ids,
)
from services.common.errors import InvalidArgumentError


@dataclass(frozen=True)
class ModelLimits:
    """What the inference replicas accept, learned from GetModelInfo at start-up."""

    model_name: str
    max_context_tokens: int
    max_new_tokens: int
    vocab_size: int
    """Token ids the model and the detokenizer both know: below this."""
    revision: str = ""
    """The sha256 of the served GGUF."""
    precision: str = ""
    model_version: str = ""
    """The version the replicas report (GetModelInfo.model_version)."""


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
    tenant: str = ""
    """Who asked (from the verified token); inference replicas let only this tenant abort it."""
    no_cache: bool = False
    """Neither answered from nor stored in the result cache."""
    model_version: str | None = None
    """The model version the request is pinned to (the x-meshserve-model-version header); None: not pinned."""


def to_tokenize_input(request: pb.TokenizeRequest, limits: ModelLimits) -> GenerationRequest:
    """A Tokenize call's input as a generation request that generates nothing, checked as Generate checks it."""
    validate_model_name(request.model, limits.model_name)
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidArgumentError("input", "set one of prompt or chat")
    prompt = chat = None
    if kind == "prompt":
        validate_prompt_text(request.prompt, "prompt")
        prompt = request.prompt
    else:
        chat = [(m.role, m.content) for m in request.chat.messages]
        validate_chat(chat)
    return GenerationRequest(request_id_or_new(""), prompt, chat, None, SamplingParams(max_tokens=1))


def to_generation_request(
    request: pb.GenerateRequest, limits: ModelLimits, default_max_tokens: int
) -> GenerationRequest:
    """The domain request, or InvalidArgumentError naming the first field that breaks the contract."""
    request_id = request_id_or_new(request.request_id)
    validate_model_name(request.model, limits.model_name)
    kind = request.WhichOneof("input")
    prompt = chat = token_ids = None
    if kind is None:
        raise InvalidArgumentError("input", "set one of prompt, chat or token_ids")
    if kind == "prompt":
        validate_prompt_text(request.prompt, "prompt")
        prompt = request.prompt
    elif kind == "chat":
        chat = [(m.role, m.content) for m in request.chat.messages]
        validate_chat(chat)
    else:
        if not request.token_ids.ids:
            raise InvalidArgumentError("token_ids.ids", "must not be empty")
        validate_token_ids(request.token_ids.ids, limits.vocab_size, "token_ids.ids")
        token_ids = list(request.token_ids.ids)

    s = request.sampling
    validate_stop_strings(s.stop)
    validate_token_ids(s.stop_token_ids, limits.vocab_size, "sampling.stop_token_ids", MAX_STOP_TOKEN_IDS)
    sampling = sampling_from_proto(s, min(default_max_tokens, limits.max_new_tokens))
    validate_sampling(sampling, limits.max_new_tokens)
    validate_logit_bias(sampling.logit_bias, limits.vocab_size)
    validate_priority(request.priority)
    priority = request.priority or pb.PRIORITY_NORMAL
    return GenerationRequest(
        request_id,
        prompt,
        chat,
        token_ids,
        sampling,
        priority,
        stop=list(s.stop),
        stop_token_ids=list(s.stop_token_ids),
        no_cache=request.no_cache,
    )
