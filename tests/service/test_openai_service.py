"""The OpenAI-compatible service over real sockets (uvicorn, gRPC) in front of a stand-in router: a real
grpc.aio GenerationService in the test that records what reaches it and answers with the statuses the
real router sends (built by services.common.grpc_status, as the router builds them). It checks what the
live mesh cannot be made to do on demand: the exact metadata and deadline on the wire, RetryInfo becoming
Retry-After, every status's HTTP mapping, and an error after streaming began."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import openai
import pytest
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from meshserve.v1 import generation_service_pb2 as pb
from meshserve.v1 import generation_service_pb2_grpc as pb_grpc
from services.common.errors import (
    DownstreamError,
    InvalidArgumentError,
    ResourceExhaustedError,
    ServingError,
    UnavailableError,
)
from services.common.grpc_status import to_grpc_status
from services.openai.app import create_app
from services.openai.config import OpenAIConfig
from tests.conftest import free_port, wait_until_async

MODEL = "SmolLM2-135M-Instruct"


@dataclass
class Call:
    metadata: dict[str, str]
    time_remaining: float | None
    request: pb.GenerateRequest


@dataclass
class StandInRouter(pb_grpc.GenerationServiceServicer):
    """Answers every Generate with `answer` and records the calls."""

    answer: (
        Callable[[StandInRouter, pb.GenerateRequest, grpc.aio.ServicerContext], AsyncIterator[pb.GenerateResponse]]
        | None
    ) = None
    calls: list[Call] = field(default_factory=list)
    in_flight: int = 0
    all_in_flight: asyncio.Event = field(default_factory=asyncio.Event)

    async def GetModelInfo(self, request, context):
        return pb.GetModelInfoResponse(model=MODEL, max_context_tokens=8192, revision="sha")

    async def Generate(self, request, context):
        self.calls.append(Call(dict(context.invocation_metadata()), context.time_remaining(), request))
        self.in_flight += 1
        try:
            assert self.answer is not None
            async for response in self.answer(self, request, context):
                yield response
        finally:
            self.in_flight -= 1


def tokens(*texts: str) -> list[pb.GenerateResponse]:
    chunks = [pb.GenerateResponse(chunk=pb.GenerateChunk(text=t, token_ids=[i])) for i, t in enumerate(texts)]
    done = pb.GenerateComplete(
        finish_reason=pb.FINISH_REASON_STOP, prompt_tokens=5, completion_tokens=len(texts), cached_prompt_tokens=3
    )
    return [*chunks, pb.GenerateResponse(complete=done)]


async def answer_paris(router, request, context):
    for response in tokens("Par", "is"):
        yield response


def refuse_with(error: ServingError):
    async def answer(router, request, context):
        await context.abort_with_status(to_grpc_status(error))
        yield  # an async generator, like the router's Generate

    return answer


@dataclass
class Service:
    router: StandInRouter
    client: openai.AsyncOpenAI
    port: int


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    router = StandInRouter()
    server = grpc.aio.server()
    pb_grpc.add_GenerationServiceServicer_to_server(router, server)
    health_servicer = health.aio.HealthServicer()  # the service's channel watches it, as a real router's
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("meshserve.v1.GenerationService", health_pb2.HealthCheckResponse.SERVING)
    router_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port = free_port()
    config = OpenAIConfig((f"127.0.0.1:{router_port}",))
    http = uvicorn.Server(
        uvicorn.Config(
            create_app(config), host="127.0.0.1", port=port, log_config=None, lifespan="on", timeout_graceful_shutdown=2
        )
    )  # a hung request fails its test, not the run
    serving = asyncio.create_task(http.serve())
    while not http.started:
        assert not serving.done(), "uvicorn did not start"
        await asyncio.sleep(0.02)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=42)
    try:
        yield Service(router, client, port)
    finally:
        await client.close()
        http.should_exit = True
        await serving
        await server.stop(0)


async def test_envoys_headers_and_the_deadline_reach_the_router(service):
    service.router.answer = answer_paris
    headers = {
        "x-meshserve-tenant": "acme",
        "x-meshserve-max-priority": "normal",
        "x-other": "not forwarded",
        "x-meshserve-timeout-s": "30",
    }
    response = await service.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True, extra_headers=headers
    )
    assert "".join([c.choices[0].delta.content or "" async for c in response if c.choices]) == "Paris"
    (call,) = service.router.calls
    assert call.metadata["x-meshserve-tenant"] == "acme" and call.metadata["x-meshserve-max-priority"] == "normal"
    assert "x-other" not in call.metadata
    assert 25 < call.time_remaining <= 30.5  # gRPC rounds deadlines up a little
    # a non-streaming request's deadline is the openai SDK's own timeout (x-stainless-read-timeout)
    await service.client.completions.create(model=MODEL, prompt="Hi")
    assert 37 < service.router.calls[-1].time_remaining <= 42.5
    assert "x-meshserve-tenant" not in service.router.calls[-1].metadata


async def test_usage_reads_cached_prompt_tokens(service):
    service.router.answer = answer_paris
    response = await service.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    assert response.usage.prompt_tokens == 5 and response.usage.prompt_tokens_details.cached_tokens == 3


@pytest.mark.parametrize(
    ("error", "status", "kind", "headers"),
    [
        (
            ResourceExhaustedError("queue full", retry_after_s=1.5),
            429,
            openai.RateLimitError,
            {"retry-after": "2", "retry-after-ms": "1500"},
        ),
        (UnavailableError("draining", retry_after_s=0.2), 503, openai.InternalServerError, {"retry-after": "1"}),
        (DownstreamError("DEADLINE_EXCEEDED", "deadline passed"), 504, openai.InternalServerError, {}),
        (DownstreamError("INTERNAL", "stream reset"), 500, openai.InternalServerError, {}),
        (InvalidArgumentError("sampling.top_k", "top_k must be >= 0"), 400, openai.BadRequestError, {}),
    ],
)
async def test_router_statuses_become_http_statuses(service, error, status, kind, headers):
    service.router.answer = refuse_with(error)
    with pytest.raises(kind) as raised:
        await service.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    assert raised.value.status_code == status
    for name, value in headers.items():
        assert raised.value.response.headers[name] == value
    if status == 400:
        assert raised.value.param == "top_k"
    if status == 503:
        # UNAVAILABLE before any answer is retried on another router (the channel's retry policy): 3 attempts
        assert len(service.router.calls) == 3
    else:
        assert len(service.router.calls) == 1


async def test_a_refused_stream_is_an_http_status_and_a_late_failure_an_error_event(service):
    service.router.answer = refuse_with(ResourceExhaustedError("queue full", retry_after_s=1.0))
    with pytest.raises(openai.RateLimitError):
        await service.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True
        )

    async def fail_after_two_tokens(router, request, context):
        for response in tokens("Par", "is")[:2]:
            yield response
        await context.abort_with_status(to_grpc_status(DownstreamError("INTERNAL", "replica lost")))

    service.router.answer = fail_after_two_tokens
    stream = await service.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True
    )
    received = []
    with pytest.raises(openai.APIError) as raised:
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert received == ["", "Par", "is"] and "replica lost" in raised.value.message
    assert raised.value.body["code"] == "internal_error"


async def test_n_choices_are_generated_in_parallel(service):
    async def answer_when_all_three_arrived(router, request, context):
        if router.in_flight == 3:
            router.all_in_flight.set()
        await asyncio.wait_for(router.all_in_flight.wait(), timeout=5)  # sequential calls would time out here
        for response in tokens(f"choice {request.sampling.seed}"):
            yield response

    service.router.answer = answer_when_all_three_arrived
    response = await service.client.completions.create(model=MODEL, prompt="Hi", n=3, seed=100)
    assert [c.text for c in response.choices] == ["choice 100", "choice 101", "choice 102"]
    assert response.usage.prompt_tokens == 5 and response.usage.completion_tokens == 3


async def test_a_stream_closed_by_the_client_cancels_the_call(service):
    cancelled = asyncio.Event()

    async def endless(router, request, context):
        try:
            while True:
                yield pb.GenerateResponse(chunk=pb.GenerateChunk(text="x", token_ids=[1]))
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    service.router.answer = endless
    stream = await service.client.completions.create(model=MODEL, prompt="Hi", stream=True, max_tokens=10000)
    async for _ in stream:
        break
    await stream.close()
    await asyncio.wait_for(cancelled.wait(), timeout=5)
    await wait_until_async(lambda: service.router.in_flight == 0, what="the cancelled call leaves the router")


@pytest.mark.parametrize("stream", [True, False])
async def test_a_client_that_leaves_before_its_first_token_cancels_the_call(service, stream):
    """A request still queued (no token yet) when its client gives up: nothing has been sent back, and the
    call must not hold its place until it would have finished."""
    cancelled = asyncio.Event()

    async def queued_forever(router, request, context):
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        yield pb.GenerateResponse()

    def answered(code: str) -> float:
        labels = {"model_name": MODEL, "endpoint": "/v1/completions", "code": code}
        return REGISTRY.get_sample_value("meshserve_openai_requests_total", labels) or 0.0

    gone_before, failed_before = answered("499"), answered("500")
    service.router.answer = queued_forever
    body = json.dumps({"model": MODEL, "prompt": "Hi", "stream": stream}).encode()
    _, writer = await asyncio.open_connection("127.0.0.1", service.port)
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()

    async def called() -> None:
        while not service.router.calls:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(called(), timeout=5)
    writer.close()
    await writer.wait_closed()
    await asyncio.wait_for(cancelled.wait(), timeout=5)
    # counted as the client's leaving (499), never as a failure of ours (500)
    for _ in range(100):
        if answered("499") > gone_before:
            break
        await asyncio.sleep(0.02)
    assert answered("499") == gone_before + 1 and answered("500") == failed_before
