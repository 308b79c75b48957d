"""Prometheus config and alert rules: promtool checks and unit tests, and the rules' and scrape jobs'
agreement with docs/conventions.md and the compose file."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from tests.deploy.conftest import DEPLOY, allowed_series_names, conventions_processes, promql_metric_names, run, tool

PROMETHEUS = DEPLOY / "prometheus"
ALERTS = PROMETHEUS / "alerts.yaml"
RULES_TEST = PROMETHEUS / "alerts_test.yaml"
CONFIG = PROMETHEUS / "prometheus.yml"
COMPOSE = DEPLOY / "compose" / "compose.yaml"


def _alert_rules() -> dict[tuple[str, str], dict]:
    """{(alertname, severity): rule}: graded alerts have one name at two severities."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    rules = {(rule["alert"], rule["labels"]["severity"]): rule for group in groups for rule in group["rules"]}
    assert len(rules) == sum(len(group["rules"]) for group in groups), "two rules share a name and a severity"
    return rules


def test_promtool_check_config_and_rules():
    result = run([tool("promtool"), "check", "config", str(CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout  # alerts.yaml is loaded from the config
    result = run([tool("promtool"), "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(_alert_rules())} rules found" in result.stdout


def test_promtool_rule_unit_tests_pass():
    result = run([tool("promtool"), "test", "rules", str(RULES_TEST)], cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_catch_a_wrong_threshold(tmp_path: Path):
    """The unit tests pin the rules' behaviour: the TTFT alert at 2 s instead of 500 ms must fail them."""
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    text = ALERTS.read_text()
    assert ") > 0.5" in text
    (tmp_path / ALERTS.name).write_text(text.replace(") > 0.5", ") > 2", 1))
    result = run([tool("promtool"), "test", "rules", RULES_TEST.name], cwd=tmp_path)
    assert result.returncode != 0
    assert "MeshserveTimeToFirstTokenHigh" in result.stdout + result.stderr


def test_every_alert_has_a_unit_test():
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    tested = {
        (case["alertname"], alert["exp_labels"]["severity"])
        for test in tests
        for case in test.get("alert_rule_test", [])
        for alert in case["exp_alerts"]
    }
    assert tested == set(_alert_rules())


def test_required_alerts_use_the_conventions_metrics():
    rules = _alert_rules()
    ttft = rules["MeshserveTimeToFirstTokenHigh", "warning"]
    assert "histogram_quantile(0.99" in ttft["expr"] and "meshserve_time_to_first_token_seconds_bucket" in ttft["expr"]
    assert ttft["for"] == "5m" and "> 0.5" in ttft["expr"]
    assert "> 2" in rules["MeshserveTimeToFirstTokenHigh", "critical"]["expr"]
    assert 'meshserve_requests_total{code!="OK"}' in rules["MeshserveErrorRatioHigh", "critical"]["expr"]
    assert "> 0.01" in rules["MeshserveErrorRatioHigh", "warning"]["expr"]
    assert "meshserve_num_requests_waiting" in rules["MeshserveQueueSaturated", "warning"]["expr"]
    assert "meshserve_kv_cache_usage_perc" in rules["MeshserveKVCacheNearlyFull", "warning"]["expr"]
    down = rules["MeshserveInferenceDown", "critical"]
    assert down["labels"]["job"] == "meshserve-inference"  # what Alertmanager's inhibition matches on
    for (name, _), rule in rules.items():
        used = promql_metric_names(rule["expr"]) - {"up"}
        assert used <= allowed_series_names(), f"{name} uses {used - allowed_series_names()}"
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]


def test_scrape_jobs_cover_every_service_and_envoy_admin():
    config = yaml.safe_load(CONFIG.read_text())
    compose_services = set(yaml.safe_load(COMPOSE.read_text())["services"])
    # and the second model version's replicas of the rollout override
    compose_services |= set(yaml.safe_load((COMPOSE.parent / "compose.rollout.yaml").read_text())["services"])
    targets: dict[str, tuple[str, int, str]] = {}
    for job in config["scrape_configs"]:
        path = job.get("metrics_path", "/metrics")
        for sd in job.get("dns_sd_configs", []):
            for name in sd["names"]:
                targets[job["job_name"]] = (name, sd["port"], path)
                assert name in compose_services, f"{job['job_name']} scrapes {name}, which no compose file runs"
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                targets[job["job_name"]] = (host, int(port), path)
    for process in conventions_processes().values():
        job = f"meshserve-{process.name}"  # the telemetry service names of the conventions
        assert job in targets, f"no scrape job {job}"
        host, port, path = targets[job]
        assert host in compose_services
        assert port == process.metrics_port
        assert path == ("/stats/prometheus" if process.name == "envoy" else "/metrics")


def test_prometheus_sends_alerts_to_the_alertmanager_service():
    """prometheus.yml (compose and Swarm) delivers to the `alertmanager` service both of them run."""
    config = yaml.safe_load(CONFIG.read_text())
    [manager] = config["alerting"]["alertmanagers"]
    [sd] = manager["dns_sd_configs"]
    assert sd["names"] == ["alertmanager"] and sd["port"] == 9093
    assert "alertmanager" in yaml.safe_load(COMPOSE.read_text())["services"]
