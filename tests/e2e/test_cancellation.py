"""Streams cancelled mid-flight through Envoy, every way a client can end one early (it cancels the call,
its deadline passes, its connection drops, an SSE reader closes the socket), leave the mesh as they found
it: no error-level line in any service's log, no slot or stream left held, inference memory back."""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil
import pytest

from meshserve.v1 import generation_service_pb2 as pb
from meshserve.v1 import generation_service_pb2_grpc as pb_grpc
from tests.conftest import wait_until
from tests.e2e.conftest import launch_mesh, metric_value

MODEL = "SmolLM2-135M-Instruct"
STREAMS = 100
CONCURRENCY = 8
TENANT_STREAMS = 2 * CONCURRENCY
"""The router's limit per tenant: a client thread may open its next stream a moment before the router has
counted its cancelled one out, so each thread may briefly hold two."""
MAX_TOKENS = 400  # every stream is cancelled long before this: min_tokens keeps the model from ending it sooner
PROMPTS = ["Tell me a story about a dragon.", "Describe the sea.", "Write a poem about autumn.", "Explain rain."]


@pytest.fixture(scope="module")
def quiet_mesh(model_dir, otlp_receiver):
    # a mesh of its own: its log holds nothing but what this module does to it
    # a tenant may hold TENANT_STREAMS streams: a stream whose count leaked would refuse a later one
    with launch_mesh(
        otlp_receiver,
        inference_args=[f"--num-slots={CONCURRENCY}"],
        router_args=[f"--max-streams-per-tenant={TENANT_STREAMS}"],
    ) as mesh:
        yield mesh


def generate_request(rng: random.Random) -> pb.GenerateRequest:
    # sampled without a seed: never answered from the result cache, every stream reaches an inference slot
    return pb.GenerateRequest(
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=rng.choice(PROMPTS))]),
        sampling=pb.SamplingParameters(max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, temperature=0.8),
    )


def grpc_cancelled(target: str, rng: random.Random, at_least: int = 0) -> str:
    """A gRPC stream the client cancels after a random number of chunks (none: before the first)."""
    after = rng.randrange(at_least, 16)
    with grpc.insecure_channel(target) as channel:
        call = pb_grpc.GenerationServiceStub(channel).Generate(generate_request(rng), timeout=120)
        for i, _ in enumerate(call):
            if i >= after:
                break
        call.cancel()
    return "grpc-cancel"


def grpc_deadline(target: str, rng: random.Random) -> str:
    """A gRPC stream whose deadline passes mid-generation (or before its first token)."""
    with grpc.insecure_channel(target) as channel:
        call = pb_grpc.GenerationServiceStub(channel).Generate(generate_request(rng), timeout=rng.uniform(0.05, 1.5))
        try:
            for _ in call:
                pass
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
        else:
            pytest.fail("a stream of min_tokens=max_tokens outlived a 1.5 s deadline")
    return "grpc-deadline"


def grpc_connection_dropped(target: str, rng: random.Random) -> str:
    """The client's HTTP/2 connection closes under a running stream: Envoy resets the upstream stream."""
    after = rng.randrange(0, 16)
    channel = grpc.insecure_channel(target)
    call = pb_grpc.GenerationServiceStub(channel).Generate(generate_request(rng), timeout=120)
    try:
        for i, _ in enumerate(call):
            if i >= after:
                break
    finally:
        channel.close()
    return "grpc-connection"


