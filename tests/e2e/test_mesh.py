"""The walking mesh: real processes, real Envoy, real sockets."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from meshserve.v1 import generation_service_pb2 as pb
from meshserve.v1 import generation_service_pb2_grpc as pb_grpc
from tests.conftest import REPO
from tests.e2e.conftest import metric_value

MODEL = "SmolLM2-135M-Instruct"


def stub_for(mesh) -> tuple[grpc.Channel, pb_grpc.GenerationServiceStub]:
    channel = grpc.insecure_channel(mesh.target)
    return channel, pb_grpc.GenerationServiceStub(channel)


def chat_request(text: str, max_tokens: int = 64, no_cache: bool = False, **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=text)]),
        sampling=pb.SamplingParameters(max_tokens=max_tokens, temperature=0.0, **sampling),
        no_cache=no_cache,
    )


def test_chat_cli_answers_paris_through_envoy(mesh):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli.main",
            "chat",
            "What is the capital of France?",
            "--target",
            mesh.target,
            "--temperature",
            "0",
            "--max-tokens",
            "48",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "completion tokens" in result.stderr


def test_generate_cli_continues_a_plain_prompt_with_the_asked_length(mesh):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli.main",
            "generate",
            "Once upon a time",
            "--target",
            mesh.target,
            "--temperature",
            "0.8",
            "--top-p",
            "0.95",
            "--seed",
            "7",
            "--max-tokens",
            "12",
            "--priority",
            "high",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "12 completion tokens" in result.stderr or "[stop:" in result.stderr, result.stderr


def test_bench_cli_reports_every_request_as_json(mesh):
    import json

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli.main",
            "bench",
            "--target",
            mesh.target,
            "--concurrency",
            "2",
            "--requests",
            "3",
            "--warmup",
            "1",
            "--max-tokens",
            "4",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["requests"] == 3 and report["errors"] == 0 and 3 <= report["tokens"] <= 12
    assert report["tokens_per_s"] > 0 and report["wall_s"] > 0
    for key in ("ttft_ms", "itl_ms"):
        assert {"p50", "p90", "p99"} <= report[key].keys() and report[key]["p50"] > 0


def test_generate_streams_chunks_then_completion(mesh):
    channel, stub = stub_for(mesh)
    with channel:
        responses = list(
            stub.Generate(
                pb.GenerateRequest(
                    prompt="Once upon a time", sampling=pb.SamplingParameters(max_tokens=12, temperature=0.8, seed=7)
                ),
                timeout=60,
            )
        )
    chunks = [r.chunk for r in responses if r.HasField("chunk")]
    assert len(chunks) >= 2, "tokens must stream as they are generated, not in one message"
    assert responses[-1].HasField("complete")
    complete = responses[-1].complete
    assert complete.completion_tokens == sum(len(c.token_ids) for c in chunks) == 12
    assert complete.finish_reason == pb.FINISH_REASON_LENGTH
    assert complete.prompt_tokens == 4


def test_seeded_sampling_is_reproducible_through_the_mesh(mesh):
    channel, stub = stub_for(mesh)
    # no_cache: a seeded request is deterministic, so the result cache would replay the first answer
    request = pb.GenerateRequest(
        prompt="The weather today",
        sampling=pb.SamplingParameters(max_tokens=16, min_tokens=16, temperature=1.0, seed=1234),
        no_cache=True,
    )
    with channel:
        first = list(stub.Generate(request, timeout=60))
        second = list(stub.Generate(request, timeout=60))
        request.sampling.seed = 4321
        other = [t for r in stub.Generate(request, timeout=60) for t in r.chunk.token_ids]
    assert not first[-1].complete.cached and not second[-1].complete.cached  # both generated
    ids = [[t for r in answer for t in r.chunk.token_ids] for answer in (first, second)]
    assert len(ids[0]) == 16 and ids[0] == ids[1]
    assert other != ids[0]  # the seed is what makes them equal: another seed samples another answer


@pytest.mark.parametrize(
    "request_, field",
    [
        (pb.GenerateRequest(prompt=""), "prompt"),
        (pb.GenerateRequest(), "input"),
        (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParameters(max_tokens=0)), "sampling.max_tokens"),
        (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParameters(max_tokens=-5)), "sampling.max_tokens"),
        (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParameters(max_tokens=100000)), "sampling.max_tokens"),
        (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParameters(temperature=-0.5)), "sampling.temperature"),
        (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParameters(top_p=0.0)), "sampling.top_p"),
        (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParameters(top_p=1.5)), "sampling.top_p"),
        (pb.GenerateRequest(prompt="hi", model="gpt-4"), "model"),
        (
            pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="wizard", content="hi")])),
            "chat.messages[0].role",
        ),
        (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParameters(top_k=-1)), "sampling.top_k"),
        (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParameters(min_p=2.0)), "sampling.min_p"),
        (
            pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParameters(repetition_penalty=0.0)),
            "sampling.repetition_penalty",
        ),
        (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParameters(logprobs=100)), "sampling.logprobs"),
        (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParameters(stop=["x"] * 9)), "sampling.stop"),
        (pb.GenerateRequest(prompt="hello " * 2100), "prompt"),  # over the 2048-token context
        (
            pb.GenerateRequest(prompt="hello " * 1500, sampling=pb.SamplingParameters(max_tokens=1000)),
            "sampling.max_tokens",
        ),
    ],
)
def test_bad_requests_get_invalid_argument_naming_the_field(mesh, request_, field):
    channel, stub = stub_for(mesh)
    with channel, pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(request_, timeout=30))
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(error)
    violations = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            violations += [v.field for v in bad.field_violations]
    assert violations == [field]
    assert field in error.details()
    if len(request_.prompt) > 5000:  # the context limits name the limit
        assert "max_context_tokens" in error.details()


def test_the_served_model_name_is_accepted(mesh):
    channel, stub = stub_for(mesh)
    with channel:
        responses = list(
            stub.Generate(
                pb.GenerateRequest(model=MODEL, prompt="Hello", sampling=pb.SamplingParameters(max_tokens=2)),
                timeout=30,
            )
        )
    assert responses[-1].complete.completion_tokens == 2


def test_metrics_count_the_traffic(mesh):
    before_router = mesh.metrics("router")
    before_inference = mesh.metrics("inference")
    channel, stub = stub_for(mesh)
    with channel:
        completes = [
            list(stub.Generate(chat_request(f"Count to {n}", max_tokens=5), timeout=60))[-1].complete for n in range(3)
        ]
    after_router = mesh.metrics("router")
    after_inference = mesh.metrics("inference")
    generated = sum(c.completion_tokens for c in completes)
    prompt = sum(c.prompt_tokens for c in completes)
    labels = {"model_name": MODEL}
    for before, after in ((before_router, after_router), (before_inference, after_inference)):
        assert (
            metric_value(after, "meshserve_generation_tokens_total", **labels)
            - metric_value(before, "meshserve_generation_tokens_total", **labels)
            == generated
        )
        assert (
            metric_value(after, "meshserve_prompt_tokens_total", **labels)
            - metric_value(before, "meshserve_prompt_tokens_total", **labels)
            == prompt
        )
        ttft = "meshserve_time_to_first_token_seconds_count"
        assert metric_value(after, ttft, **labels) - metric_value(before, ttft, **labels) == 3
        e2e = "meshserve_e2e_request_latency_seconds_count"
        assert metric_value(after, e2e, **labels) - metric_value(before, e2e, **labels) == 3
        itl = "meshserve_inter_token_latency_seconds_count"
        assert metric_value(after, itl, **labels) - metric_value(before, itl, **labels) == generated - 3
    # the three chats share the default system prompt: their prefix is served from the cache
    hits = "meshserve_prefix_cache_hits_total"
    assert metric_value(after_inference, hits) - metric_value(before_inference, hits) >= 2 * 16
    ok = "meshserve_requests_total"
    assert metric_value(after_router, ok, code="OK") - metric_value(before_router, ok, code="OK") == 3
    assert "meshserve_kv_cache_usage_perc" in after_inference
    assert "meshserve_num_requests_waiting" in after_inference
    # the router refuses instead of queueing: no queue gauge or histogram that would always read zero
    assert "meshserve_num_requests_waiting" not in after_router
    assert "meshserve_request_queue_time_seconds" not in after_router


def test_cancelling_a_stream_frees_the_inference_slot(mesh):
    channel, stub = stub_for(mesh)
    running = "meshserve_num_requests_running"
    with channel:
        call = stub.Generate(chat_request("Write a very long story about a dragon.", max_tokens=900), timeout=120)
        received = 0
        for response in call:
            received += len(response.chunk.token_ids)
            if received >= 5:
                break
        assert metric_value(mesh.metrics("inference"), running) == 1
        call.cancel()
        deadline = time.monotonic() + 5
        while metric_value(mesh.metrics("inference"), running) != 0:
            assert time.monotonic() < deadline, "the cancelled request still holds its slot"
            time.sleep(0.05)
    assert metric_value(mesh.metrics("inference"), "meshserve_kv_cache_usage_perc") == 0
    assert metric_value(mesh.metrics("router"), "meshserve_requests_total", code="CANCELLED") >= 1


def test_deadline_shorter_than_generation_ends_with_deadline_exceeded(mesh):
    channel, stub = stub_for(mesh)
    with channel, pytest.raises(grpc.RpcError) as caught:
        # min_tokens: the model would otherwise end its story (and the stream) before the deadline
        list(stub.Generate(chat_request("Tell me a long story.", max_tokens=900, min_tokens=900), timeout=1.0))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 5
    while metric_value(mesh.metrics("inference"), "meshserve_num_requests_running") != 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_concurrent_streams_share_the_batch_and_match_solo_runs(mesh):
    # no_cache: greedy answers are cached, and a replay of the solo answer would prove nothing about batching
    prompts = ["What is 2+2?", "Name a color.", "Say hello in French."]
    channel, stub = stub_for(mesh)

    def generated(p: str) -> list[int]:
        responses = list(stub.Generate(chat_request(p, max_tokens=16, no_cache=True), timeout=60))
        assert not responses[-1].complete.cached
        return [t for r in responses for t in r.chunk.token_ids]

    with channel:
        solo = {p: generated(p) for p in prompts}
        together: dict[str, list[int]] = {}
        start = threading.Barrier(len(prompts))

        def run(p: str) -> None:
            start.wait()
            together[p] = generated(p)

        threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert together == solo


def test_stop_strings_logprobs_and_prompt_logprobs_through_the_mesh(mesh):
    channel, stub = stub_for(mesh)
    with channel:
        plain = list(stub.Generate(chat_request("What is the capital of France?", max_tokens=24), timeout=60))
        full_text = "".join(r.chunk.text for r in plain if r.HasField("chunk"))
        assert "Paris" in full_text
        request = chat_request(
            "What is the capital of France?", max_tokens=24, stop=["Paris"], logprobs=2, prompt_logprobs=1
        )
        responses = list(stub.Generate(request, timeout=60))
    chunks = [r.chunk for r in responses if r.HasField("chunk")]
    complete = responses[-1].complete
    text = "".join(c.text for c in chunks)
    assert text == full_text[: full_text.index("Paris")]
    assert complete.finish_reason == pb.FINISH_REASON_STOP
    logprobs = [lp for c in chunks for lp in c.logprobs]
    assert [lp.token_id for lp in logprobs] == [t for c in chunks for t in c.token_ids]
    for lp in logprobs:  # greedy: the chosen token is the most likely alternative
        assert lp.logprob <= 0 and len(lp.alternatives) == 2 and lp.alternatives[0].token_id == lp.token_id
    assert len(complete.prompt_logprobs) == complete.prompt_tokens - 1
    assert all(lp.logprob <= 0 for lp in complete.prompt_logprobs)


def test_min_tokens_and_stop_token_ids(mesh):
    channel, stub = stub_for(mesh)
    with channel:
        short = list(stub.Generate(chat_request("Say hi.", max_tokens=64), timeout=60))[-1].complete
        assert short.finish_reason == pb.FINISH_REASON_STOP
        longer = list(
            stub.Generate(chat_request("Say hi.", max_tokens=64, min_tokens=short.completion_tokens + 4), timeout=60)
        )
        assert longer[-1].complete.completion_tokens >= short.completion_tokens + 4
        first = [t for r in stub.Generate(chat_request("Say hi.", max_tokens=8), timeout=60) for t in r.chunk.token_ids]
        cut = list(stub.Generate(chat_request("Say hi.", max_tokens=8, stop_token_ids=[first[2]]), timeout=60))
    assert [t for r in cut for t in r.chunk.token_ids] == first[:3]
    assert cut[-1].complete.finish_reason == pb.FINISH_REASON_STOP
