"""The public endpoint as production configures it: an Envoy of our own in front of the mesh's router with
TLS (development CA), JWT auth, per-tenant rate limits, REST/JSON, gRPC-Web and the request size limit."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import struct
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from meshserve.v1 import generation_service_pb2 as pb
from meshserve.v1 import generation_service_pb2_grpc as pb_grpc
from services.gateway.config import (
    TenantRateLimit,
)
from services.gateway.credentials import mint_token
from tests.e2e.conftest import secured_envoy

MAX_REQUEST_BYTES = 64 * 1024
RATE_LIMIT = 2  # generations per tenant per minute; every test uses its own tenants
GENERATE = "/meshserve.v1.GenerationService/Generate"


@dataclass
class PublicEndpoint:
    port: int
    ca: Path
    credentials: Path
    process: subprocess.Popen

    @property
    def target(self) -> str:
        return f"localhost:{self.port}"

    def token(self, tenant: str) -> str:
        return mint_token(self.credentials, tenant)

    def channel(self) -> grpc.Channel:
        return grpc.secure_channel(self.target, grpc.ssl_channel_credentials(self.ca.read_bytes()))

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


@pytest.fixture(scope="module")
def endpoint(mesh, tmp_path_factory) -> Iterator[PublicEndpoint]:
    with secured_envoy(
        mesh,
        tmp_path_factory.mktemp("public-endpoint"),
        tls=True,
        rate_limit=TenantRateLimit(RATE_LIMIT, 60),
        rest=True,
        grpc_web=True,
        max_request_bytes=MAX_REQUEST_BYTES,
    ) as envoy:
        assert envoy.ca is not None
        yield PublicEndpoint(envoy.port, envoy.ca, envoy.credentials, envoy.process)


def router_requests(mesh) -> float:
    """All Generate calls the router has answered, whatever their status."""
    total = 0.0
    for line in mesh.metrics("router").splitlines():
        if line.startswith("meshserve_requests_total{"):
            total += float(line.rpartition(" ")[2])
    return total


def small_request(prompt: str = "The capital of France is") -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParameters(max_tokens=8, temperature=0.0))


def generate(endpoint: PublicEndpoint, request: pb.GenerateRequest, metadata=()) -> list[pb.GenerateResponse]:
    with endpoint.channel() as channel:
        return list(pb_grpc.GenerationServiceStub(channel).Generate(request, metadata=metadata, timeout=60))


def assert_streamed(kinds: list[str]) -> None:
    """Chunks as tokens come (several messages, not one; a busy server may coalesce some), then the completion."""
    assert kinds[-1] == "complete" and set(kinds[:-1]) == {"chunk"} and len(kinds) >= 3, kinds


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


def test_tls_handshake_verifies_against_the_generated_ca(endpoint):
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=5) as raw:
        context = endpoint.ssl_context()
        context.set_alpn_protocols(["h2", "http/1.1"])
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            assert tls.selected_alpn_protocol() == "h2"  # what gRPC needs
            assert ("DNS", "localhost") in tls.getpeercert()["subjectAltName"]
    # a client that does not trust the development CA refuses the certificate
    with (
        socket.create_connection(("127.0.0.1", endpoint.port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        ssl.create_default_context().wrap_socket(raw, server_hostname="localhost")
    # and plaintext gRPC gets nowhere
    with grpc.insecure_channel(endpoint.target) as channel:
        error = rpc_error(lambda: list(pb_grpc.GenerationServiceStub(channel).Generate(small_request(), timeout=5)))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_requests_without_valid_credentials_are_refused_at_envoy(endpoint, mesh, tmp_path):
    before = router_requests(mesh)
    foreign_key_token = mint_token(tmp_path / "other-key", "acme")  # right claims, signed by a key Envoy does not know
    expired = mint_token(endpoint.credentials, "acme", ttl_s=60, now=time.time() - 3600)
    wrong_audience = mint_token(endpoint.credentials, "acme", audience="someone-else")
    for metadata in [(), bearer("not-a-jwt"), bearer(foreign_key_token), bearer(expired), bearer(wrong_audience)]:
        error = rpc_error(lambda metadata=metadata: generate(endpoint, small_request(), metadata))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (metadata, error.details())
    assert "Jwt" in error.details()
    assert router_requests(mesh) == before, "a refused request reached the router"


def test_a_valid_token_is_served(endpoint, mesh):
    before = router_requests(mesh)
    responses = generate(endpoint, small_request(), bearer(endpoint.token("served")))
    assert_streamed([r.WhichOneof("response") for r in responses])
    assert "Paris" in "".join(r.chunk.text for r in responses)
    assert router_requests(mesh) == before + 1


def test_rate_limit_is_per_tenant_and_keyed_by_the_verified_claim(endpoint):
    busy, other = endpoint.token("busy-tenant"), endpoint.token("other-tenant")
    for _ in range(RATE_LIMIT):
        generate(endpoint, small_request(), bearer(busy))
    error = rpc_error(lambda: generate(endpoint, small_request(), bearer(busy)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"rate_limit_per_tenant is {RATE_LIMIT} requests per 60 s" in error.details()
    # another tenant has its own bucket, and naming the busy tenant in a header does not charge it there
    spoofed = (*bearer(other), ("x-meshserve-tenant", "busy-tenant"))
    assert generate(endpoint, small_request(), spoofed)[-1].HasField("complete")


def test_rest_generate_streams_newline_delimited_json(endpoint):
    body = json.dumps({"prompt": "The capital of France is", "sampling": {"max_tokens": 4, "temperature": 0}})
    request = urllib.request.Request(
        f"https://localhost:{endpoint.port}/v1/generate",
        data=body.encode(),
        method="POST",
        headers={"content-type": "application/json", "authorization": f"Bearer {endpoint.token('rest')}"},
    )
    with urllib.request.urlopen(request, context=endpoint.ssl_context(), timeout=60) as response:
        assert response.status == 200
        assert response.headers["transfer-encoding"] == "chunked"  # streamed, not one buffered document
        lines = [json.loads(line) for line in response.read().decode().splitlines() if line.strip()]
    assert_streamed([next(iter(line)) for line in lines])
    assert "Paris" in "".join(line["chunk"]["text"] for line in lines[:-1])
    complete = lines[-1]["complete"]
    assert complete["finish_reason"] == "FINISH_REASON_LENGTH" and complete["completion_tokens"] == 4

    # a refused request comes back as an HTTP status with the google.rpc.Status as JSON
    bad = urllib.request.Request(
        f"https://localhost:{endpoint.port}/v1/generate",
        data=b'{"prompt": ""}',
        method="POST",
        headers={"content-type": "application/json", "authorization": f"Bearer {endpoint.token('rest')}"},
    )
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(bad, context=endpoint.ssl_context(), timeout=60)
    assert raised.value.code == 400
    status = json.loads(raised.value.read())
    assert status["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status["details"][0]["field_violations"][0]["field"] == "prompt"


def grpc_web_call(
    endpoint: PublicEndpoint, request: pb.GenerateRequest, token: str | None
) -> tuple[http.client.HTTPResponse, list[tuple[int, bytes]]]:
    """One gRPC-Web call as a browser makes it: a plain HTTP/1.1 POST of length-prefixed frames."""
    message = request.SerializeToString()
    headers = {"content-type": "application/grpc-web+proto", "x-grpc-web": "1"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    connection = http.client.HTTPSConnection("localhost", endpoint.port, context=endpoint.ssl_context(), timeout=60)
    try:
        connection.request("POST", GENERATE, body=b"\x00" + struct.pack(">I", len(message)) + message, headers=headers)
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    frames, offset = [], 0
    while offset < len(data):
        flags, length = data[offset], struct.unpack(">I", data[offset + 1 : offset + 5])[0]
        frames.append((flags, data[offset + 5 : offset + 5 + length]))
        offset += 5 + length
    return response, frames


def test_grpc_web_over_http1(endpoint):
    response, frames = grpc_web_call(endpoint, small_request(), endpoint.token("browser"))
    assert response.status == 200 and response.version == 11
    assert response.headers["content-type"].startswith("application/grpc-web")
    messages = [pb.GenerateResponse.FromString(payload) for flags, payload in frames if not flags & 0x80]
    trailers = [payload.decode() for flags, payload in frames if flags & 0x80]
    assert_streamed([m.WhichOneof("response") for m in messages])
    assert trailers and "grpc-status:0" in trailers[-1]

    response, frames = grpc_web_call(endpoint, small_request(), token=None)
    assert response.headers["grpc-status"] == str(grpc.StatusCode.UNAUTHENTICATED.value[0])


def test_an_oversize_message_is_refused_naming_the_limit(endpoint, mesh):
    before = router_requests(mesh)
    huge = small_request("x" * (MAX_REQUEST_BYTES + 1))
    error = rpc_error(lambda: generate(endpoint, huge, bearer(endpoint.token("huge"))))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"max_request_bytes ({MAX_REQUEST_BYTES} bytes)" in error.details()

    body = json.dumps({"prompt": "x" * (MAX_REQUEST_BYTES + 1)}).encode()
    request = urllib.request.Request(
        f"https://localhost:{endpoint.port}/v1/generate",
        data=body,
        method="POST",
        headers={"content-type": "application/json", "authorization": f"Bearer {endpoint.token('huge-rest')}"},
    )
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, context=endpoint.ssl_context(), timeout=60)
    assert raised.value.code == 413
    assert f"max_request_bytes ({MAX_REQUEST_BYTES} bytes)" in raised.value.read().decode()
    assert router_requests(mesh) == before, "an oversize request reached the router"

    # just under the limit passes Envoy; the router then judges the prompt (here: too many tokens)
    fits = small_request("Paris " * ((MAX_REQUEST_BYTES - 200) // 6))
    error = rpc_error(lambda: generate(endpoint, fits, bearer(endpoint.token("fits"))))
    assert "max_request_bytes" not in error.details()
    assert router_requests(mesh) == before + 1
