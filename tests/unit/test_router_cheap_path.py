"""The router's cheap path, without a mesh: a deterministic request whose answer the result cache holds is
answered before admission (a full tier does not refuse it) and before tokenizing (the tokenizer is never
called), while an uncached one meets the full tier's refusal."""

from __future__ import annotations

import dataclasses

import pytest
from prometheus_client import REGISTRY

from meshserve.inference.v1 import inference_service_pb2 as inference_pb
from meshserve.v1 import generation_service_pb2 as pb
from services.common.contract import SamplingParams
from services.common.errors import ResourceExhaustedError
from services.common.finish import FinishReason
from services.router.config import RouterConfig
from services.router.convert import GenerationRequest, ModelLimits
from services.router.core import CacheLookup, Completed, Router, TextDelta
from services.router.result_cache import CachedAnswer, CachedDelta, ResultCache, cache_key

LIMITS = ModelLimits("m", 2048, 1024, 49152, revision="abc", precision="int8")
QUESTION = GenerationRequest(
    "r1",
    None,
    [("user", "What is the capital of France?")],
    None,
    SamplingParams(temperature=0.0, max_tokens=8),
    priority=pb.PRIORITY_HIGH,
    tenant="t",
)


@pytest.fixture(autouse=True)
def fresh_registry():
    yield
    for collector in list(REGISTRY._collector_to_names):
        if any(n.startswith("meshserve_result_cache") for n in REGISTRY._collector_to_names[collector]):
            REGISTRY.unregister(collector)


class _NoTokenizer:
    """Stands in for the tokenizer stub: any call fails the test."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the tokenizer was called ({name}) for a request the cache answers")


async def full_router() -> Router:
    """A router whose only replica has one slot, no queue, and that slot taken."""
    router = Router(RouterConfig("127.0.0.1:1", ("127.0.0.1:2",), shed_low_after_s=0))
    router.limits = LIMITS
    router.result_cache = ResultCache("m", 1 << 20)
    router.tokenizer = _NoTokenizer()  # type: ignore[assignment]
    (replica,) = router.replicas.replicas
    replica.healthy = True
    replica.info = inference_pb.GetModelInfoResponse(max_running=1, max_waiting=0)
    replica.in_flight = 1
    return router


async def events(router: Router, request: GenerationRequest) -> list:
    return [event async for event in router.generate(request, None)]


async def test_a_full_tier_refuses_an_uncached_request_before_tokenizing():
    router = await full_router()
    with pytest.raises(ResourceExhaustedError):
        await events(router, QUESTION)


async def test_a_cached_answer_is_replayed_when_the_tier_is_full_and_without_the_tokenizer():
    router = await full_router()
    assert router.result_cache is not None
    key = cache_key(QUESTION, LIMITS)
    assert key is not None
    deltas = [CachedDelta("Paris", [9], []), CachedDelta(".", [10], [])]
    stored = CachedAnswer(deltas, FinishReason.STOP, 12, 2, [], "m")
    await router.result_cache.put(key, stored)

    replayed = await events(router, dataclasses.replace(QUESTION, request_id="r2"))

    assert replayed[0] == CacheLookup(hit=True)
    assert [(e.text, e.token_ids) for e in replayed if isinstance(e, TextDelta)] == [("Paris", [9]), (".", [10])]
    (completed,) = [e for e in replayed if isinstance(e, Completed)]
    assert completed.cached and completed.prompt_tokens == completed.cached_prompt_tokens == 12
    assert completed.finish_reason == FinishReason.STOP and completed.completion_tokens == 2
    # another tenant's identical request is not this answer: it meets the full tier
    with pytest.raises(ResourceExhaustedError):
        await events(router, dataclasses.replace(QUESTION, tenant="u"))
