"""The WebSocket streams (/v1/ws/chat/completions, /v1/ws/completions) with the `websockets` client, through
Envoy, against a live mesh: the same chunks as the server-sent events of the same request, a closed socket
freeing its inference slot while a neighbour streams on, bad frames getting their error frame and close code,
and, behind a JWT-secured Envoy with a per-tenant rate limit, the upgrade refused without a token (401) and
over the limit (429). Hostile clients (garbage, huge frames, many sockets closed at once) leave the service
serving the next socket.

The mesh runs without the result cache: a greedy request asked twice would otherwise be answered the second
time by replaying the first, and the comparison with the server-sent events would compare nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from services.gateway.config import TenantRateLimit
from tests.conftest import wait_until_async
from tests.e2e.conftest import Mesh, SecuredEnvoy, launch_mesh, metric_value, secured_envoy
from tests.websocket_client import read_to_close, sse_payloads

MODEL = "SmolLM2-135M-Instruct"
MAX_REQUEST_BYTES = 64 * 1024  # `meshserve up --max-request-bytes`: Envoy's body limit, the service's frame limit
RATE_LIMIT = 2  # upgrades per tenant per minute at the secured Envoy; each test uses its own tenants
LONG = {"max_tokens": 400, "min_tokens": 400}  # runs for many seconds unless cancelled


@pytest.fixture(scope="module")
def ws_mesh(model_dir, otlp_receiver) -> Iterator[Mesh]:
    with launch_mesh(
        otlp_receiver,
        inference_args=["--num-slots=4"],
        router_args=["--result-cache-mb=0"],
        up_args=["--max-request-bytes", str(MAX_REQUEST_BYTES)],
    ) as mesh:
        yield mesh


@pytest.fixture(scope="module")
def secured(ws_mesh, tmp_path_factory) -> Iterator[SecuredEnvoy]:
    with secured_envoy(
        ws_mesh,
        tmp_path_factory.mktemp("ws-secured"),
        rate_limit=TenantRateLimit(RATE_LIMIT, 60),
        max_request_bytes=MAX_REQUEST_BYTES,
        openai=True,
    ) as envoy:
        yield envoy


def url(port: int, endpoint: str = "chat/completions") -> str:
    return f"ws://127.0.0.1:{port}/v1/ws/{endpoint}"


def running(mesh: Mesh, service: str = "inference") -> float:
    return metric_value(mesh.metrics(service), "meshserve_num_requests_running")


def cancelled_at_router(mesh: Mesh) -> float:
    return metric_value(mesh.metrics("router"), "meshserve_requests_total", code="CANCELLED")


def idle(mesh: Mesh) -> bool:
    return running(mesh) == 0 and running(mesh, "router") == 0


async def exchange(port: int, frame: str | bytes, endpoint: str = "chat/completions", **options) -> tuple:
    """One frame sent, every frame read: (frames, close code, close reason)."""
    async with connect(url(port, endpoint), **options) as socket:
        await socket.send(frame)
        frames = await read_to_close(socket, parse=True)
    return frames, socket.close_code, socket.close_reason


def chat(content: str, **fields) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def without_ids(chunk: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in chunk.items() if k not in ("id", "created")}


async def test_a_greedy_chat_streams_the_same_chunks_as_server_sent_events(ws_mesh):
    body = chat("What is the capital of France?", temperature=0, max_tokens=24)
    body["stream_options"] = {"include_usage": True}
    generated = metric_value(ws_mesh.metrics("inference"), "meshserve_generation_tokens_total")
    async with connect(url(ws_mesh.port)) as socket:
        await socket.send(json.dumps(body))  # no "stream": a WebSocket always streams
        frames = await read_to_close(socket, parse=True)
    assert socket.close_code == 1000 and frames[-1] == "[DONE]"
    events = await sse_payloads(f"http://{ws_mesh.target}/v1/chat/completions", body, 120)
    assert events[-1] == "[DONE]"
    chunks, payloads = frames[:-1], [json.loads(e) for e in events[:-1]]
    # both were generated (no result cache): the inference replica counts both answers' tokens
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] > 0
    after = metric_value(ws_mesh.metrics("inference"), "meshserve_generation_tokens_total")
    assert after - generated >= 2 * usage["completion_tokens"]
    # the same greedy text and the same chunk shapes: the role first, the finish reason, usage last
    assert "Paris" in text_of(chunks) and text_of(chunks) == text_of(payloads)
    assert without_ids(chunks[0]) == without_ids(payloads[0])
    assert without_ids(chunks[-2]) == without_ids(payloads[-2]) and chunks[-2]["choices"][0]["finish_reason"]
    # the usage chunk but its cached tokens: the second request finds the first one's prompt in the prefix cache
    for usage_chunk in (chunks[-1], payloads[-1]):
        usage_chunk["usage"].pop("prompt_tokens_details")
    assert without_ids(chunks[-1]) == without_ids(payloads[-1])
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert all(set(c) == set(p) for c, p in zip(chunks, payloads, strict=False))


async def test_closing_mid_stream_frees_the_slot_and_a_neighbour_completes(ws_mesh):
    await wait_until_async(lambda: idle(ws_mesh), 30, "the mesh is idle")
    cancelled = cancelled_at_router(ws_mesh)
    neighbour_body = {"model": MODEL, "prompt": "The capital of France is", "temperature": 0, "max_tokens": 96}
    neighbour_body |= {"min_tokens": 96, "stream_options": {"include_usage": True}}
    async with connect(url(ws_mesh.port, "completions")) as neighbour:
        await neighbour.send(json.dumps(neighbour_body))
        frames = [json.loads(await neighbour.recv())]
        async with connect(url(ws_mesh.port, "completions")) as leaving:
            await leaving.send(json.dumps({"model": MODEL, "prompt": "Once upon a time", **LONG}))
            for _ in range(3):
                await leaving.recv()
            assert running(ws_mesh) >= 1
        # the socket closed with some 397 tokens to go: the router sees the call cancelled at once
        await wait_until_async(
            lambda: cancelled_at_router(ws_mesh) == cancelled + 1, 5, "the closed socket's call is cancelled"
        )
        frames += await read_to_close(neighbour, parse=True)
    assert neighbour.close_code == 1000 and frames[-1] == "[DONE]"
    assert frames[-2]["usage"]["completion_tokens"] == 96  # the neighbour's whole answer
    # and its slot is free: 400 tokens would keep it busy far longer
    await wait_until_async(lambda: idle(ws_mesh), 5, "the router and inference run nothing")


@pytest.mark.parametrize(
    ("frame", "close_code", "param", "code"),
    [
        ("not json", 1007, None, "invalid_json"),
        (b'{"model": "x"}', 1003, None, "invalid_frame"),
        (json.dumps(chat("Hi", temperature="warm")), 1008, "temperature", "invalid_type"),
        (json.dumps({"model": MODEL}), 1008, "messages", "missing_required_parameter"),
        (json.dumps(chat("Hi", stream=False)), 1008, "stream", "invalid_value"),
    ],
    ids=["not-json", "binary", "bad-field", "missing-field", "not-streaming"],
)
async def test_a_frame_that_is_not_a_request_gets_an_openai_error_frame_and_its_close_code(
    ws_mesh, frame, close_code, param, code
):
    frames, closed, reason = await exchange(ws_mesh.port, frame)
    [error] = frames
    assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["param"] == param and error["error"]["code"] == code
    assert closed == close_code and reason == code


async def test_a_frame_over_the_request_limit_is_refused_with_1009(ws_mesh):
    frame = json.dumps(chat("x" * MAX_REQUEST_BYTES, max_tokens=1))
    frames, closed, reason = await exchange(ws_mesh.port, frame)
    [error] = frames
    assert error["error"]["code"] == "request_too_large" and str(MAX_REQUEST_BYTES) in error["error"]["message"]
    assert closed == 1009 and reason == "request_too_large"
    # beyond the service's own bound (4 MiB) the protocol itself refuses to read it
    _, closed, _ = await exchange(ws_mesh.port, "x" * (4 * 1024 * 1024 + 1), max_size=None)
    assert closed == 1009


async def test_hostile_sockets_leave_the_service_serving_its_neighbours(ws_mesh):
    """Garbage, huge frames, sockets closed before, while and after sending, all at once, while one greedy
    stream runs: that stream completes, the mesh ends idle, the next socket is served."""
    await wait_until_async(lambda: idle(ws_mesh), 30, "the mesh is idle")

    async def hostile(i: int) -> None:
        try:
            async with connect(url(ws_mesh.port, ("chat/completions", "completions")[i % 2]), max_size=None) as s:
                kind = i % 5
                if kind == 0:
                    await s.send(bytes(range(256)) * 64)
                elif kind == 1:
                    await s.send("\x00{" * 40_000)
                elif kind == 2:
                    await s.send("y" * (MAX_REQUEST_BYTES * 3))
                elif kind == 3:  # a request, then gone before the first chunk
                    await s.send(json.dumps({"model": MODEL, "prompt": f"{i} Once upon a time", **LONG}))
                    return
                await read_to_close(s, parse=True)  # kind 4: says nothing and leaves
        except ConnectionClosed:
            pass

    body = {"model": MODEL, "prompt": "The capital of France is", "temperature": 0, "max_tokens": 32}
    async with connect(url(ws_mesh.port, "completions")) as neighbour:
        await neighbour.send(json.dumps(body))
        first = json.loads(await neighbour.recv())  # it holds its slot before the others come
        await asyncio.wait_for(asyncio.gather(*(hostile(i) for i in range(40))), 60)
        frames = await read_to_close(neighbour, parse=True)
    assert neighbour.close_code == 1000 and frames[-1] == "[DONE]" and first["choices"][0]["text"] is not None
    assert frames[-2]["choices"][0]["finish_reason"] in ("length", "stop")
    await wait_until_async(lambda: idle(ws_mesh), 15, "the abandoned requests are cancelled")
    frames, closed, _ = await exchange(ws_mesh.port, json.dumps(chat("Hi", max_tokens=4)))
    assert closed == 1000 and frames[-1] == "[DONE]"


# behind JWT auth and a per-tenant rate limit (the template `meshserve up --auth jwt` renders)


async def test_without_a_token_the_upgrade_is_refused_and_with_one_it_streams(secured):
    for headers in ({}, {"authorization": "Bearer not.a.token"}):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url(secured.port), additional_headers=headers):
                pass
        response = refused.value.response
        assert response.status_code == 401
        assert json.loads(response.body)["error"]["code"] == "invalid_api_key"
    headers = {"authorization": f"Bearer {secured.token('ws-authorized')}"}
    async with connect(url(secured.port), additional_headers=headers) as socket:
        await socket.send(json.dumps(chat("What is the capital of France?", temperature=0, max_tokens=8)))
        frames = await read_to_close(socket, parse=True)
    assert socket.close_code == 1000 and frames[-1] == "[DONE]" and text_of(frames[:-1]).strip()


async def test_the_tenant_rate_limit_refuses_an_upgrade_over_the_limit(secured):
    headers = {"authorization": f"Bearer {secured.token('ws-busy')}"}
    for _ in range(RATE_LIMIT):
        async with connect(url(secured.port, "completions"), additional_headers=headers) as socket:
            await socket.send(json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 2}))
            assert (await read_to_close(socket, parse=True))[-1] == "[DONE]"
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url(secured.port, "completions"), additional_headers=headers):
            pass
    response = refused.value.response
    assert response.status_code == 429 and response.headers["retry-after"] == "60"
    assert json.loads(response.body)["error"]["code"] == "rate_limit_exceeded"
    # another tenant is served
    other = {"authorization": f"Bearer {secured.token('ws-other')}"}
    async with connect(url(secured.port, "completions"), additional_headers=other) as socket:
        await socket.send(json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 2}))
        assert (await read_to_close(socket, parse=True))[-1] == "[DONE]"


async def test_a_handshake_on_an_http_route_is_a_400_naming_the_websocket_routes(ws_mesh, secured):
    """Only the WebSocket routes upgrade; a handshake elsewhere on the OpenAI paths is told where they are,
    not that its API key is bad (Envoy refuses it with a 403 before auth runs, which those paths map to 401)."""
    token = {"authorization": f"Bearer {secured.token('ws-wrong-route')}"}
    for port, headers in ((ws_mesh.port, {}), (secured.port, {}), (secured.port, token)):
        for path in ("/v1/chat/completions", "/v1/models"):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(f"ws://127.0.0.1:{port}{path}", additional_headers=headers):
                    pass
            response = refused.value.response
            assert response.status_code == 400, response.body
            error = json.loads(response.body)["error"]
            assert error["type"] == "invalid_request_error" and "/v1/ws/chat/completions" in error["message"]
