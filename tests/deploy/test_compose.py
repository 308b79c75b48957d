"""The compose files: valid against the Compose Specification's JSON schema (vendored in
deploy/compose/compose-spec.schema.json), wired as docs/conventions.md says, and their gRPC
healthcheck command run against a real grpc.health.v1 server."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import jsonschema
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.conftest import free_port
from tests.deploy.conftest import DEPLOY, REPO, conventions_processes, model_precision

COMPOSE_DIR = DEPLOY / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
GPU_OVERRIDE = COMPOSE_DIR / "compose.gpu.yaml"
SCHEMA = COMPOSE_DIR / "compose-spec.schema.json"
MESHSERVE_SERVICES = ("router", "tokenizer", "inference")


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _merge(base: dict, override: dict) -> dict:
    """Compose's merge of an override file, for the keys used here: mappings merge, the rest replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def _errors(document: dict) -> list[str]:
    return [f"{e.json_path}: {e.message}" for e in _validator().iter_errors(document)]


def _flag(command: list[str], name: str) -> list[str]:
    return [command[i + 1] for i, arg in enumerate(command) if arg == name]


def test_schema_is_the_compose_specification():
    schema = json.loads(SCHEMA.read_text())
    assert schema["title"] == "Compose Specification"
    assert "check-jsonschema" in schema["$comment"]  # where it came from
    assert {"services", "networks", "volumes"} <= set(schema["properties"])


@pytest.mark.parametrize(
    "document",
    [
        pytest.param(lambda: _load(COMPOSE), id="compose.yaml"),
        pytest.param(lambda: _load(GPU_OVERRIDE), id="compose.gpu.yaml"),
        pytest.param(lambda: _merge(_load(COMPOSE), _load(GPU_OVERRIDE)), id="compose.yaml+compose.gpu.yaml"),
    ],
)
def test_compose_files_validate_against_the_specification(document):
    assert _errors(document()) == []


def test_the_schema_rejects_mistakes():
    broken = _load(COMPOSE)
    broken["services"]["router"]["depends_on"]["tokenizer"]["condition"] = "service_happy"
    assert any("service_happy" in e for e in _errors(broken))
    broken = _load(COMPOSE)
    broken["services"]["router"]["helthcheck"] = broken["services"]["router"].pop("healthcheck")
    assert any("helthcheck" in e for e in _errors(broken))


