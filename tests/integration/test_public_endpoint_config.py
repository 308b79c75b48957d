"""The public endpoint's Envoy options: every combination renders a config `envoy --mode validate`
accepts, the defaults stay plaintext without auth, and `meshserve up`'s flags map onto the options."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

from services.gateway.config import (
    DEFAULT_MAX_REQUEST_BYTES,
    MAX_PRIORITY_HEADER,
    TENANT_HEADER,
    Endpoint,
    JwtAuth,
    TenantRateLimit,
    TlsFiles,
    build_descriptor_set,
    render_envoy_config,
    validate_envoy_config,
)
from services.gateway.credentials import ensure_dev_tls, ensure_signing_key
from services.gateway.flags import add_public_endpoint_args, public_endpoint_options

ROUTERS = [Endpoint("127.0.0.1", 50051)]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("public-endpoint")
    tls = ensure_dev_tls(directory / "tls")
    return {
        "tls": TlsFiles(tls.cert, tls.key, tls.ca),
        "jwt": JwtAuth(ensure_signing_key(directory / "credentials").jwks, "meshserve-dev", ("meshserve",)),
        "rest_descriptor": build_descriptor_set(directory / "generation_service.pb"),
    }


def render_and_validate(tmp_path: Path, **options) -> dict:
    path = tmp_path / "envoy.yaml"
    path.write_text(render_envoy_config(8080, 9901, ROUTERS, None, **options))
    result = validate_envoy_config(path)
    assert result.returncode == 0, result.stderr[-3000:]
    return yaml.safe_load(path.read_text())


def connection_manager(config: dict) -> dict:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def http_filters(config: dict) -> list[str]:
    return [f["name"].removeprefix("envoy.filters.http.") for f in connection_manager(config)["http_filters"]]


def test_defaults_are_plaintext_grpc_without_auth_or_limits(tmp_path):
    config = render_and_validate(tmp_path)
    # no auth, but client-sent tenant and priority headers are still removed (the router trusts them)
    assert http_filters(config) == ["header_mutation", "router"]
    mutation = connection_manager(config)["http_filters"][0]["typed_config"]["mutations"]["request_mutations"]
    assert mutation == [{"remove": TENANT_HEADER}, {"remove": MAX_PRIORITY_HEADER}]
    assert "transport_socket" not in config["static_resources"]["listeners"][0]["filter_chains"][0]
    assert "local_reply_config" not in connection_manager(config)
    routes = connection_manager(config)["route_config"]["virtual_hosts"][0]["routes"]
    assert [r["match"] for r in routes] == [{"prefix": "/", "grpc": {}}]
    assert routes[0]["route"]["cluster"] == "router" and routes[0]["route"]["timeout"] == "0s"


def test_everything_on_validates_in_the_right_filter_order(tmp_path, files):
    config = render_and_validate(
        tmp_path, **files, rate_limit=TenantRateLimit(5, 60), grpc_web=True, max_request_bytes=4096
    )
    # gRPC-Web is turned into gRPC first; auth before anything else looks at the request; the tenant header
    # exists for the rate limiter; the size checks see the gRPC frames whatever the client spoke
    assert http_filters(config) == [
        "grpc_web",
        "header_mutation",
        "jwt_authn",
        "grpc_json_transcoder",
        "local_ratelimit",
        "body_size_limit",
        "buffer",
        "router",
    ]
    chain = config["static_resources"]["listeners"][0]["filter_chains"][0]
    tls = chain["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["alpn_protocols"] == ["h2", "http/1.1"]
    assert tls["tls_certificates"][0]["certificate_chain"]["filename"] == str(files["tls"].cert)
    filters = {f["name"]: f["typed_config"] for f in connection_manager(config)["http_filters"]}
    jwt = filters["envoy.filters.http.jwt_authn"]
    assert jwt["providers"]["meshserve"]["claim_to_headers"] == [
        {"header_name": TENANT_HEADER, "claim_name": "tenant"},
        {"header_name": MAX_PRIORITY_HEADER, "claim_name": "max_priority"},
    ]
    assert jwt["rules"][0] == {"match": {"prefix": "/grpc.health.v1.Health/"}}  # health checks need no token
    assert filters["envoy.filters.http.header_mutation"]["mutations"]["request_mutations"] == [
        {"remove": TENANT_HEADER},
        {"remove": MAX_PRIORITY_HEADER},
    ]
    limiter = filters["envoy.filters.http.local_ratelimit"]
    assert limiter["descriptors"][0]["entries"] == [{"key": "tenant", "value": ""}]
    assert limiter["descriptors"][0]["token_bucket"] == {"max_tokens": 5, "tokens_per_fill": 5, "fill_interval": "60s"}
    transcoder = filters["envoy.filters.http.grpc_json_transcoder"]
    assert transcoder["print_options"]["stream_newline_delimited"] is True
    assert filters["envoy.filters.http.body_size_limit"]["max_request_bytes"] == 4096
    bodies = [
        m["body"]["inline_string"] for m in connection_manager(config)["local_reply_config"]["mappers"] if "body" in m
    ]
    assert any("max_request_bytes (4096 bytes)" in b for b in bodies)
    assert any("rate_limit_per_tenant is 5 requests per 60 s" in b for b in bodies)


@pytest.mark.parametrize("option", ["tls", "jwt", "rest_descriptor", "grpc_web", "max_request_bytes"])
def test_each_option_alone_validates(tmp_path, files, option):
    value = {"grpc_web": True, "max_request_bytes": 1 << 20}.get(option) or files[option]
    config = render_and_validate(tmp_path, **{option: value})
    assert len(http_filters(config)) > 1 or option == "tls"


def test_a_rate_limit_needs_verified_tenants():
    with pytest.raises(ValueError, match="needs JWT auth"):
        render_envoy_config(8080, 9901, ROUTERS, None, rate_limit=TenantRateLimit(5))
    with pytest.raises(ValueError, match=">= 1 request"):
        TenantRateLimit(0)


def test_the_descriptor_set_carries_the_rest_rule(files):
    descriptors = descriptor_pb2.FileDescriptorSet.FromString(files["rest_descriptor"].read_bytes())
    names = {f.name for f in descriptors.file}
    assert {
        "meshserve/v1/generation_service.proto",
        "google/api/annotations.proto",
        "google/rpc/error_details.proto",
    } <= names
    service = next(f for f in descriptors.file if f.name == "meshserve/v1/generation_service.proto").service[0]
    rule = service.method[0].options.Extensions[annotations_pb2.http]
    assert (rule.post, rule.body) == ("/v1/generate", "*")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_public_endpoint_args(parser)
    return parser.parse_args(argv)


def test_up_flags_default_to_plaintext_with_rest_grpc_web_and_a_size_limit(tmp_path):
    options = public_endpoint_options(parse(), tmp_path)
    assert options.keys() == {"grpc_web", "max_request_bytes", "rest_descriptor"}
    assert options["grpc_web"] is True and options["max_request_bytes"] == DEFAULT_MAX_REQUEST_BYTES
    assert options["rest_descriptor"].is_file()
    assert http_filters(render_and_validate(tmp_path, **options)) == [
        "grpc_web",
        "header_mutation",
        "grpc_json_transcoder",
        "body_size_limit",
        "buffer",
        "router",
    ]
    assert public_endpoint_options(parse("--no-rest", "--no-grpc-web", "--max-request-bytes", "0"), tmp_path) == {
        "grpc_web": False
    }


def test_up_flags_for_a_secured_endpoint(tmp_path):
    credentials = tmp_path / "credentials"
    options = public_endpoint_options(
        parse("--dev-tls", "--auth", "jwt", "--credentials-dir", str(credentials), "--rate-limit-per-tenant", "30"),
        tmp_path / "run",
    )
    assert options["tls"].ca == (tmp_path / "run" / "tls" / "ca.pem").resolve() and options["tls"].key.is_file()
    assert options["jwt"].jwks == (credentials / "jwks.json").resolve()  # what `meshserve mint-token` signs for
    assert options["jwt"].audiences == ("meshserve",)
    assert options["rate_limit"] == TenantRateLimit(30, 60)
    render_and_validate(tmp_path, **options)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rate-limit-per-tenant", "5"], "needs --auth jwt"),
        (["--tls-cert", "cert.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-cert", "missing.pem", "--tls-key", "missing-key.pem"], "TLS file not found"),
        (["--auth", "jwt", "--jwks", "missing.json"], "JWKS file not found"),
        (["--jwks", "jwks.json"], "--jwks needs --auth jwt"),
    ],
)
def test_inconsistent_up_flags_are_refused(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        public_endpoint_options(parse(*argv), tmp_path)
