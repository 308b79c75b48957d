"""Priority and fairness as policy: a tenant's streams are bounded, its priority is what its verified token
allows, client-sent tenant headers are ignored, and no stream outlives the server's limit."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from meshserve.v1 import generation_service_pb2 as pb
from meshserve.v1 import generation_service_pb2_grpc as pb_grpc
from services.gateway.credentials import mint_token
from tests.e2e.conftest import launch_mesh, metric_value, secured_envoy

STREAMS_PER_TENANT = 2
MAX_STREAM_S = 8.0


@pytest.fixture(scope="module")
def policed(model_dir, otlp_receiver):
    args = [f"--max-streams-per-tenant={STREAMS_PER_TENANT}", f"--max-stream-duration-s={MAX_STREAM_S}"]
    # no speculative drafts: a 1,000-token stream must outlast the duration limit, and drafts on its
    # repetitive story can make it finish first
    inference = ["--num-slots=8", "--num-speculative-tokens=0"]
    with launch_mesh(otlp_receiver, inference_args=inference, router_args=args) as mesh:
        yield mesh


@pytest.fixture(scope="module")
def jwt_endpoint(policed, tmp_path_factory) -> Iterator[tuple[str, object]]:
    """An Envoy with JWT auth in front of the policed mesh's router; yields its target and the credentials dir."""
    with secured_envoy(policed, tmp_path_factory.mktemp("tenancy")) as envoy:
        yield envoy.target, envoy.credentials


def long_request(request_id: str = "", priority: int = pb.PRIORITY_NORMAL) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt="Write a very long story about the sea.",
        request_id=request_id,
        priority=priority,
        sampling=pb.SamplingParameters(temperature=0.0, max_tokens=1000, min_tokens=1000),
    )


def start_stream(stub, metadata=()) -> grpc.Future:
    """A running stream: its first chunk has arrived."""
    call = stub.Generate(long_request(), metadata=metadata)
    assert next(call).HasField("chunk")
    return call


def refusal(stub, metadata=()) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        next(stub.Generate(long_request(), metadata=metadata, timeout=30))
    return caught.value


def bearer(credentials, tenant: str, **claims) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {mint_token(credentials, tenant, **claims)}"),)


def test_a_tenant_past_its_stream_limit_is_refused_while_another_tenant_is_served(jwt_endpoint):
    target, credentials = jwt_endpoint
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        held = [start_stream(stub, bearer(credentials, "tenant-a")) for _ in range(STREAMS_PER_TENANT)]
        try:
            error = refusal(stub, bearer(credentials, "tenant-a"))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            assert "max_streams_per_tenant" in error.details()
            details = rpc_status.from_call(error).details
            assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in details)
            # claiming to be someone else in a header changes nothing: Envoy sets the tenant from the token
            spoofed = refusal(stub, bearer(credentials, "tenant-a") + (("x-meshserve-tenant", "tenant-b"),))
            assert spoofed.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            other = start_stream(stub, bearer(credentials, "tenant-b"))
            other.cancel()
        finally:
            for call in held:
                call.cancel()


def test_unauthenticated_clients_are_one_tenant_whatever_header_they_send(policed):
    with grpc.insecure_channel(policed.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        held = [start_stream(stub, (("x-meshserve-tenant", f"me-{i}"),)) for i in range(STREAMS_PER_TENANT)]
        try:
            assert refusal(stub, (("x-meshserve-tenant", "someone-new"),)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            for call in held:
                call.cancel()


def router_priority(mesh, request_id: str) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for service, span in list(mesh.receiver.spans):
            attributes = {kv.key: kv.value.string_value for kv in span.attributes}
            if service == "meshserve-router" and attributes.get("meshserve.request_id") == request_id:
                return attributes["meshserve.priority"]
        time.sleep(0.2)
    raise AssertionError(f"no router span for {request_id}")


def test_high_priority_is_honoured_only_for_tenants_whose_token_allows_it(jwt_endpoint, policed):
    target, credentials = jwt_endpoint
    cases = {
        "prio-vip": bearer(credentials, "vip", max_priority="high"),
        "prio-plain": bearer(credentials, "plain"),
        "prio-anonymous": (),
    }
    with grpc.insecure_channel(target) as channel, grpc.insecure_channel(policed.target) as open_channel:
        for request_id, metadata in cases.items():
            stub = pb_grpc.GenerationServiceStub(open_channel if not metadata else channel)
            request = pb.GenerateRequest(
                prompt="Hi",
                request_id=request_id,
                priority=pb.PRIORITY_HIGH,
                sampling=pb.SamplingParameters(temperature=0.0, max_tokens=2),
            )
            assert list(stub.Generate(request, metadata=metadata + (("x-meshserve-max-priority", "high"),)))[
                -1
            ].HasField("complete")
    assert router_priority(policed, "prio-vip") == "PRIORITY_HIGH"
    assert router_priority(policed, "prio-plain") == "PRIORITY_NORMAL"
    assert router_priority(policed, "prio-anonymous") == "PRIORITY_NORMAL"


def test_no_stream_outlives_the_servers_duration_limit_and_its_slot_is_freed(policed):
    with grpc.insecure_channel(policed.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        started = time.monotonic()
        call = stub.Generate(long_request())  # no client deadline at all
        with pytest.raises(grpc.RpcError) as caught:
            for _ in call:
                pass
        elapsed = time.monotonic() - started
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert MAX_STREAM_S - 0.5 <= elapsed < MAX_STREAM_S + 5
    deadline = time.monotonic() + 10
    while metric_value(policed.metrics("inference"), "meshserve_num_requests_running") > 0:
        assert time.monotonic() < deadline, "the slot of the ended stream was not freed"
        time.sleep(0.2)


def test_only_the_tenant_that_started_a_request_can_abort_it(jwt_endpoint):
    target, credentials = jwt_endpoint
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        call = stub.Generate(long_request("owned-by-a"), metadata=bearer(credentials, "tenant-a"))
        assert next(call).HasField("chunk")
        stranger = stub.Abort(pb.AbortRequest(request_id="owned-by-a"), metadata=bearer(credentials, "tenant-b"))
        assert not stranger.aborted
        assert next(call).HasField("chunk")  # still running
        owner = stub.Abort(pb.AbortRequest(request_id="owned-by-a"), metadata=bearer(credentials, "tenant-a"))
        assert owner.aborted
        with pytest.raises(grpc.RpcError) as caught:
            for _ in call:
                pass
        assert caught.value.code() == grpc.StatusCode.CANCELLED
