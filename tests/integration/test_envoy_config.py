import pytest
import yaml

from services.gateway.config import Endpoint, parse_otlp_endpoint, render_envoy_config, validate_envoy_config


@pytest.mark.parametrize("otlp", [None, Endpoint("127.0.0.1", 4317), Endpoint("jaeger", 4317)])
def test_every_rendered_config_passes_envoy_validate(tmp_path, otlp):
    path = tmp_path / "envoy.yaml"
    path.write_text(render_envoy_config(8080, 9901, [Endpoint("127.0.0.1", 50051), Endpoint("127.0.0.1", 50061)], otlp))
    result = validate_envoy_config(path)
    assert result.returncode == 0, result.stderr[-2000:]
    config = yaml.safe_load(path.read_text())
    router = next(c for c in config["static_resources"]["clusters"] if c["name"] == "router")
    assert len(router["load_assignment"]["endpoints"][0]["lb_endpoints"]) == 2
    assert router["health_checks"][0]["grpc_health_check"]["service_name"] == "meshserve.v1.GenerationService"
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert ("tracing" in hcm) == (otlp is not None)


def test_a_broken_config_fails_validation(tmp_path):
    path = tmp_path / "envoy.yaml"
    path.write_text(
        render_envoy_config(8080, 9901, [Endpoint("127.0.0.1", 50051)], None).replace("LEAST_REQUEST", "FASTEST")
    )
    assert validate_envoy_config(path).returncode != 0


def test_otlp_endpoint_parsing():
    assert parse_otlp_endpoint(None) is None
    assert parse_otlp_endpoint("http://collector:4317") == Endpoint("collector", 4317)
    assert parse_otlp_endpoint("127.0.0.1:5555") == Endpoint("127.0.0.1", 5555)


def test_routes_retry_only_before_headers_on_another_router_and_the_cluster_is_guarded():
    from services.gateway.config import Endpoint as E

    config = yaml.safe_load(
        render_envoy_config(8080, 9901, [E("127.0.0.1", 1), E("127.0.0.1", 2)], None, grpc_web=True)
    )
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert len(routes) >= 2
    for route in routes:
        policy = route["route"]["retry_policy"]
        assert set(policy["retry_on"].split(",")) >= {"connect-failure", "reset", "unavailable"}
        assert policy["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"
    router = next(c for c in config["static_resources"]["clusters"] if c["name"] == "router")
    assert router["outlier_detection"]["consecutive_5xx"] > 0
    assert router["circuit_breakers"]["thresholds"][0]["max_requests"] > 0