def sse_closed(port: int, rng: random.Random) -> str:
    """An OpenAI SSE stream whose reader closes the socket after a random number of events."""
    after = rng.randrange(0, 16)
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
            "max_tokens": MAX_TOKENS,
            "min_tokens": MAX_TOKENS,
            "temperature": 0.8,
            "stream": True,
        }
    )
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("POST", "/v1/chat/completions", body=body, headers={"content-type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200, response.read()[:500]
        events = 0
        while events < after:
            line = response.readline()
            assert line, "the stream ended before it was cancelled"
            events += line.startswith(b"data: ")
    finally:
        if connection.sock is not None:
            connection.sock.shutdown(socket.SHUT_RDWR)
        connection.close()
    return "sse"


def inference_rss(mesh) -> int:
    return psutil.Process(mesh.pids()["inference-0"]).memory_info().rss


def idle(mesh) -> bool:
    inference = mesh.metrics("inference")
    return (
        metric_value(inference, "meshserve_num_requests_running") == 0
        and metric_value(inference, "meshserve_num_requests_waiting") == 0
        and metric_value(inference, "meshserve_kv_cache_usage_perc") == 0
        and metric_value(mesh.metrics("router"), "meshserve_num_requests_running") == 0
    )


def finished_requests(mesh) -> float:
    """Generate calls the router has counted with their final status (every code)."""
    total = 0.0
    for line in mesh.metrics("router").splitlines():
        if line.startswith("meshserve_requests_total{"):
            total += float(line.rpartition(" ")[2])
    return total


def error_lines(text: str) -> list[str]:
    """Error-level log lines: the services' JSON lines at error or critical, and anything else that is not
    a JSON line at all (a traceback printed by a library bypasses logging)."""
    found = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("meshserve "):  # the launcher's own progress lines
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            found.append(line)
            continue
        if not isinstance(entry, dict) or entry.get("level") in ("error", "critical"):
            found.append(line)
    return found


def run_streams(
    kinds: list[Callable[[random.Random], str]], rng: random.Random, concurrency: int = CONCURRENCY
) -> dict[str, int]:
    seeds = [rng.randrange(1 << 30) for _ in kinds]
    done: dict[str, int] = {}
    lock = threading.Lock()

    def one(kind: Callable[[random.Random], str], seed: int) -> None:
        name = kind(random.Random(seed))
        with lock:
            done[name] = done.get(name, 0) + 1

    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(one, kind, seed) for kind, seed in zip(kinds, seeds, strict=True)]:
            future.result()
    return done


def test_streams_cancelled_at_random_points_leave_no_error_no_held_slot_and_no_memory(quiet_mesh):
    mesh = quiet_mesh
    rng = random.Random(26)
    kinds: list[Callable[[random.Random], str]] = [
        lambda r: grpc_cancelled(mesh.target, r),
        lambda r: grpc_deadline(mesh.target, r),
        lambda r: grpc_connection_dropped(mesh.target, r),
    ]
    sse: Callable[[random.Random], str] = lambda r: sse_closed(mesh.port, r)  # noqa: E731

    def plan() -> list[Callable[[random.Random], str]]:
        streams = [kinds[i % len(kinds)] for i in range(STREAMS // 2)] + [sse] * (STREAMS // 2)
        rng.shuffle(streams)
        return streams

    # a first round warms every path, batch shape and allocator arena, so the memory after the measured
    # round is compared to a warm start (later rounds of 100 each add under 1%)
    run_streams(plan(), rng)
    wait_until(lambda: idle(mesh), 30, "the warm-up streams freed their slots")
    rss_before = inference_rss(mesh)
    envoy_log = mesh.run_dir / "envoy.log"
    log_start, envoy_start = len(open(mesh.log_path).read()), len(envoy_log.read_text())
    counted_before = finished_requests(mesh)

    done = run_streams(plan(), rng)
    assert sum(done.values()) == STREAMS, done

    wait_until(lambda: finished_requests(mesh) >= counted_before + STREAMS, 60, "the router ended every stream")
    wait_until(lambda: idle(mesh), 30, "every cancelled stream freed its inference slot")
    errors = error_lines(open(mesh.log_path).read()[log_start:])
    errors += [
        line for line in envoy_log.read_text()[envoy_start:].splitlines() if "][error]" in line or "][critical]" in line
    ]
    assert not errors, "\n".join(errors[:20])
    rss_after = inference_rss(mesh)
    assert rss_after <= rss_before * 1.05, f"inference RSS grew from {rss_before >> 20} MiB to {rss_after >> 20} MiB"
    # every stream's count came back to the tenant: as many streams at once as it may hold are admitted
    held = [lambda r: grpc_cancelled(mesh.target, r, at_least=1)] * TENANT_STREAMS
    assert run_streams(held, rng, concurrency=TENANT_STREAMS) == {"grpc-cancel": TENANT_STREAMS}
