"""Envoy's config for containers (compose, Kubernetes): the flags of `meshserve render-envoy`, and the
configs committed under deploy/ with the flags each is rendered with (DEPLOY_CONFIGS)."""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.gateway.config import (
    Endpoint,
    JwtAuth,
    TlsFiles,
    parse_otlp_endpoint,
    render_envoy_config,
)
from services.gateway.flags import add_endpoint_args, limit_options

# Where deploy/docker/Dockerfile puts the descriptor set of the public API (built by build_descriptor_set).
IMAGE_REST_DESCRIPTOR = "/opt/meshserve/envoy/generation_service.pb"
DEFAULT_ROUTER = "router:50051"
DEFAULT_OPENAI = "openai:50054"
DEFAULT_OTLP = "http://jaeger:4317"
DEFAULT_MAX_DOWNSTREAM_CONNECTIONS = 10000
# Where deploy/swarm/stack.yaml mounts the Swarm secrets of the public endpoint (TLS material and the JWKS).
SWARM_SECRETS = "/run/secrets"


@dataclass(frozen=True)
class DeployConfig:
    """A config committed under deploy/: where it goes, the flags it is rendered with, and what it is for."""

    path: str
    args: tuple[str, ...]
    purpose: str


# Compose, Kubernetes and Swarm all name the routers `router` and the trace collector `jaeger` (short names resolve
# through the pod's DNS search path in whatever namespace the overlay deploys to), so their flags are alike.
DEPLOY_CONFIGS = (
    DeployConfig(
        "deploy/compose/envoy.yaml",
        ("--openai", DEFAULT_OPENAI),
        "deploy/compose/compose.yaml mounts it at /etc/envoy/envoy.yaml",
    ),
    DeployConfig(
        "deploy/k8s/base/envoy.yaml",
        ("--openai", DEFAULT_OPENAI),
        "deploy/k8s/base/kustomization.yaml turns it into the envoy-config ConfigMap",
    ),
    # Swarm publishes Envoy's port on every node's own address, so this one listens with TLS and JWT from the
    # start: the certificate, its key and the JWKS are Swarm secrets, never files in the image.
    DeployConfig(
        "deploy/swarm/envoy.yaml",
        (
            "--openai",
            DEFAULT_OPENAI,
            "--tls-cert",
            f"{SWARM_SECRETS}/server.pem",
            "--tls-key",
            f"{SWARM_SECRETS}/server-key.pem",
            "--auth",
            "jwt",
            "--jwks",
            f"{SWARM_SECRETS}/jwks.json",
            "--jwt-issuer",
            "meshserve-dev",
            "--jwt-audience",
            "meshserve",
        ),
        "deploy/swarm/stack.yaml hands it to Envoy as a Swarm config",
    ),
)


def _endpoint(value: str) -> Endpoint:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return Endpoint(host, int(port))


def add_render_args(parser: argparse.ArgumentParser) -> None:
    where = parser.add_argument_group("addresses (the defaults suit deploy/compose and deploy/k8s)")
    where.add_argument("--port", type=int, default=8080, help="public listener port")
    where.add_argument(
        "--listen-address",
        default="0.0.0.0",
        help="public listener address (0.0.0.0 in a container: its port mapping decides who reaches it)",
    )
    where.add_argument("--admin-port", type=int, default=9901)
    where.add_argument(
        "--admin-address",
        default="0.0.0.0",
        help="admin listener address: Prometheus scrapes /stats/prometheus from another container; "
        "never publish this port (it has /quitquitquit)",
    )
    where.add_argument(
        "--router",
        type=_endpoint,
        action="append",
        metavar="HOST:PORT",
        help=f"router endpoint (repeatable; default {DEFAULT_ROUTER})",
    )
    where.add_argument(
        "--openai",
        type=_endpoint,
        action="append",
        metavar="HOST:PORT",
        help="OpenAI-compatible service (`meshserve serve-openai`; repeatable): route /v1/chat/completions, "
        f"/v1/completions and /v1/models to it (the deploy configs: {DEFAULT_OPENAI}); "
        "resolved like --router",
    )
    where.add_argument(
        "--router-discovery",
        choices=["dns", "static"],
        default="dns",
        help="dns: each --router is a name resolving to any number of routers (STRICT_DNS); "
        "static: each is one IP address",
    )
    where.add_argument(
        "--otlp-endpoint", default=DEFAULT_OTLP, help="OTLP/gRPC collector for Envoy's spans ('none': no tracing)"
    )
    where.add_argument(
        "--max-downstream-connections",
        type=int,
        default=DEFAULT_MAX_DOWNSTREAM_CONNECTIONS,
        help="open client connections Envoy accepts at most (0: no cap)",
    )

    public = parser.add_argument_group("public endpoint (docs/public-endpoint.md); paths are as Envoy sees them")
    add_endpoint_args(public, local=False)
    public.add_argument(
        "--rest-descriptor",
        default=IMAGE_REST_DESCRIPTOR,
        help="descriptor set of the public API for REST/JSON (POST /v1/generate); "
        "the default is where the meshserve image has it",
    )


