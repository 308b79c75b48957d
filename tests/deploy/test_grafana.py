"""The Grafana dashboard and its provisioning: the JSON loads, every panel queries the provisioned
Prometheus with valid PromQL over metric names from docs/conventions.md, and the required views exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import DEPLOY, allowed_series_names, promql_metric_names, run, tool

GRAFANA = DEPLOY / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))


def _datasources() -> list[dict]:
    return yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())["datasources"]


def _exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expression) of every panel target, and the template variables' queries."""
    found = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") == "query" and query:
            inner = query.removeprefix("label_values(").removesuffix(")")
            found.append((f"variable {variable['name']}", inner.rsplit(",", 1)[0]))
    return found


def test_there_is_a_dashboard():
    assert [d.name for d in DASHBOARDS] == ["meshserve.json"]


def test_the_extractor_sees_foreign_metric_names():
    assert promql_metric_names('sum by (code) (rate(vllm:num_requests_waiting{a="b"}[5m]))') == {
        "vllm:num_requests_waiting"
    }
    assert promql_metric_names("histogram_quantile(0.9, sum by (le) (rate(x_bucket[$__rate_interval])))") == {
        "x_bucket"
    }


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure(path: Path):
    dashboard = json.loads(path.read_text())
    uids = {d["uid"] for d in _datasources() if d["type"] == "prometheus"}
    assert dashboard["uid"] and dashboard["title"] and dashboard["panels"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        assert panel["type"] in {"timeseries", "stat", "gauge", "bargauge", "table", "row"}
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids))
        for target in [panel, *panel["targets"]]:
            assert target["datasource"]["uid"] in uids, f"{panel['title']} does not use the provisioned Prometheus"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_queries_use_only_conventions_metrics(path: Path):
    dashboard = json.loads(path.read_text())
    allowed = allowed_series_names()
    for title, expr in _exprs(dashboard):
        used = promql_metric_names(expr)
        assert used, f"{title}: no metric in {expr!r}"
        assert used <= allowed, f"{title}: {sorted(used - allowed)} are not in docs/conventions.md"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_queries_are_valid_promql(path: Path, tmp_path: Path):
    """Every expression, with Grafana's variables filled in, as a recording rule for `promtool check rules`."""
    dashboard = json.loads(path.read_text())
    rules = []
    for i, (_, expr) in enumerate(_exprs(dashboard)):
        concrete = expr.replace("$__rate_interval", "1m").replace("$model_name", ".*")
        assert "$" not in concrete, f"unknown variable in {expr!r}"
        rules.append({"record": f"dashboard:query_{i}:check", "expr": concrete})
    rule_file = tmp_path / "dashboard_rules.yaml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run([tool("promtool"), "check", "rules", str(rule_file)])
    assert result.returncode == 0, result.stdout + result.stderr
    # and the check is not vacuous: a broken expression fails it
    rule_file.write_text(
        yaml.safe_dump({"groups": [{"name": "d", "rules": [{"record": "a:b", "expr": "sum by (job ("}]}]})
    )
    assert run([tool("promtool"), "check", "rules", str(rule_file)]).returncode != 0


def test_dashboard_shows_the_required_views():
    exprs = [expr for _, expr in _exprs(json.loads(DASHBOARDS[0].read_text()))]
    everything = " ".join(exprs)
    for needle in (
        "meshserve_time_to_first_token_seconds_bucket",  # TTFT
        "meshserve_inter_token_latency_seconds_bucket",  # inter-token latency
        "rate(meshserve_generation_tokens_total",  # throughput
        "meshserve_num_requests_waiting",  # queue
        "meshserve_kv_cache_usage_perc",  # KV usage
    ):
        assert needle in everything, needle
    errors = [e for e in exprs if "meshserve_requests_total" in e and 'code!="OK"' in e]
    assert errors and all(re.search(r"by \((\w+, )*code\)", e) for e in errors), "errors must be split by status code"
    # a rollout's versions side by side (issue 24): rate, errors, TTFT and ITL p95 by model_version
    for needle in (
        "sum by (model_version) (rate(meshserve_requests_total",
        "sum by (model_version, code) (rate(meshserve_requests_total",
        "histogram_quantile(0.95, sum by (model_version, le) (rate(meshserve_time_to_first_token_seconds_bucket",
        "histogram_quantile(0.95, sum by (model_version, le) (rate(meshserve_inter_token_latency_seconds_bucket",
    ):
        assert needle in everything, needle


def test_provisioning_points_at_the_dashboards_and_prometheus():
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in compose["services"]["grafana"]["volumes"])
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "meshserve.yaml").read_text())["providers"][0]
    dashboards_mount = provider["options"]["path"]
    assert (DEPLOY / "compose" / mounts_inverse(mounts, dashboards_mount)).resolve() == (GRAFANA / "dashboards")
    assert (
        DEPLOY / "compose" / mounts_inverse(mounts, "/etc/grafana/provisioning")
    ).resolve() == GRAFANA / "provisioning"
    [prometheus] = _datasources()
    assert prometheus["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]


def mounts_inverse(mounts: dict[str, str], container_path: str) -> str:
    """The host path mounted at `container_path`."""
    matches = [host for host, target in mounts.items() if target == container_path]
    assert len(matches) == 1, (mounts, container_path)
    return matches[0]