def test_services_and_commands_follow_the_conventions():
    services = _load(COMPOSE)["services"]
    assert {"envoy", "openai", *MESHSERVE_SERVICES, "redis", "jaeger", "prometheus", "alertmanager", "grafana"} <= set(
        services
    )
    processes = conventions_processes()
    for name in MESHSERVE_SERVICES:
        service, process = services[name], processes[name]
        command = service["command"]
        assert command[:2] == ["meshserve", f"serve-{name}"]
        assert _flag(command, "--host") == ["0.0.0.0"]
        assert _flag(command, "--port") == [str(process.grpc_port)]
        assert _flag(command, "--metrics-port") == [str(process.metrics_port)]
        assert service["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
        [grace] = _flag(command, "--shutdown-grace-s")
        notice = float((_flag(command, "--drain-notice-s") or ["2"])[0])  # the router's default notice
        # up to the grace for in-flight streams, then as long again before the gRPC server cancels the rest
        drain_s = notice + 2 * float(grace)
        assert _seconds(service["stop_grace_period"]) > drain_s, f"compose would kill {name} mid-drain"
    router = services["router"]["command"]
    assert _flag(router, "--tokenizer-target") == [f"tokenizer:{processes['tokenizer'].grpc_port}"]
    assert _flag(router, "--inference-target") == [f"inference:{processes['inference'].grpc_port}"]
    envoy = services["envoy"]
    wrapper, envoy_command = (
        envoy["command"][: envoy["command"].index("--")],
        envoy["command"][envoy["command"].index("--") + 1 :],
    )
    assert wrapper[:2] == ["python", "/opt/meshserve/envoy-entrypoint.py"], "SIGTERM must drain Envoy, not cut streams"
    assert _seconds(envoy["stop_grace_period"]) > float(_flag(wrapper, "--drain-timeout-s")[0])
    assert envoy_command[:3] == ["envoy", "-c", "/etc/envoy/envoy.yaml"]
    assert (
        f"127.0.0.1:${{MESHSERVE_PORT:-{processes['envoy'].grpc_port}}}:{processes['envoy'].grpc_port}"
        in envoy["ports"]
    )
    assert "4317" in services["jaeger"]["expose"]


def _seconds(duration: str) -> float:
    return float(duration.removesuffix("s"))


def _published(service: dict) -> list[str]:
    """Published ports as written, long syntax folded into host_ip:published:target."""
    return [
        p if isinstance(p, str) else f"{p.get('host_ip', '')}:{p['published']}:{p['target']}"
        for p in service.get("ports", [])
    ]


def test_every_published_port_is_on_loopback_and_admin_ports_are_not_published():
    """The public listener has no authentication in compose's Envoy config, Envoy's admin port has
    /quitquitquit: nothing is reachable from other hosts unless an operator says so (deploy/README.md)."""
    services = _load(COMPOSE)["services"]
    for name, service in services.items():
        for port in _published(service):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
            assert not port.endswith(":9901"), f"{name} publishes Envoy's admin port"
    envoy_config = yaml.safe_load((COMPOSE_DIR / "envoy.yaml").read_text())
    hcm = envoy_config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert "envoy.filters.http.jwt_authn" not in {f["name"] for f in hcm["http_filters"]}, (
        "compose's listener authenticates now: this test's reason to insist on loopback is gone; revisit it"
    )


def test_prometheus_and_grafana_have_no_open_admin():
    services = _load(COMPOSE)["services"]
    command = services["prometheus"]["command"]
    assert not [a for a in command if a.startswith(("--web.enable-lifecycle", "--web.enable-admin-api"))]
    grafana = services["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    password = grafana["GF_SECURITY_ADMIN_PASSWORD"]
    # required from the environment (compose refuses to run without it), with no default in the repository
    assert password.startswith("${GRAFANA_ADMIN_PASSWORD:?"), password
    assert not any(k.startswith("GF_AUTH_ANONYMOUS_ORG_ROLE") for k in grafana)


def test_inference_serves_the_precision_the_image_prepares():
    """The image bakes in one precision's model; compose's serve-inference must ask for that one, or the
    container exits at start-up with 'no prepared model'."""
    from services.cli.main import build_parser

    for document, dockerfile in [
        (_load(COMPOSE), "Dockerfile"),
        (_merge(_load(COMPOSE), _load(GPU_OVERRIDE)), "Dockerfile.gpu"),
    ]:
        inference = document["services"]["inference"]
        assert inference["build"]["dockerfile"] == f"deploy/docker/{dockerfile}"
        args = build_parser().parse_args(inference["command"][1:])
        assert args.precision == model_precision(DEPLOY / "docker" / dockerfile), dockerfile


@pytest.mark.parametrize("override", [False, True], ids=["compose.yaml", "with compose.gpu.yaml"])
def test_commands_parse_with_the_real_cli(override: bool):
    """Every meshserve command in the compose files is accepted by `meshserve`'s own argument parser."""
    from services.cli.main import build_parser

    document = _merge(_load(COMPOSE), _load(GPU_OVERRIDE)) if override else _load(COMPOSE)
    for name in MESHSERVE_SERVICES:
        command = document["services"][name]["command"]
        args = build_parser().parse_args(command[1:])
        assert args.command == f"serve-{name}" and args.host == "0.0.0.0"
        if name != "router":
            assert str(args.models_root) == "/models"  # where the image has the model


def test_gpu_override_runs_tensorrt_on_a_gpu():
    inference = _merge(_load(COMPOSE), _load(GPU_OVERRIDE))["services"]["inference"]
    assert _flag(inference["command"], "--backend") == ["tensorrt"]
    assert inference["build"]["dockerfile"] == "deploy/docker/Dockerfile.gpu"
    [device] = inference["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    # everything else as on CPU
    cpu = _load(COMPOSE)["services"]["inference"]["command"]
    assert [a for a in inference["command"] if a != "tensorrt"] == [a for a in cpu if a != "onnxruntime"]


def test_startup_order_waits_for_healthy_dependencies():
    services = _load(COMPOSE)["services"]
    assert services["envoy"]["depends_on"]["router"]["condition"] == "service_healthy"
    for dependency in ("tokenizer", "inference"):
        assert services["router"]["depends_on"][dependency]["condition"] == "service_healthy"
    for name, service in services.items():
        for dependency, spec in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck to wait for"


def test_build_context_and_mounted_files_exist():
    services = _load(COMPOSE)["services"]
    for name in ("envoy", "openai", *MESHSERVE_SERVICES, "redis", "prometheus", "alertmanager"):
        build = services[name]["build"]
        assert (COMPOSE_DIR / build["context"]).resolve() == REPO
        assert (REPO / build["dockerfile"]).is_file()
    named = set(_load(COMPOSE).get("volumes", {}))
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source in named:
                continue
            assert source.startswith("."), f"{name} mounts {source}: a relative path or a declared volume"
            assert (COMPOSE_DIR / source).exists(), f"{name} mounts missing {source}"


class _HealthServer:
    def __init__(self) -> None:
        self.servicer = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()


@pytest.mark.parametrize("name", MESHSERVE_SERVICES)
def test_grpc_healthcheck_command_follows_the_health_status(name: str):
    healthcheck = _load(COMPOSE)["services"][name]["healthcheck"]["test"]
    assert healthcheck[:3] == ["CMD", "python", "-c"]
    assert healthcheck[4] == f"localhost:{conventions_processes()[name].grpc_port}"

    def check(target: str) -> int:
        return subprocess.run(
            [sys.executable, "-c", healthcheck[3], target], capture_output=True, timeout=30
        ).returncode

    server = _HealthServer()
    try:
        target = f"127.0.0.1:{server.port}"
        server.servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert check(target) != 0  # warming up or draining
        server.servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert check(target) == 0
    finally:
        server.server.stop(None)
    assert check(f"127.0.0.1:{free_port()}") != 0  # nothing listening


def test_openai_service_sits_behind_envoy_and_routers_share_redis():
    """The OpenAI-compatible service calls the routers, is health-checked on /health, published nowhere (it
    trusts Envoy's tenant headers) and waited for by Envoy, whose config routes the OpenAI paths to it; the
    routers' result cache has its Redis tier in `redis`, which is not published and keeps nothing on disk."""
    from services.cli.main import build_parser

    services = _load(COMPOSE)["services"]
    openai = services["openai"]
    args = build_parser().parse_args(openai["command"][1:])
    assert args.command == "serve-openai" and args.host == "0.0.0.0"
    assert args.router_targets == [f"router:{conventions_processes()['router'].grpc_port}"]
    assert _seconds(openai["stop_grace_period"]) > 2 * args.shutdown_grace_s
    assert str(args.port) in openai["expose"] and "ports" not in openai
    assert f"localhost:{args.port}/health" in openai["healthcheck"]["test"][-1]
    assert services["envoy"]["depends_on"]["openai"]["condition"] == "service_healthy"
    envoy_config = yaml.safe_load((COMPOSE_DIR / "envoy.yaml").read_text())
    [cluster] = [c for c in envoy_config["static_resources"]["clusters"] if c["name"] == "openai"]
    socket = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert (socket["address"], socket["port_value"], cluster["type"]) == ("openai", args.port, "STRICT_DNS")

    router = build_parser().parse_args(services["router"]["command"][1:])
    redis = services["redis"]
    assert router.result_cache_redis == f"redis://redis:{redis['expose'][0]}/0" and router.result_cache_mb > 0
    assert services["router"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "ports" not in redis and "volumes" not in redis
    command = redis["command"]
    assert command[command.index("--save") + 1] == "" and command[command.index("--appendonly") + 1] == "no"


def test_the_router_keeps_its_disk_cache_in_a_named_volume():
    """The result cache's disk tier survives a restart or rebuild of the router's container: its file is in
    a named volume, mounted where the image makes a directory the service user owns."""
    from services.cli.main import build_parser

    document = _load(COMPOSE)
    router = document["services"]["router"]
    path = Path(build_parser().parse_args(router["command"][1:]).result_cache_disk)
    mounts = {target: source for source, _, target in (v.partition(":") for v in router["volumes"])}
    assert mounts.get(str(path.parent)) in document["volumes"], mounts
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert re.search(rf"mkdir -p [^\n]*{path.parent}[^\n]*&& chown meshserve:meshserve [^\n]*{path.parent}", dockerfile)


ROLLOUT_OVERRIDE = COMPOSE_DIR / "compose.rollout.yaml"


def test_the_rollout_override_serves_two_versions_and_publishes_no_admin_port():
    """compose.rollout.yaml: valid merged with compose.yaml, `inference` and `inference-green` serve versions
    the router names, with weights its own flags accept, and the admin port stays on the internal network."""
    from services.cli.main import build_parser
    from services.common.config_flags import config_from_args
    from services.router.config import RouterConfig

    merged = _merge(_load(COMPOSE), _load(ROLLOUT_OVERRIDE))
    assert _errors(_load(ROLLOUT_OVERRIDE)) == [] and _errors(merged) == []
    services = merged["services"]
    for name, version in (("inference", "blue"), ("inference-green", "green")):
        args = build_parser().parse_args(services[name]["command"][1:])
        assert args.model_version == version and args.precision == model_precision(DEPLOY / "docker" / "Dockerfile")
    config = config_from_args(RouterConfig, build_parser().parse_args(services["router"]["command"][1:]))
    assert config.version_targets() == {"blue": ("inference:50053",), "green": ("inference-green:50053",)}
    assert config.rollout().weights == {"blue": 95, "green": 5} and config.admin_port == 50061
    assert services["router"]["depends_on"]["inference-green"]["condition"] == "service_healthy"
    for service in services.values():
        assert not any("50061" in port for port in _published(service)), "the admin port must not be published"
