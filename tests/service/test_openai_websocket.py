"""The OpenAI-compatible service's WebSocket streams over real sockets (uvicorn with the settings `meshserve
serve-openai` runs it with, the `websockets` client, gRPC) in front of the stand-in router of
test_openai_service.py: the frames are the server-sent events' payloads, every kind of bad frame gets its error
frame and close code, a closed socket cancels the call, and a reader that stops reading holds back the router
instead of growing a buffer in the service."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from websockets.asyncio.client import connect

from meshserve.v1 import generation_service_pb2 as pb
from meshserve.v1 import generation_service_pb2_grpc as pb_grpc
from services.common.errors import InvalidArgumentError, ResourceExhaustedError
from services.openai.app import create_app, server_options
from services.openai.config import MAX_BODY_BYTES, OpenAIConfig
from tests.conftest import free_port, wait_until_async
from tests.service.test_openai_service import MODEL, StandInRouter, answer_paris, refuse_with, tokens
from tests.websocket_client import read_to_close, sse_payloads

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
MAX_REQUEST_BYTES = 4096
REQUEST_TIMEOUT_S = 0.5


@dataclass
class Service:
    router: StandInRouter
    port: int

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    router = StandInRouter()
    server = grpc.aio.server()
    pb_grpc.add_GenerationServiceServicer_to_server(router, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("meshserve.v1.GenerationService", health_pb2.HealthCheckResponse.SERVING)
    router_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port = free_port()
    config = OpenAIConfig(
        (f"127.0.0.1:{router_port}",), max_request_bytes=MAX_REQUEST_BYTES, ws_request_timeout_s=REQUEST_TIMEOUT_S
    )
    http = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            host="127.0.0.1",
            port=port,
            log_config=None,
            lifespan="on",
            timeout_graceful_shutdown=2,
            **server_options(config),
        )
    )
    serving = asyncio.create_task(http.serve())
    while not http.started:
        assert not serving.done(), "uvicorn did not start"
        await asyncio.sleep(0.02)
    try:
        yield Service(router, port)
    finally:
        http.should_exit = True
        await serving
        await server.stop(0)


async def exchange(service: Service, path: str, frame: str | bytes) -> tuple[list[Any], int | None, str | None]:
    """Sends one frame and reads until the server closes: the frames (JSON parsed, but [DONE]), the close code
    and reason."""
    async with connect(service.url(path)) as socket:
        await socket.send(frame)
        frames = await read_to_close(socket)
    return [f if f == "[DONE]" else json.loads(f) for f in frames], socket.close_code, socket.close_reason


def without_ids(text: str) -> str:
    event = json.loads(text)
    event.pop("id"), event.pop("created")
    return json.dumps(event)


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        ("chat/completions", {**CHAT, "stream_options": {"include_usage": True}}),
        ("completions", {"model": MODEL, "prompt": "Hi"}),
    ],
)
async def test_the_frames_are_the_server_sent_events_payloads(service, endpoint, body):
    service.router.answer = answer_paris
    payloads = await sse_payloads(f"http://127.0.0.1:{service.port}/v1/{endpoint}", body, 30)
    async with connect(service.url(f"/v1/ws/{endpoint}")) as socket:
        await socket.send(json.dumps(body))  # no "stream": a WebSocket always streams
        frames = await read_to_close(socket)
    assert socket.close_code == 1000 and frames[-1] == payloads[-1] == "[DONE]"
    assert len(frames) == len(payloads) >= 4
    # byte for byte but the response id and creation time, which every request draws anew
    assert [without_ids(f) for f in frames[:-1]] == [without_ids(p) for p in payloads[:-1]]
    assert len({json.loads(f)["id"] for f in frames[:-1]}) == 1
    # and the router was asked the same, but for the request id
    sse_call, ws_call = service.router.calls
    for call in (sse_call, ws_call):
        call.request.ClearField("request_id")
    assert ws_call.request == sse_call.request


@pytest.mark.parametrize(
    ("frame", "close_code", "param", "code"),
    [
        (b'{"model": "x"}', 1003, None, "invalid_frame"),
        ("not json", 1007, None, "invalid_json"),
        ("[1, 2]", 1007, None, "invalid_json"),
        (json.dumps({**CHAT, "temperature": "warm"}), 1008, "temperature", "invalid_type"),
        (json.dumps({**CHAT, "messages": [{"role": "user", "content": 3}]}), 1008, "messages[0].content", None),
        (json.dumps({"model": MODEL}), 1008, "messages", "missing_required_parameter"),
        (json.dumps({**CHAT, "stream": False}), 1008, "stream", "invalid_value"),
        (json.dumps({**CHAT, "n": 9}), 1008, "n", "invalid_value"),
        (json.dumps({**CHAT, "user": "x" * MAX_REQUEST_BYTES}), 1009, None, "request_too_large"),
    ],
)
async def test_a_frame_that_is_not_a_request_gets_an_error_frame_and_a_close_code(
    service, frame, close_code, param, code
):
    service.router.answer = answer_paris
    frames, closed, reason = await exchange(service, "/v1/ws/chat/completions", frame)
    [error] = frames
    assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["type"] == "invalid_request_error" and error["error"]["param"] == param
    if code is not None:
        assert error["error"]["code"] == code and reason == code
    assert closed == close_code
    assert not service.router.calls, "nothing reached the router"
    # the service is unharmed: the next socket streams
    frames, closed, _ = await exchange(service, "/v1/ws/chat/completions", json.dumps(CHAT))
    assert closed == 1000 and "".join(f["choices"][0]["delta"].get("content", "") for f in frames[1:-2]) == "Paris"


async def test_a_frame_beyond_the_services_own_bound_is_refused_by_the_protocol(service):
    _, closed, reason = await exchange(service, "/v1/ws/completions", "x" * (MAX_BODY_BYTES + 1))
    assert closed == 1009 and str(MAX_BODY_BYTES) in reason


@pytest.mark.parametrize(
    ("error", "close_code", "param", "code", "retry_after_ms"),
    [
        (ResourceExhaustedError("queue full", retry_after_s=1.5), 1013, None, "server_overloaded", 1500),
        (InvalidArgumentError("sampling.top_k", "top_k must be >= 0"), 1008, "top_k", "invalid_value", None),
    ],
)
async def test_router_refusals_are_error_frames(service, error, close_code, param, code, retry_after_ms):
    service.router.answer = refuse_with(error)
    frames, closed, _ = await exchange(service, "/v1/ws/chat/completions", json.dumps(CHAT))
    [frame] = frames
    assert frame["error"]["param"] == param and frame["error"]["code"] == code and closed == close_code
    assert frame.get("retry_after_ms") == retry_after_ms


async def endless(router, request, context):
    while True:
        yield pb.GenerateResponse(chunk=pb.GenerateChunk(text="x", token_ids=[1]))
        await asyncio.sleep(0.01)


async def queued_forever(router, request, context):
    await asyncio.Event().wait()
    yield pb.GenerateResponse()


@pytest.mark.parametrize("answer", [endless, queued_forever], ids=["mid-stream", "before-the-first-token"])
async def test_closing_the_socket_cancels_the_call(service, answer):
    service.router.answer = answer
    async with connect(service.url("/v1/ws/completions")) as socket:
        await socket.send(json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 1000}))
        await wait_until_async(lambda: service.router.in_flight == 1, what="the call reaches the router")
        if answer is endless:
            assert json.loads(await socket.recv())["choices"][0]["text"] == "x"
    await wait_until_async(lambda: service.router.in_flight == 0, what="the closed socket's call is cancelled")


async def test_a_second_frame_while_streaming_cancels_the_answer_and_says_why(service):
    service.router.answer = endless
    async with connect(service.url("/v1/ws/completions")) as socket:
        await socket.send(json.dumps({"model": MODEL, "prompt": "Hi"}))
        await socket.recv()
        await socket.send(json.dumps({"model": MODEL, "prompt": "again"}))
        frames = await read_to_close(socket)
    assert json.loads(frames[-1])["error"]["code"] == "one_request_per_connection" and socket.close_code == 1008
    await wait_until_async(lambda: service.router.in_flight == 0, what="the answer's call is cancelled")


async def test_a_socket_that_sends_no_request_is_closed(service):
    async with connect(service.url("/v1/ws/chat/completions")) as socket:
        frames = await read_to_close(socket)
    assert json.loads(frames[0])["error"]["code"] == "request_timeout"
    assert socket.close_code == 1008 and f"{REQUEST_TIMEOUT_S:g} s" in json.loads(frames[0])["error"]["message"]


async def test_a_reader_that_stops_reading_holds_back_the_router(service):
    """The answer is far larger than every buffer on the way (kernel sockets, gRPC windows, the service's
    queue); a client that reads nothing must stop the router's stream part way, not let the service take it all."""
    total, text = 4000, "y" * 16384
    sent = {"n": 0}
    done = asyncio.Event()

    async def flood(router, request, context):
        for i in range(total):
            yield pb.GenerateResponse(chunk=pb.GenerateChunk(text=text, token_ids=[i]))
            sent["n"] += 1
        for response in tokens():
            yield response
        done.set()

    service.router.answer = flood
    # uncompressed: per-message deflate would shrink the repeated text to nothing on the wire
    async with connect(service.url("/v1/ws/completions"), max_queue=1, compression=None) as socket:
        await socket.send(json.dumps({"model": MODEL, "prompt": "Hi"}))
        await wait_until_async(lambda: sent["n"] > 0, what="the router streams")
        # unbounded buffering would take the whole answer in well under this
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout=3)
        assert sent["n"] < total
        # and nothing is lost: the reader gets every chunk once it reads
        frames = await read_to_close(socket)
    assert socket.close_code == 1000 and frames[-1] == "[DONE]"
    assert sum(len(json.loads(f)["choices"][0]["text"]) for f in frames[:-1]) == total * len(text)
