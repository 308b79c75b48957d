"""The result cache without a mesh: what may be cached and under which key, the memory tier's LRU in
bytes, and a Redis that is down costing nothing but a warning."""

from __future__ import annotations

import dataclasses
import logging

import pytest
from prometheus_client import REGISTRY

from meshserve.inference.v1 import inference_service_pb2 as inference_pb
from services.common.contract import Constraint, SamplingParams
from services.common.finish import FinishReason
from services.router.convert import GenerationRequest, ModelLimits
from services.router.result_cache import CachedAnswer, CachedDelta, ResultCache, cache_key
from tests.conftest import free_port

LIMITS = ModelLimits("m", 2048, 1024, 49152, revision="abc", precision="int8")
GREEDY = GenerationRequest("r1", "hi", None, None, SamplingParams(temperature=0.0, max_tokens=8), tenant="t")


@pytest.fixture(autouse=True)
def fresh_registry():
    yield
    for collector in list(REGISTRY._collector_to_names):
        if any(n.startswith("meshserve_result_cache") for n in REGISTRY._collector_to_names[collector]):
            REGISTRY.unregister(collector)


def answer(text: str = "Paris.") -> CachedAnswer:
    logprob = inference_pb.TokenLogprob(
        token_id=5, logprob=-0.25, alternatives=[inference_pb.TokenAlternative(token_id=6, logprob=-1.5)]
    )
    return CachedAnswer(
        [CachedDelta(text, [5], [logprob]), CachedDelta("", [], [])], FinishReason.STOP, 12, 1, [logprob], "m"
    )


def test_only_deterministic_requests_have_a_key():
    assert cache_key(GREEDY, LIMITS) is not None
    seeded = dataclasses.replace(GREEDY, sampling=SamplingParams(temperature=0.8, seed=3, max_tokens=8))
    assert cache_key(seeded, LIMITS) is not None
    unseeded = dataclasses.replace(GREEDY, sampling=SamplingParams(temperature=0.8, max_tokens=8))
    assert cache_key(unseeded, LIMITS) is None
    assert cache_key(dataclasses.replace(GREEDY, no_cache=True), LIMITS) is None


def test_the_key_covers_tenant_model_revision_prompt_and_every_sampling_field():
    base = cache_key(GREEDY, LIMITS)
    assert cache_key(dataclasses.replace(GREEDY, request_id="other"), LIMITS) == base  # not the id
    variants = [
        cache_key(dataclasses.replace(GREEDY, tenant="u"), LIMITS),
        cache_key(dataclasses.replace(GREEDY, prompt="hi!"), LIMITS),
        cache_key(GREEDY, dataclasses.replace(LIMITS, revision="def")),
        cache_key(GREEDY, dataclasses.replace(LIMITS, precision="int4")),
        cache_key(dataclasses.replace(GREEDY, stop=["x"]), LIMITS),
        cache_key(dataclasses.replace(GREEDY, stop_token_ids=[7]), LIMITS),
    ]
    for name, value in [
        ("max_tokens", 9),
        ("top_k", 3),
        ("logprobs", 2),
        ("prompt_logprobs", 0),
        ("min_tokens", 1),
        ("repetition_penalty", 1.1),
        ("presence_penalty", 0.5),
        ("frequency_penalty", 0.5),
    ]:
        sampling = dataclasses.replace(GREEDY.sampling, **{name: value})
        variants.append(cache_key(dataclasses.replace(GREEDY, sampling=sampling), LIMITS))
    assert base not in variants and len(set(variants)) == len(variants)


def test_the_key_covers_the_constraint_and_logit_bias():
    def key(**fields) -> str | None:
        sampling = dataclasses.replace(GREEDY.sampling, **fields)
        return cache_key(dataclasses.replace(GREEDY, sampling=sampling), LIMITS)

    keys = [
        key(),
        key(constraint=Constraint("json_object")),
        key(constraint=Constraint("json_schema", '{"type": "object"}')),
        key(constraint=Constraint("json_schema", '{"type": "array"}')),
        key(constraint=Constraint("regex", '{"type": "array"}')),
        key(constraint=Constraint("choice", choices=("a", "b"))),
        key(constraint=Constraint("choice", choices=("b", "a"))),
        key(constraint=Constraint("grammar", 'start: "a"')),
        key(logit_bias=((5, 1.0),)),
        key(logit_bias=((5, 2.0),)),
    ]
    assert len(set(keys)) == len(keys)
    assert key(constraint=Constraint("regex", "a+")) == key(constraint=Constraint("regex", "a+"))


def test_an_answer_survives_encoding_unchanged():
    original = answer()
    assert CachedAnswer.decode(original.encode()) == original


async def test_the_memory_tier_evicts_least_recently_used_answers_past_its_bytes():
    size = len(answer("a").encode())
    cache = ResultCache("m", max_bytes=2 * size + 10)
    for key in ("a", "b"):
        await cache.put(key, answer(key))
    assert (await cache.get("a"))[1] == "memory"  # a is now the most recently used
    await cache.put("c", answer("c"))
    assert await cache.get("b") is None
    assert (await cache.get("a"))[0] == answer("a") and (await cache.get("c"))[0] == answer("c")
    assert cache.bytes <= cache.max_bytes
    assert cache.evictions._value.get() == 1


async def test_a_redis_that_is_down_costs_a_warning_not_a_request(caplog):
    cache = ResultCache("m", max_bytes=1 << 20, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with caplog.at_level(logging.WARNING):
        await cache.put("k", answer())
        assert (await cache.get("k"))[1] == "memory"
        assert await cache.get("missing") is None
    assert sum("Redis" in r.getMessage() for r in caplog.records) == 1  # then left alone for a while
    await cache.close()


def test_the_key_is_known_before_tokenizing_and_differs_by_the_form_of_the_prompt():
    chat = dataclasses.replace(GREEDY, prompt=None, chat=[("user", "hi")])
    ids = dataclasses.replace(GREEDY, prompt=None, token_ids=[1, 2])
    keys = [
        cache_key(GREEDY, LIMITS),
        cache_key(chat, LIMITS),
        cache_key(dataclasses.replace(chat, chat=[("system", "hi")]), LIMITS),
        cache_key(dataclasses.replace(chat, chat=[("user", "hi"), ("user", "")]), LIMITS),
        cache_key(ids, LIMITS),
        cache_key(dataclasses.replace(ids, token_ids=[1, 3]), LIMITS),
    ]
    assert None not in keys and len(set(keys)) == len(keys)
    assert cache_key(dataclasses.replace(chat, request_id="r2"), LIMITS) == keys[1]
