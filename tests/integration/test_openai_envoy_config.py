"""Envoy's routes to the OpenAI-compatible service: valid with every public endpoint option, ahead of the
gRPC routes, over HTTP/1.1, WebSocket upgrades on the WebSocket routes alone, and Envoy's own refusals on
those paths in OpenAI's error shape."""

from __future__ import annotations

import re

import pytest
import yaml

from services.gateway.config import (
    Endpoint,
    JwtAuth,
    TenantRateLimit,
    build_descriptor_set,
    render_envoy_config,
    validate_envoy_config,
)
from services.gateway.credentials import ensure_signing_key

ROUTERS = [Endpoint("127.0.0.1", 50051)]
OPENAI = [Endpoint("127.0.0.1", 50054)]


@pytest.fixture(scope="module")
def secured(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("openai-envoy")
    return {
        "jwt": JwtAuth(ensure_signing_key(directory / "credentials").jwks, "meshserve-dev", ("meshserve",)),
        "rate_limit": TenantRateLimit(5, 30),
        "max_request_bytes": 4096,
        "grpc_web": True,
        "rest_descriptor": build_descriptor_set(directory / "generation_service.pb"),
    }


def render(tmp_path, **options) -> dict:
    path = tmp_path / "envoy.yaml"
    path.write_text(render_envoy_config(8080, 9901, ROUTERS, None, openai_endpoints=OPENAI, **options))
    result = validate_envoy_config(path)
    assert result.returncode == 0, result.stderr[-3000:]
    return yaml.safe_load(path.read_text())


def manager(config: dict) -> dict:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def test_openai_paths_route_to_the_openai_cluster_over_http1_before_grpc(tmp_path):
    config = render(tmp_path)
    routes = manager(config)["route_config"]["virtual_hosts"][0]["routes"]
    openai = [r for r in routes if r["route"]["cluster"] == "openai"]
    assert [r["match"] for r in openai] == [
        {"path": "/v1/ws/chat/completions"},
        {"path": "/v1/ws/completions"},
        {"path": "/v1/chat/completions"},
        {"path": "/v1/completions"},
        {"path": "/v1/responses"},
        {"path_separated_prefix": "/v1/models"},
    ]
    assert routes[:6] == openai  # before the catch-all gRPC routes
    assert all(r["route"]["timeout"] == "0s" for r in openai)  # streams last as long as the generation
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert "typed_extension_protocol_options" not in clusters["openai"]  # Envoy's default upstream: HTTP/1.1
    assert clusters["openai"]["health_checks"][0]["http_health_check"] == {"path": "/health"}
    for protection in ("circuit_breakers", "outlier_detection"):  # as the routers'
        assert clusters["openai"][protection] == clusters["router"][protection]
    assert clusters["openai"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "socket_address": {"address": "127.0.0.1", "port_value": 50054}
    }
    # without the option, nothing of it
    path = tmp_path / "plain.yaml"
    path.write_text(render_envoy_config(8080, 9901, ROUTERS, None))
    plain = yaml.safe_load(path.read_text())
    assert [c["name"] for c in plain["static_resources"]["clusters"]] == ["router"]
    assert "/v1/" not in str(manager(plain)["route_config"])


def test_envoy_refusals_on_openai_paths_are_openai_errors(tmp_path, secured):
    config = render(tmp_path, **secured)
    mappers = manager(config)["local_reply_config"]["mappers"]
    openai = [m for m in mappers if "header_filter" in str(m["filter"])]
    upgrade, *openai = openai  # the refusal of a WebSocket handshake on an HTTP route, below
    regex = openai[0]["filter"]["and_filter"]["filters"][0]["header_filter"]["header"]["string_match"]["safe_regex"][
        "regex"
    ]
    for path in (
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/models",
        "/v1/models/x",
        "/v1/completions?x=1",
        "/v1/ws/chat/completions",
        "/v1/ws/completions",
    ):
        assert re.match(regex, path), path
    for path in ("/v1/generate", "/meshserve.v1.GenerationService/Generate", "/v1/completionsX"):
        assert not re.match(regex, path), path
    assert mappers[: len(openai) + 1] == [upgrade, *openai]  # ahead of the gRPC mappers: the first match applies
    errors = [m["body_format_override"]["json_format"]["error"] for m in openai]
    assert all(set(e) == {"message", "type", "param", "code"} for e in errors)
    assert [e["code"] for e in errors] == ["invalid_api_key", "request_too_large", "rate_limit_exceeded", None, None]
    unauthenticated, _, limited, *_ = openai
    assert unauthenticated["status_code"] == 401  # jwt_authn's 403 for a foreign audience too
    assert limited["headers_to_add"][0]["header"] == {"key": "retry-after", "value": "30"}
    assert "rate_limit_per_tenant is 5 requests per 30 s" in errors[2]["message"]
    # the auth, rate limit and size filters are the listener's, so they apply to these routes as to gRPC
    names = [f["name"].removeprefix("envoy.filters.http.") for f in manager(config)["http_filters"]]
    assert {"jwt_authn", "local_ratelimit", "body_size_limit", "buffer"} <= set(names)


def test_websocket_upgrades_are_enabled_on_the_websocket_routes_alone(tmp_path, secured):
    config = render(tmp_path, **secured)
    hcm = manager(config)
    assert "upgrade_configs" not in hcm  # not for the whole listener: gRPC and REST routes refuse upgrades
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    upgrading = [r for r in routes if "upgrade_configs" in r["route"]]
    assert [r["match"] for r in upgrading] == [{"path": "/v1/ws/chat/completions"}, {"path": "/v1/ws/completions"}]
    for route in upgrading:
        assert route["route"]["upgrade_configs"] == [{"upgrade_type": "websocket"}]
        assert route["route"]["cluster"] == "openai" and route["route"]["timeout"] == "0s"
        # the buffer would hold the upgrade until the socket closed, the size limit would count the whole
        # socket as one body: both are off there (the service limits each message)
        disabled = route["typed_per_filter_config"]
        assert disabled["envoy.filters.http.buffer"]["disabled"] is True
        assert disabled["envoy.filters.http.body_size_limit"]["disabled"] is True
    # auth and the rate limit stay on: they are listener filters with no per-route exception
    names = [f["name"].removeprefix("envoy.filters.http.") for f in hcm["http_filters"]]
    assert {"jwt_authn", "local_ratelimit"} <= set(names)
    assert all(
        "typed_per_filter_config" not in r or "jwt_authn" not in str(r["typed_per_filter_config"]) for r in routes
    )
    # without a size limit there is no buffer to turn off
    plain = manager(render(tmp_path))["route_config"]["virtual_hosts"][0]["routes"]
    assert [r.get("typed_per_filter_config") for r in plain if "upgrade_configs" in r["route"]] == [None, None]


def test_a_websocket_handshake_on_an_http_route_is_a_400_naming_the_websocket_routes(tmp_path, secured):
    """Envoy refuses an upgrade no route enables with a bare 403 before any filter (auth included) runs; on
    the OpenAI paths that would read as a bad API key, so it is a 400 saying where the WebSocket routes are."""
    for options in ({}, secured):
        [upgrade, *_] = manager(render(tmp_path, **options))["local_reply_config"]["mappers"]
        path, header, status = upgrade["filter"]["and_filter"]["filters"]
        assert header["header_filter"]["header"] == {"name": "upgrade", "present_match": True}
        assert status["status_code_filter"]["comparison"]["value"]["default_value"] == 403
        regex = path["header_filter"]["header"]["string_match"]["safe_regex"]["regex"]
        for http_path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models", "/v1/models/x"):
            assert re.match(regex, http_path), http_path
        # a 403 on the WebSocket routes is jwt_authn's (a foreign audience): still the 401 mapper's
        for other in ("/v1/ws/chat/completions", "/v1/ws/completions", "/v1/generate", "/v1/completionsX"):
            assert not re.match(regex, other), other
        assert upgrade["status_code"] == 400
        error = upgrade["body_format_override"]["json_format"]["error"]
        assert error["type"] == "invalid_request_error" and "/v1/ws/chat/completions" in error["message"]
