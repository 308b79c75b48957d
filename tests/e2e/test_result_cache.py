"""The result cache with real processes: two routers behind Envoy sharing a real redis-server (Debian's),
answers replayed chunk for chunk, only deterministic and complete answers stored, Redis loss survived."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request

import grpc
import pytest

from meshserve.v1 import generation_service_pb2 as pb
from meshserve.v1 import generation_service_pb2_grpc as pb_grpc
from tests.conftest import free_port, stop_process, wait_until
from tests.e2e.conftest import launch_mesh, metric_value


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    binary = shutil.which("redis-server")
    assert binary, "redis-server not found: make test installs Debian's redis-server (deploy/tools/install-redis.sh)"
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path_factory.mktemp("redis")),
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while (
        subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True).stdout.strip() != "PONG"
    ):
        assert process.poll() is None and time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.1)
    yield port, process
    if process.poll() is None:
        stop_process(process)


@pytest.fixture(scope="module")
def cached_mesh(model_dir, otlp_receiver, redis_server):
    port, _ = redis_server
    with launch_mesh(
        otlp_receiver,
        router_replicas=2,
        inference_args=["--num-slots=4"],
        router_args=[f"--result-cache-redis=redis://127.0.0.1:{port}/0"],
    ) as mesh:
        yield mesh


def question(text: str, **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=text)]),
        sampling=pb.SamplingParameters(max_tokens=24, **sampling),
    )


def run(target: str, request: pb.GenerateRequest) -> tuple[list[pb.GenerateResponse], float, tuple]:
    """The responses, the time to the first chunk, and the initial metadata."""
    with grpc.insecure_channel(target) as channel:
        started = time.monotonic()
        call = pb_grpc.GenerationServiceStub(channel).Generate(request, timeout=60)
        responses = [next(call)]
        first = time.monotonic() - started
        responses += list(call)
        return responses, first, tuple(call.initial_metadata())


def content(responses: list[pb.GenerateResponse]) -> tuple:
    complete = pb.GenerateComplete()
    complete.CopyFrom(responses[-1].complete)
    complete.ClearField("cached")
    complete.ClearField("request_id")  # each call's own
    complete.ClearField("cached_prompt_tokens")  # the prefix cache's share, or all of it on a hit
    return [r.chunk.SerializeToString() for r in responses[:-1]], complete.SerializeToString()


def test_a_repeated_greedy_request_is_the_same_answer_from_the_cache(cached_mesh):
    request = question("What is the capital of France?", temperature=0.0, logprobs=2)
    fresh, _, fresh_meta = run(cached_mesh.target, request)
    hit, _, hit_meta = run(cached_mesh.target, request)
    assert not fresh[-1].complete.cached and hit[-1].complete.cached
    assert hit[-1].complete.cached_prompt_tokens == hit[-1].complete.prompt_tokens
    assert ("x-meshserve-cache", "miss") in fresh_meta and ("x-meshserve-cache", "hit") in hit_meta
    assert content(hit) == content(fresh)  # chunk for chunk: text, ids, logprobs, finish, counts
    assert "Paris" in "".join(r.chunk.text for r in hit)  # its speed: bench/result_cache_ttft.py


def test_rest_clients_see_the_hit_in_a_header(cached_mesh):
    body = json.dumps({"prompt": "The largest planet is", "sampling": {"temperature": 0, "max_tokens": 8}}).encode()
    headers = []
    for _ in range(2):
        request = urllib.request.Request(
            f"http://{cached_mesh.target}/v1/generate", data=body, headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            headers.append(response.headers.get("x-meshserve-cache"))
            lines = [json.loads(line) for line in response.read().splitlines() if line.strip()]
        assert "complete" in lines[-1]
    assert headers == ["miss", "hit"]


def test_the_redis_tier_shares_answers_between_routers(cached_mesh):
    request = question("Name three colours.", temperature=0.0)
    first_router, second_router = f"127.0.0.1:{cached_mesh.router_port}", f"127.0.0.1:{cached_mesh.router_port + 100}"
    fresh, _, _ = run(first_router, request)
    before = metric_value(cached_mesh.metrics("router-1"), "meshserve_result_cache_hits_total", tier="redis")
    shared, _, _ = run(second_router, request)
    assert not fresh[-1].complete.cached and shared[-1].complete.cached
    assert content(shared) == content(fresh)
    assert (
        metric_value(cached_mesh.metrics("router-1"), "meshserve_result_cache_hits_total", tier="redis") == before + 1
    )


def routers_ended(mesh, code: str) -> float:
    return sum(
        metric_value(mesh.metrics(router), "meshserve_requests_total", code=code) for router in ("router-0", "router-1")
    )


def test_sampled_unseeded_no_cache_and_unfinished_requests_are_never_answered_from_it(cached_mesh):
    bypass = pb.GenerateRequest(
        prompt="A joke:", no_cache=True, sampling=pb.SamplingParameters(temperature=0.0, max_tokens=8)
    )
    for request in (question("Tell me a joke.", temperature=0.9), bypass):
        for _ in range(2):
            responses, _, _ = run(cached_mesh.target, request)
            assert not responses[-1].complete.cached
    # a stream cancelled after its first chunk is not stored
    cancelled = question("Describe the moon.", temperature=0.0)
    ended_before = routers_ended(cached_mesh, "CANCELLED")
    with grpc.insecure_channel(cached_mesh.target) as channel:
        call = pb_grpc.GenerationServiceStub(channel).Generate(cancelled, timeout=60)
        assert next(call).HasField("chunk")
        call.cancel()
    # a router stores an answer before it counts the stream ended: once counted, any wrong store is done
    wait_until(lambda: routers_ended(cached_mesh, "CANCELLED") > ended_before, 30, "a router ended the stream")
    responses, _, _ = run(cached_mesh.target, cancelled)
    assert not responses[-1].complete.cached


def test_losing_redis_costs_no_request(cached_mesh, redis_server):
    _, process = redis_server
    stop_process(process)
    for i in range(4):  # through both routers, cached in memory or not
        responses, _, _ = run(cached_mesh.target, question(f"Count to {i + 3}.", temperature=0.0))
        assert responses[-1].HasField("complete")
    log = open(cached_mesh.log_path).read()
    assert "result cache: Redis" in log
