"""The whole mesh as real processes behind real Envoy, with an OTLP receiver standing in for Jaeger."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.conftest import MODELS_ROOT, REPO, free_port


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
    """The value of one sample in Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        sample, _, value = line.rpartition(" ")
        metric, _, label_text = sample.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            return float(value)
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
def launch_mesh(receiver: OtlpTraceReceiver, inference_replicas: int = 1, router_replicas: int = 1, inference_args=()):
    """Runs `meshserve up` on free ports until the block exits."""
    port = free_port()
    ports = {name: free_port() for name in ("router", "tokenizer", "inference", "admin")}
    metrics_base = 20000 + (port % 20000)
    env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.port}", OTEL_BSP_SCHEDULE_DELAY="200")
    run_dir = REPO / ".run"
    log_path = str(run_dir / f"e2e-{port}.log")
    os.makedirs(run_dir, exist_ok=True)
    log = open(log_path, "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "up", "--port", str(port), "--admin-port", str(ports["admin"]),
         "--router-port", str(ports["router"]), "--tokenizer-port", str(ports["tokenizer"]),
         "--inference-port", str(ports["inference"]), "--metrics-port-base", str(metrics_base),
         "--inference-replicas", str(inference_replicas), "--router-replicas", str(router_replicas),
         "--models-root", str(MODELS_ROOT), "--run-dir", str(run_dir),
         *[f"--inference-arg={a}" for a in inference_args]],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
    )
    deadline = time.monotonic() + 240
    while "meshserve is serving" not in open(log_path).read():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"mesh did not start:\n{open(log_path).read()[-4000:]}")
        time.sleep(0.3)
    metrics_ports = {"tokenizer": metrics_base + 2}
    for i in range(router_replicas):
        metrics_ports[f"router-{i}"] = metrics_base + 1 + 10 * i
    for i in range(inference_replicas):
        metrics_ports[f"inference-{i}"] = metrics_base + 3 + 10 * i
    metrics_ports["router"], metrics_ports["inference"] = metrics_ports["router-0"], metrics_ports["inference-0"]
    try:
        yield Mesh(port=port, router_port=ports["router"], metrics_ports=metrics_ports, receiver=receiver,
                   process=process, log_path=log_path, run_dir=run_dir / f"mesh-{port}")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="session")
def mesh(model_dir, otlp_receiver):
    with launch_mesh(otlp_receiver, inference_args=["--num-slots=8"]) as mesh:
        yield mesh
