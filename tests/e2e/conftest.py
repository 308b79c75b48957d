"""The whole mesh as real processes behind real Envoy, with an OTLP receiver standing in for Jaeger."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from services.gateway.config import (
    Endpoint,
    JwtAuth,
    TenantRateLimit,
    TlsFiles,
    build_descriptor_set,
    envoy_binary,
    public_channel,
    render_envoy_config,
    validate_envoy_config,
)
from services.gateway.credentials import ensure_dev_tls, ensure_signing_key, mint_token
from tests.conftest import MODELS_ROOT, REPO, free_port, free_port_block, stop_process


class OtlpTraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Collects every exported span, as Jaeger's OTLP/gRPC receiver would."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []  # (service.name, Span)
        self._lock = threading.Lock()

    def Export(self, request, context):
        with self._lock:
            for resource_spans in request.resource_spans:
                service = next(
                    (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), ""
                )
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append((service, span))
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans_of_trace(self, trace_id: bytes) -> list[tuple[str, object]]:
        with self._lock:
            return [(s, span) for s, span in self.spans if span.trace_id == trace_id]


@dataclass
class Mesh:
    port: int
    router_port: int
    metrics_ports: dict[str, int]
    receiver: OtlpTraceReceiver
    process: subprocess.Popen
    log_path: str
    run_dir: object
    openai_port: int = 0
    """The OpenAI-compatible service itself (behind Envoy, its API is on `port`)."""
    target: str = field(init=False)

    def __post_init__(self) -> None:
        self.target = f"127.0.0.1:{self.port}"

    def pids(self) -> dict[str, int]:
        import json

        return json.loads((self.run_dir / "pids.json").read_text())

    def metrics(self, service: str) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_ports[service]}/metrics", timeout=5) as r:
            return r.read().decode()


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format: 0 for a labelled sample not created yet,
    but a metric the text does not declare at all fails the test (a renamed metric never reads 0)."""
    declared = False
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            declared |= name.startswith(line.split()[2])
            continue
        if line.startswith("#") or not line.startswith(name):
            continue
        sample, _, value = line.rpartition(" ")
        metric, _, label_text = sample.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            return float(value)
    assert declared, f"{name} is not exported"
    return 0.0


@pytest.fixture(scope="session")
def otlp_receiver():
    receiver = OtlpTraceReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    receiver.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield receiver
    server.stop(0)


@contextlib.contextmanager
def launch_mesh(
    receiver: OtlpTraceReceiver,
    inference_replicas: int = 1,
    router_replicas: int = 1,
    inference_args=(),
    router_args=(),
    up_args=(),
):
    """Runs `meshserve up` on free ports until the block exits."""
    port = free_port()
    ports = {name: free_port() for name in ("tokenizer", "admin", "openai")}
    # the launcher derives replicas' ports from a base (+100 a replica, +50 for fallbacks; metrics +10 a
    # replica; a router's admin port +10): one block holds the routers' (base + 0, 100, ...) and their admin
    # ports (base + 10, 110, ...), inference's (base + 25, 75, ...) and metrics'
    base = free_port_block([*range(0, 400, 100), *range(10, 410, 100), *range(25, 425, 50), *range(500, 540)])
    ports |= {"router": base, "inference": base + 25}
    metrics_base = base + 500
    env = dict(
        os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.port}", OTEL_BSP_SCHEDULE_DELAY="200"
    )
    run_dir = REPO / ".run"
    log_path = str(run_dir / f"e2e-{port}.log")
    os.makedirs(run_dir, exist_ok=True)
    log = open(log_path, "w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli.main",
            "up",
            "--port",
            str(port),
            "--admin-port",
            str(ports["admin"]),
            "--router-port",
            str(ports["router"]),
            "--tokenizer-port",
            str(ports["tokenizer"]),
            "--inference-port",
            str(ports["inference"]),
            "--openai-port",
            str(ports["openai"]),
            "--metrics-port-base",
            str(metrics_base),
            "--inference-replicas",
            str(inference_replicas),
            "--router-replicas",
            str(router_replicas),
            "--models-root",
            str(MODELS_ROOT),
            "--run-dir",
            str(run_dir),
            *[f"--inference-arg={a}" for a in inference_args],
            *[f"--router-arg={a}" for a in router_args],
            *up_args,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    deadline = time.monotonic() + 240
    while "meshserve is serving" not in open(log_path).read():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"mesh did not start:\n{open(log_path).read()[-4000:]}")
        time.sleep(0.3)
    metrics_ports = {"tokenizer": metrics_base + 2, "openai": metrics_base + 4}
    for i in range(router_replicas):
        metrics_ports[f"router-{i}"] = metrics_base + 1 + 10 * i
    # with --model-version, each version has inference_replicas replicas, numbered on after the first's
    versions = max(1, sum(str(a).startswith("--model-version") for a in up_args))
    for i in range(inference_replicas * versions):
        metrics_ports[f"inference-{i}"] = metrics_base + 3 + 10 * i
        metrics_ports[f"fallback-{i}"] = metrics_base + 5 + 10 * i  # when --fallback-replicas asks for them
    metrics_ports["router"], metrics_ports["inference"] = metrics_ports["router-0"], metrics_ports["inference-0"]
    try:
        yield Mesh(
            port=port,
            router_port=ports["router"],
            metrics_ports=metrics_ports,
            receiver=receiver,
            process=process,
            log_path=log_path,
            run_dir=run_dir / f"mesh-{port}",
            openai_port=ports["openai"],
        )
    finally:
        stop_process(process, signal.SIGINT, timeout=60)
        log.close()


