"""The public info RPCs through Envoy: model and server info, Tokenize, Abort (gRPC and REST), and the
prefix-cache hit reported with a completion."""

from __future__ import annotations

import json
import urllib.request

import grpc
import pytest

from meshserve.v1 import generation_service_pb2 as pb
from meshserve.v1 import generation_service_pb2_grpc as pb_grpc
from services.modelstore.prepare import GGUF_SHA256

SYSTEM = "You are a helpful assistant who answers questions about geography in one short sentence. " * 3


def stub(mesh) -> pb_grpc.GenerationServiceStub:
    return pb_grpc.GenerationServiceStub(grpc.insecure_channel(mesh.target))


def chat(*turns: str) -> pb.ChatMessages:
    return pb.ChatMessages(
        messages=[pb.ChatMessage(role="system", content=SYSTEM)]
        + [pb.ChatMessage(role="user", content=t) for t in turns]
    )


def test_model_info_names_the_model_its_revision_and_limits(mesh):
    info = stub(mesh).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.model == "SmolLM2-135M-Instruct"
    assert info.revision == GGUF_SHA256 and info.precision == "int8"
    assert (info.max_context_tokens, info.vocab_size, info.max_new_tokens) == (2048, 49152, 1024)


def test_server_info_reports_the_serving_replicas_and_their_capacity(mesh):
    info = stub(mesh).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    assert (info.replicas_serving, info.replicas_total, info.max_running) == (1, 1, 8)
    assert 0.0 <= info.kv_cache_usage <= 1.0


def test_tokenize_counts_what_generate_sees(mesh):
    client = stub(mesh)
    counted = client.Tokenize(pb.TokenizeRequest(chat=chat("What is the capital of Peru?")), timeout=10)
    assert counted.count == len(counted.token_ids) > 20 and counted.max_context_tokens == 2048
    request = pb.GenerateRequest(
        chat=chat("What is the capital of Peru?"), sampling=pb.SamplingParameters(temperature=0.0, max_tokens=2)
    )
    complete = list(client.Generate(request, timeout=60))[-1].complete
    assert complete.prompt_tokens == counted.count
    with pytest.raises(grpc.RpcError) as caught:
        client.Tokenize(pb.TokenizeRequest(prompt=" "), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_repeated_conversation_reports_its_prefix_cache_hit(mesh):
    client = stub(mesh)
    completes = []
    for question in ("What is the capital of Chile?", "What is the capital of Chile? Answer briefly."):
        request = pb.GenerateRequest(chat=chat(question), sampling=pb.SamplingParameters(temperature=0.0, max_tokens=2))
        completes.append(list(client.Generate(request, timeout=60))[-1].complete)
    # the second prompt shares the system prompt (and more) with the first, prefilled moments ago
    assert completes[1].cached_prompt_tokens >= 40
    assert completes[1].cached_prompt_tokens < completes[1].prompt_tokens


def test_abort_ends_a_running_stream_with_cancelled(mesh):
    client = stub(mesh)
    request = pb.GenerateRequest(
        prompt="Tell me a long story.",
        request_id="abort-me-grpc",
        sampling=pb.SamplingParameters(temperature=0.0, max_tokens=1000, min_tokens=1000),
    )
    stream = client.Generate(request, timeout=120)
    assert next(stream).HasField("chunk")
    assert client.Abort(pb.AbortRequest(request_id="abort-me-grpc"), timeout=10).aborted
    with pytest.raises(grpc.RpcError) as caught:
        for _ in stream:
            pass
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    assert not client.Abort(pb.AbortRequest(request_id="abort-me-grpc"), timeout=10).aborted
    with pytest.raises(grpc.RpcError) as caught:
        client.Abort(pb.AbortRequest(request_id="no spaces allowed"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_rest_clients_read_model_info_and_abort_their_stream(mesh):
    base = f"http://{mesh.target}"
    with urllib.request.urlopen(f"{base}/v1/model_info", timeout=10) as response:
        assert json.loads(response.read())["vocab_size"] == 49152
    body = json.dumps(
        {
            "prompt": "Tell me a long story.",
            "request_id": "abort-me-rest",
            "sampling": {"temperature": 0, "max_tokens": 1000, "min_tokens": 1000},
        }
    ).encode()
    stream = urllib.request.urlopen(
        urllib.request.Request(f"{base}/v1/generate", data=body, headers={"content-type": "application/json"}),
        timeout=120,
    )
    assert "chunk" in json.loads(stream.readline())
    abort = urllib.request.Request(
        f"{base}/v1/abort",
        data=json.dumps({"request_id": "abort-me-rest"}).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(abort, timeout=10) as response:
        assert json.loads(response.read())["aborted"] is True
    rest = stream.read().decode()  # the stream ends soon after, with the status in its last line
    assert len(rest.splitlines()) < 900
