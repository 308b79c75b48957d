"""GenAI telemetry by the OpenTelemetry conventions: the router's span names and attributes, the
gen_ai_* metrics with the conventions' buckets, and an exemplar in the TTFT histogram that leads to
its trace among the received spans."""

from __future__ import annotations

import re
import time
import urllib.request

import grpc

from meshserve.v1 import generation_service_pb2 as pb
from meshserve.v1 import generation_service_pb2_grpc as pb_grpc
from tests.e2e.conftest import metric_value

MODEL = "SmolLM2-135M-Instruct"


def generate(mesh, request: pb.GenerateRequest) -> pb.GenerateComplete:
    with grpc.insecure_channel(mesh.target) as channel:
        return list(pb_grpc.GenerationServiceStub(channel).Generate(request, timeout=60))[-1].complete


def spans_named(mesh, name: str, request_id: str, timeout_s: float = 15.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [
            span
            for service, span in list(mesh.receiver.spans)
            if service == "meshserve-router"
            and span.name == name
            and any(kv.key == "meshserve.request_id" and kv.value.string_value == request_id for kv in span.attributes)
        ]
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"no router span {name!r} for {request_id}")


def test_the_router_span_follows_the_gen_ai_conventions_without_any_text(mesh):
    request = pb.GenerateRequest(
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Name a colour. SECRET-PROMPT")]),
        request_id="gen-ai-span-1",
        sampling=pb.SamplingParameters(temperature=0.0, max_tokens=6, top_k=5, seed=9),
    )
    complete = generate(mesh, request)
    (span,) = spans_named(mesh, f"chat {MODEL}", "gen-ai-span-1")
    attributes = {kv.key: kv.value for kv in span.attributes}
    assert attributes["gen_ai.operation.name"].string_value == "chat"
    assert attributes["gen_ai.provider.name"].string_value == "meshserve"
    assert attributes["gen_ai.request.model"].string_value == MODEL
    assert attributes["gen_ai.response.model"].string_value == MODEL
    assert attributes["gen_ai.request.max_tokens"].int_value == 6
    assert attributes["gen_ai.request.temperature"].double_value == 0.0
    assert attributes["gen_ai.request.top_k"].int_value == 5 and attributes["gen_ai.request.seed"].int_value == 9
    assert attributes["gen_ai.response.id"].string_value == "gen-ai-span-1"
    assert [v.string_value for v in attributes["gen_ai.response.finish_reasons"].array_value.values] == ["length"]
    assert attributes["gen_ai.usage.input_tokens"].int_value == complete.prompt_tokens
    assert attributes["gen_ai.usage.output_tokens"].int_value == complete.completion_tokens == 6
    assert "gen_ai.usage.cache_read.input_tokens" in attributes
    every_value = repr([span for _, span in mesh.receiver.spans])
    assert "SECRET-PROMPT" not in every_value  # no prompt text in any span of any service
    # gen_ai.* attributes are the GenAI span's alone, on no other span of any service (the inference
    # replica's Generate, prefill and decode spans, the router's tokenize span), so tooling that sums
    # gen_ai.usage.* counts each request once; and no name the conventions dropped appears at all
    elsewhere = {
        kv.key
        for _, s in list(mesh.receiver.spans)
        if not any(kv.key == "gen_ai.operation.name" for kv in s.attributes)
        for kv in s.attributes
    }
    assert not {key for key in elsewhere if key.startswith("gen_ai.")}, elsewhere
    assert {"meshserve.prompt_tokens", "meshserve.completion_tokens"} <= elsewhere  # they moved, not vanished
    every_key = {kv.key for _, s in list(mesh.receiver.spans) for kv in s.attributes}
    dropped = {"gen_ai.usage.prompt_tokens", "gen_ai.usage.completion_tokens", "gen_ai.system", "gen_ai.request.id"}
    assert not every_key & dropped and not any(key.startswith("gen_ai.latency.") for key in every_key)


def test_a_plain_prompt_is_a_text_completion(mesh):
    generate(
        mesh,
        pb.GenerateRequest(
            prompt="Once upon a time",
            request_id="gen-ai-span-2",
            sampling=pb.SamplingParameters(temperature=0.0, max_tokens=2),
        ),
    )
    spans_named(mesh, f"text_completion {MODEL}", "gen-ai-span-2")


def openmetrics(mesh, service: str) -> str:
    request = urllib.request.Request(
        f"http://127.0.0.1:{mesh.metrics_ports[service]}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.read().decode()


def test_gen_ai_metrics_have_the_conventions_names_and_buckets(mesh):
    generate(mesh, pb.GenerateRequest(prompt="Hello", sampling=pb.SamplingParameters(temperature=0.0, max_tokens=3)))
    text = mesh.metrics("router")
    labels = {
        "gen_ai_operation_name": "text_completion",
        "gen_ai_provider_name": "meshserve",
        "gen_ai_request_model": MODEL,
    }
    assert metric_value(text, "gen_ai_server_time_to_first_token_seconds_count", **labels) >= 1
    assert metric_value(text, "gen_ai_server_time_per_output_token_seconds_count", **labels) >= 1
    assert metric_value(text, "gen_ai_server_request_duration_seconds_count", **labels, error_type="") >= 1
    assert "gen_ai_client_" not in text  # a server records the conventions' server metrics, not a client's
    ttft_buckets = re.findall(r'gen_ai_server_time_to_first_token_seconds_bucket\{[^}]*le="([^"]+)"', text)
    assert ttft_buckets[:16] == [
        "0.001",
        "0.005",
        "0.01",
        "0.02",
        "0.04",
        "0.06",
        "0.08",
        "0.1",
        "0.25",
        "0.5",
        "0.75",
        "1.0",
        "2.5",
        "5.0",
        "7.5",
        "10.0",
    ]


def test_an_exemplar_in_the_ttft_histogram_leads_to_its_trace(mesh):
    generate(
        mesh, pb.GenerateRequest(prompt="The sky is", sampling=pb.SamplingParameters(temperature=0.0, max_tokens=2))
    )
    text = openmetrics(mesh, "router")
    exemplars = re.findall(
        r'^meshserve_time_to_first_token_seconds_bucket\{.*\} \S+ # \{trace_id="([0-9a-f]{32})"\}', text, re.MULTILINE
    )
    assert exemplars, "no exemplar in the TTFT histogram"
    assert re.search(
        r'^meshserve_e2e_request_latency_seconds_bucket\{.*# \{trace_id="[0-9a-f]{32}"\}', text, re.MULTILINE
    )
    trace_id = bytes.fromhex(exemplars[-1])
    deadline = time.monotonic() + 15
    while not {s for s, _ in mesh.receiver.spans_of_trace(trace_id)} >= {"meshserve-router", "meshserve-inference"}:
        assert time.monotonic() < deadline, "the exemplar's trace was not received"
        time.sleep(0.2)
