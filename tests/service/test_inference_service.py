"""The inference servicer and engine over a real gRPC channel."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from prometheus_client import REGISTRY

from meshserve.inference.v1 import inference_service_pb2 as pb
from meshserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from services.common.metrics import EngineMetrics
from services.inference.async_engine import AsyncEngine
from services.inference.backends.onnxruntime import OnnxRuntimeBackend
from services.inference.engine import Engine, EngineConfig
from services.inference.servicer import InferenceServicer


@pytest.fixture(scope="module")
def metrics():
    metrics = EngineMetrics("test-model")
    yield metrics
    for collector in list(REGISTRY._collector_to_names):  # metrics are process globals; leave none behind
        if any(n.startswith("meshserve_") for n in REGISTRY._collector_to_names[collector]):
            REGISTRY.unregister(collector)


@pytest.fixture
async def service(model_dir, metrics):
    # no speculative drafts: these tests need a request still running once its first tokens arrive, and
    # drafts can finish a 150-token greedy answer in a fraction of a second
    config = EngineConfig(num_slots=2, max_context=256, max_new_tokens=200, max_waiting=1, num_speculative_tokens=0)
    async_engine = AsyncEngine(metrics)
    async_engine.attach(Engine(OnnxRuntimeBackend(model_dir, config.num_slots, config.max_context), config))
    server = grpc.aio.server()
    pb_grpc.add_InferenceServiceServicer_to_server(
        InferenceServicer(async_engine, config, model_dir, "onnxruntime"), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield pb_grpc.InferenceServiceStub(channel), async_engine.engine
    finally:
        await channel.close()
        await server.stop(None)
        async_engine.engine.stop()


def _request(max_tokens: int, prompt=(504, 3575, 282, 4649, 314)) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id="r",
        prompt_token_ids=list(prompt),
        sampling=pb.SamplingParameters(max_tokens=max_tokens, temperature=0.0, top_p=1.0),
    )


async def test_generate_streams_tokens_until_length(service):
    stub, _ = service
    responses = [r async for r in stub.Generate(_request(6))]
    assert sum(len(r.token_ids) for r in responses) == 6
    assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH and responses[-1].prompt_tokens == 5


async def test_cancelling_the_call_frees_the_slot(service):
    stub, engine = service
    call = stub.Generate(_request(190))
    await call.read()
    assert engine.num_running == 1
    call.cancel()
    for _ in range(100):
        if engine.num_running == 0:
            break
        await asyncio.sleep(0.05)
    assert engine.num_running == 0 and engine.kv_cache_usage == 0.0


async def test_overload_is_resource_exhausted_with_retry_advice(service):
    stub, engine = service
    calls = [stub.Generate(_request(190)) for _ in range(2)]  # fill the 2 slots
    for call in calls:
        await call.read()
    calls.append(stub.Generate(_request(190)))  # and the 1 waiting place
    for _ in range(100):
        if engine.num_waiting == 1:
            break
        await asyncio.sleep(0.02)
    assert engine.num_running == 2 and engine.num_waiting == 1
    refused = stub.Generate(_request(5))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await refused.read()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert any(k == "grpc-status-details-bin" for k, _ in caught.value.trailing_metadata())
    for call in calls:
        call.cancel()


async def test_invalid_max_tokens_is_invalid_argument(service):
    stub, _ = service
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(_request(201)).read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.max_tokens" in caught.value.details()


async def test_load_reports_follow_requests_as_they_arrive_and_finish(service):
    """What a router sees of this replica: a report at once, then one soon after each change, so a
    freed slot is visible in milliseconds rather than at the next poll."""
    stub, _ = service
    reports = stub.WatchLoad(pb.WatchLoadRequest(min_interval_ms=1))

    async def next_load() -> pb.GetLoadResponse:
        return (await asyncio.wait_for(reports.read(), timeout=5)).load

    async def load_becomes(running: int, kv: tuple[float, float], within_s: float = 0.5) -> None:
        """Reports reach `running` requests (none waiting) with KV usage within `kv`, sooner than the
        1 s heartbeat would bring them."""
        deadline = time.monotonic() + within_s
        load = await next_load()
        while not ((load.running, load.waiting) == (running, 0) and kv[0] <= load.kv_cache_usage <= kv[1]):
            assert time.monotonic() < deadline, load
            load = await next_load()

    try:
        await load_becomes(0, (0.0, 0.0))
        call = stub.Generate(_request(150))
        await call.read()  # the first tokens: the request runs
        # KV positions in use over 2 slots x 256: the 5-token prompt at least, its 150 answer tokens at
        # most; never the half that counting slots would say
        await load_becomes(1, (5 / 512, 155 / 512))
        call.cancel()  # frees the slot at the next engine step
        await load_becomes(0, (0.0, 0.0))
    finally:
        reports.cancel()


async def test_draining_ends_the_load_watches_so_the_server_can_stop(model_dir, metrics):
    config = EngineConfig(num_slots=1, max_context=64, max_new_tokens=8)
    async_engine = AsyncEngine(metrics)
    async_engine.attach(Engine(OnnxRuntimeBackend(model_dir, config.num_slots, config.max_context), config))
    try:
        reports = async_engine.watch_load(0.001)
        assert await anext(reports) == (0, 0, 0.0)
        pending = asyncio.ensure_future(anext(reports))
        await async_engine.drain(1.0)
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(pending, 0.5)  # well before the 1 s heartbeat
    finally:
        async_engine.engine.stop()
