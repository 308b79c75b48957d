"""deploy/swarm/stack.yaml read statically (tests/deploy/test_swarm.py runs it on a real Swarm): valid against
the Compose Specification, and every service has what the floor asks of an operated service."""

from __future__ import annotations

import yaml

from tests.deploy.conftest import DEPLOY
from tests.deploy.test_compose import _errors

STACK = yaml.safe_load((DEPLOY / "swarm" / "stack.yaml").read_text())
SERVICES = STACK["services"]
# the processes a rolling update must never interrupt: new task first, roll back when it fails
MESHSERVE = ("openai", "router", "tokenizer", "inference")


def test_the_stack_file_is_a_valid_compose_file():
    assert _errors(STACK) == []


def test_every_service_has_limits_a_restart_policy_and_dnsrr_on_the_overlay():
    assert STACK["networks"]["mesh"]["driver"] == "overlay"
    for name, service in SERVICES.items():
        deploy = service["deploy"]
        assert deploy["endpoint_mode"] == "dnsrr", f"{name}: a VIP hides the replicas (and needs IPVS)"
        assert {"cpus", "memory"} <= set(deploy["resources"]["limits"]), name
        assert deploy["restart_policy"]["condition"] == "any", name
        assert service["networks"] == ["mesh"], name
        assert "healthcheck" in service or name == "jaeger", (
            f"{name} has no health check"
        )  # Jaeger's image has no client


def test_meshserve_services_roll_start_first_and_roll_back_on_failure():
    for name in MESHSERVE:
        update = SERVICES[name]["deploy"]["update_config"]
        assert update["order"] == "start-first" and update["failure_action"] == "rollback", name
        assert update["parallelism"] == 1, name
    # a host-mode port cannot be bound twice on one node: Envoy is replaced stop-first
    assert SERVICES["envoy"]["deploy"]["update_config"]["order"] == "stop-first"


def test_secrets_are_swarm_secrets_and_envoy_listens_with_tls_and_jwt():
    assert set(STACK["secrets"]) == {"tls_cert", "tls_key", "jwks"}
    mounted = {s["source"]: s["target"] for s in SERVICES["envoy"]["secrets"]}
    assert mounted == {"tls_cert": "server.pem", "tls_key": "server-key.pem", "jwks": "jwks.json"}
    assert STACK["configs"]["envoy"]["file"] == "./envoy.yaml"  # generated from the one Envoy template
    [port] = SERVICES["envoy"]["ports"]
    assert port["mode"] == "host" and port["target"] == 8080


def test_routers_discover_every_inference_task_through_dns():
    command = SERVICES["router"]["command"]
    assert command[command.index("--inference-discovery") + 1] == "dns"
    assert command[command.index("--inference-target") + 1] == "inference:50053"