@pytest.fixture(scope="session")
def mesh(model_dir, otlp_receiver):
    with launch_mesh(otlp_receiver, inference_args=["--num-slots=8"]) as mesh:
        yield mesh


@contextlib.contextmanager
def running_envoy(config: str, directory: Path, port: int, tls: TlsFiles | None) -> Iterator[subprocess.Popen]:
    """Validates and runs one Envoy until the block exits; ready once a health check through it is SERVING."""
    path = directory / "envoy.yaml"
    path.write_text(config)
    validated = validate_envoy_config(path)
    assert validated.returncode == 0, validated.stderr[-3000:]
    log = directory / "envoy.log"
    process = subprocess.Popen(
        [envoy_binary(), "-c", str(path), "--use-dynamic-base-id", "--log-level", "warn", "--log-path", str(log)]
    )
    try:
        with public_channel(f"127.0.0.1:{port}", tls) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 30
            while True:
                assert process.poll() is None, f"envoy exited with {process.returncode}: {log.read_text()[-3000:]}"
                try:
                    request = health_pb2.HealthCheckRequest(service="meshserve.v1.GenerationService")
                    if health.Check(request, timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, f"envoy did not become ready: {log.read_text()[-3000:]}"
                time.sleep(0.1)
        yield process
    finally:
        stop_process(process)


@dataclass
class SecuredEnvoy:
    """A running Envoy with JWT auth (and optionally TLS, a rate limit, REST, gRPC-Web, OpenAI routes) in front
    of a mesh's router: what the e2e tests of the secured public endpoint share."""

    port: int
    directory: Path
    credentials: Path
    """The development signing key's directory: tokens minted from it verify."""
    ca: Path | None
    process: subprocess.Popen

    @property
    def target(self) -> str:
        return f"{'localhost' if self.ca else '127.0.0.1'}:{self.port}"

    def token(self, tenant: str, **claims) -> str:
        return mint_token(self.credentials, tenant, **claims)

    def bearer(self, tenant: str, **claims) -> tuple[tuple[str, str], ...]:
        """gRPC metadata carrying a token of `tenant`."""
        return (("authorization", f"Bearer {self.token(tenant, **claims)}"),)


@contextlib.contextmanager
def secured_envoy(
    mesh: Mesh,
    directory: Path,
    *,
    tls: bool = False,
    rate_limit: TenantRateLimit | None = None,
    rest: bool = False,
    grpc_web: bool = False,
    max_request_bytes: int | None = None,
    openai: bool = False,
) -> Iterator[SecuredEnvoy]:
    """Renders, validates and runs a JWT-secured Envoy (the one template, as `meshserve up --auth jwt` does)
    in front of `mesh`'s router until the block exits."""
    credentials = directory / "credentials"
    dev_tls = ensure_dev_tls(directory / "tls") if tls else None
    tls_files = TlsFiles(dev_tls.cert, dev_tls.key, dev_tls.ca) if dev_tls else None
    port = free_port()
    config = render_envoy_config(
        port,
        free_port(),
        [Endpoint("127.0.0.1", mesh.router_port)],
        None,
        "127.0.0.1",
        tls=tls_files,
        jwt=JwtAuth(ensure_signing_key(credentials).jwks, "meshserve-dev", ("meshserve",)),
        rate_limit=rate_limit,
        rest_descriptor=build_descriptor_set(directory / "generation_service.pb") if rest else None,
        grpc_web=grpc_web,
        max_request_bytes=max_request_bytes,
        openai_endpoints=[Endpoint("127.0.0.1", mesh.openai_port)] if openai else None,
    )
    with running_envoy(config, directory, port, tls_files) as process:
        yield SecuredEnvoy(port, directory, credentials, dev_tls.ca if dev_tls else None, process)