def render(args: argparse.Namespace) -> str:
    """The config for parsed `add_render_args` flags; SystemExit with a message on inconsistent ones."""
    routers = args.router or [_endpoint(DEFAULT_ROUTER)]
    if args.router_discovery == "static":
        for router in [*routers, *(args.openai or [])]:
            try:
                ipaddress.ip_address(router.host)
            except ValueError:
                raise SystemExit(f"--router-discovery static needs IP addresses, got {router.host!r}") from None
    options: dict[str, Any] = {"grpc_web": args.grpc_web}
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("--tls-cert and --tls-key go together")
    if args.tls_cert:
        options["tls"] = TlsFiles(args.tls_cert, args.tls_key)
    if args.auth == "jwt":
        if not (args.jwks and args.jwt_issuer and args.jwt_audience):
            raise SystemExit("--auth jwt needs --jwks, --jwt-issuer and at least one --jwt-audience")
        options["jwt"] = JwtAuth(
            jwks=args.jwks,
            issuer=args.jwt_issuer,
            audiences=tuple(args.jwt_audience),
            tenant_claim=args.jwt_tenant_claim,
        )
    elif args.jwks or args.jwt_issuer or args.jwt_audience:
        raise SystemExit("--jwks, --jwt-issuer and --jwt-audience need --auth jwt")
    options.update(limit_options(args))
    if args.max_downstream_connections < 0:
        raise SystemExit("--max-downstream-connections must be >= 0")
    if args.rest:
        options["rest_descriptor"] = Path(args.rest_descriptor)
    otlp = None if args.otlp_endpoint.lower() == "none" else parse_otlp_endpoint(args.otlp_endpoint)
    return render_envoy_config(
        port=args.port,
        admin_port=args.admin_port,
        router_endpoints=list(routers),
        otlp=otlp,
        listen_address=args.listen_address,
        admin_address=args.admin_address,
        router_dns=args.router_discovery == "dns",
        openai_endpoints=args.openai,
        max_downstream_connections=args.max_downstream_connections or None,
        **options,
    )


def render_args(argv: list[str] | tuple[str, ...]) -> argparse.Namespace:
    """`add_render_args` flags parsed on their own (the flags of a DeployConfig)."""
    parser = argparse.ArgumentParser(prog="meshserve render-envoy")
    add_render_args(parser)
    return parser.parse_args(list(argv))


def header(command: str, purpose: str) -> str:
    return (
        f"# GENERATED by `{command}`\n"
        f"# from services/gateway/envoy.yaml.j2, the template `meshserve up` renders too; {purpose}.\n"
        f"# Do not edit: change the template or the flags in services/gateway/deploy.py and run `make envoy-configs`;\n"
        f"# tests/deploy/test_envoy_configs.py fails while this file and its rendering differ.\n"
    )


def render_deploy_config(config: DeployConfig) -> str:
    """The exact text committed at `config.path`: the header, then the rendering."""
    command = " ".join(["meshserve render-envoy", *config.args, "--out", config.path])
    return header(command, config.purpose) + render(render_args(config.args))
