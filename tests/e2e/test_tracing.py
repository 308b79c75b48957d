"""One client request gives one trace across Envoy, router, tokenizer and inference."""

from __future__ import annotations

import os
import time

import grpc

from meshserve.v1 import generation_service_pb2 as pb
from meshserve.v1 import generation_service_pb2_grpc as pb_grpc
from tests.conftest import wait_until

SERVICES = {"meshserve-envoy", "meshserve-router", "meshserve-tokenizer", "meshserve-inference"}


def test_one_request_one_trace_through_all_four_services(mesh):
    trace_id = os.urandom(16)
    parent_span_id = os.urandom(8)
    traceparent = f"00-{trace_id.hex()}-{parent_span_id.hex()}-01"
    with grpc.insecure_channel(mesh.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        request = pb.GenerateRequest(
            chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Hi!")]),
            sampling=pb.SamplingParameters(max_tokens=4, temperature=0),
        )
        list(stub.Generate(request, timeout=60, metadata=[("traceparent", traceparent)]))

    deadline = time.monotonic() + 20
    while True:
        spans = mesh.receiver.spans_of_trace(trace_id)
        services = {service for service, _ in spans}
        names = {span.name for _, span in spans}
        # every span's parent is in the trace (spans arrive in batches), except the client's own span
        span_ids = {span.span_id for _, span in spans} | {parent_span_id}
        orphans = [(service, span.name) for service, span in spans if span.parent_span_id not in span_ids]
        if services >= SERVICES and {"tokenize", "queue_wait", "prefill", "decode"} <= names and not orphans:
            break
        assert time.monotonic() < deadline, (
            f"trace incomplete: services={services} spans={sorted(names)} orphans={orphans}"
        )
        time.sleep(0.2)

    # the client's incoming trace is continued, not replaced: Envoy's span hangs off the client's span
    envoy_spans = [span for service, span in spans if service == "meshserve-envoy"]
    assert any(span.parent_span_id == parent_span_id for span in envoy_spans)
    by_name = {span.name: (service, span) for service, span in spans}
    assert by_name["tokenize"][0] == "meshserve-router"
    for phase in ("queue_wait", "prefill", "decode"):
        assert by_name[phase][0] == "meshserve-inference"
    prefill, decode = by_name["prefill"][1], by_name["decode"][1]
    assert prefill.end_time_unix_nano <= decode.start_time_unix_nano + 1

    # the inference replica's Generate span carries the request's id and latencies
    generate = [
        span
        for service, span in spans
        if service == "meshserve-inference" and span.name.endswith("InferenceService/Generate")
    ]
    assert len(generate) == 1
    attributes = {kv.key: kv.value for kv in generate[0].attributes}
    assert attributes["meshserve.request_id"].string_value
    ttft, e2e = (
        attributes["meshserve.latency.time_to_first_token"].double_value,
        attributes["meshserve.latency.e2e"].double_value,
    )
    assert 0 < ttft <= e2e
    assert attributes["meshserve.latency.time_in_queue"].double_value <= ttft


def test_health_checks_and_load_polling_are_not_traced(mesh):
    def request(trace_id: bytes) -> None:
        with grpc.insecure_channel(mesh.target) as channel:
            traceparent = f"00-{trace_id.hex()}-{os.urandom(8).hex()}-01"
            generate = pb.GenerateRequest(
                prompt="Hi", sampling=pb.SamplingParameters(max_tokens=2, temperature=0), no_cache=True
            )
            list(
                pb_grpc.GenerationServiceStub(channel).Generate(
                    generate, timeout=60, metadata=[("traceparent", traceparent)]
                )
            )

    def exported_by_all(trace_id: bytes) -> bool:
        return {service for service, _ in mesh.receiver.spans_of_trace(trace_id)} >= SERVICES

    # waiting for an absence: the mesh has polled and health-checked since it started, and a first request
    # shows tracing works; once a second one reached the receiver from every service, each process has
    # exported what it made before it (a batch span processor exports in order). no_cache: a replay reaches
    # no replica, so it would never be exported by inference.
    first = os.urandom(16)
    request(first)
    wait_until(lambda: exported_by_all(first), 20, "the first request's spans were exported")
    marker = os.urandom(16)
    request(marker)
    wait_until(lambda: exported_by_all(marker), 20, "the marker request's spans were exported")
    names = {span.name for _, span in list(mesh.receiver.spans)}
    assert "/meshserve.v1.GenerationService/Generate" in names
    # the public API's own info RPCs (GenerationService/GetModelInfo) are client calls, traced like Generate
    internal = {n for n in names if not n.startswith("/meshserve.v1.")}
    assert not {n for n in internal if n.endswith(("/GetLoad", "/WatchLoad", "/GetModelInfo", "/Check", "/Watch"))}, (
        names
    )
