"""Alerting run for real: a mesh (`meshserve up`), Debian's Prometheus scraping it with the rules of
deploy/prometheus/alerts.yaml, and Debian's Alertmanager with deploy/alertmanager/alertmanager.yml, whose
receivers are pointed at a webhook server of this test's own. Stopping the inference replica (SIGSTOP: it
stops answering, and the launcher, which restarts processes that exit, leaves it be) fires the critical
alerts, which reach the critical receiver with their labels, and resolve once it runs again (SIGCONT).

What is changed from the committed files, and only that: Prometheus scrapes and evaluates every second and
every rule's `for` is 2 s (the committed minutes would make this test last minutes); Alertmanager's group
waits and intervals are 1 s and its webhook URLs are the test's. Routing, grouping, inhibition, the
expressions and the labels are the committed ones. The warning path and the inhibition are exercised with
alerts posted to Alertmanager's own API (a real time-to-first-token warning needs minutes of overload).

`bash deploy/tools/install-alerting.sh` installs both daemons (Debian's prometheus and
prometheus-alertmanager); the fixture runs it, so a fresh machine gets them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
import yaml

from tests.conftest import free_port, stop_process, wait_until
from tests.deploy.conftest import DEPLOY, run, tool

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ALERTMANAGER_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
RULE_FOR = "2s"


class Webhook:
    """Alertmanager's webhook receiver: every notification POSTed, by path (/critical, /warning)."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with hook.lock:
                    hook.received.append((self.path, body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def notifications(self, path: str) -> list[dict]:
        with self.lock:
            return [body for p, body in self.received if p == path]

    def alerts(self, path: str, status: str) -> list[dict]:
        """Alerts of every notification to `path` whose alert status is `status` (firing, resolved)."""
        return [a for n in self.notifications(path) for a in n["alerts"] if a["status"] == status]


def alertmanager_config(webhook_port: int) -> dict:
    """The committed config with the test's webhook URLs and 1 s group timings."""
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    for receiver in config["receivers"]:
        for hook in receiver["webhook_configs"]:
            hook["url"] = f"http://127.0.0.1:{webhook_port}/{receiver['name']}"
    for route in [config["route"], *config["route"]["routes"]]:
        for key in ("group_wait", "group_interval"):
            route[key] = "1s"
    return config


def fast_rules() -> dict:
    """alerts.yaml with every `for` at RULE_FOR; expressions and labels untouched."""
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = RULE_FOR
    return rules


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class Alerting:
    def __init__(self, mesh, webhook: Webhook, prometheus_port: int, alertmanager_port: int) -> None:
        self.mesh, self.webhook = mesh, webhook
        self.prometheus = f"http://127.0.0.1:{prometheus_port}"
        self.alertmanager = f"http://127.0.0.1:{alertmanager_port}"

    def up(self) -> dict[str, str]:
        query = urllib.parse.urlencode({"query": 'up{job=~"meshserve-.*"}'})
        reply = get_json(f"{self.prometheus}/api/v1/query?{query}")
        return {r["metric"]["job"]: r["value"][1] for r in reply["data"]["result"]}

    def manager_alerts(self) -> list[dict]:
        return get_json(f"{self.alertmanager}/api/v2/alerts")

    def post(self, *alerts: dict) -> None:
        request = urllib.request.Request(
            f"{self.alertmanager}/api/v2/alerts",
            data=json.dumps(list(alerts)).encode(),
            method="POST",
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200


def posted_alert(name: str, **labels: str) -> dict:
    """An alert as Prometheus posts it, active for 10 minutes."""
    return {
        "labels": {"alertname": name, **labels},
        "annotations": {"summary": f"{name} posted by {Path(__file__).name}"},
        "endsAt": (datetime.now(UTC) + timedelta(minutes=10)).isoformat(),
    }


@pytest.fixture(scope="module")
def alerting(tmp_path_factory) -> Iterator[Alerting]:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    from tests.e2e.conftest import OtlpTraceReceiver, launch_mesh

    installed = subprocess.run(
        ["bash", str(DEPLOY / "tools" / "install-alerting.sh")], capture_output=True, text=True, timeout=600
    )
    assert installed.returncode == 0, f"deploy/tools/install-alerting.sh failed:\n{installed.stderr[-3000:]}"
    work = tmp_path_factory.mktemp("alerting")
    receiver = OtlpTraceReceiver()
    otlp = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, otlp)
    receiver.port = otlp.add_insecure_port("127.0.0.1:0")
    otlp.start()
    webhook = Webhook()
    processes: list[subprocess.Popen] = []
    try:
        with launch_mesh(receiver, up_args=["--no-openai"]) as mesh:
            am_port, prom_port = free_port(), free_port()
            (work / "alertmanager.yml").write_text(yaml.safe_dump(alertmanager_config(webhook.port)))
            (work / "alerts.yaml").write_text(yaml.safe_dump(fast_rules()))
            targets = {
                "meshserve-router": mesh.metrics_ports["router"],
                "meshserve-tokenizer": mesh.metrics_ports["tokenizer"],
                "meshserve-inference": mesh.metrics_ports["inference"],
            }
            prometheus_config = {
                "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
                "rule_files": [str(work / "alerts.yaml")],
                "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
                "scrape_configs": [
                    {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                    for job, port in targets.items()
                ],
            }
            (work / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config))
            checked = run([tool("amtool"), "check-config", str(work / "alertmanager.yml")])
            assert checked.returncode == 0, checked.stdout + checked.stderr
            log = open(work / "daemons.log", "w")
            processes.append(
                subprocess.Popen(
                    [
                        tool("prometheus-alertmanager"),
                        f"--config.file={work / 'alertmanager.yml'}",
                        f"--storage.path={work / 'am-data'}",
                        f"--web.listen-address=127.0.0.1:{am_port}",
                        "--cluster.listen-address=",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            processes.append(
                subprocess.Popen(
                    [
                        tool("prometheus"),
                        f"--config.file={work / 'prometheus.yml'}",
                        f"--storage.tsdb.path={work / 'prom-data'}",
                        f"--web.listen-address=127.0.0.1:{prom_port}",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            alerting = Alerting(mesh, webhook, prom_port, am_port)
            try:
                wait_until(
                    lambda: answers(f"{alerting.alertmanager}/-/ready") and answers(f"{alerting.prometheus}/-/ready"),
                    60,
                    "Prometheus and Alertmanager are ready",
                )
                wait_until(
                    lambda: alerting.up() == dict.fromkeys(targets, "1"), 60, "Prometheus scrapes the whole mesh"
                )
            except AssertionError:
                log.flush()
                raise AssertionError((work / "daemons.log").read_text()[-4000:]) from None
            yield alerting
    finally:
        for process in processes:
            stop_process(process)
        webhook.server.shutdown()
        otlp.stop(0)


def test_a_stopped_inference_replica_pages_the_critical_receiver_and_resolves_when_back(alerting):
    mesh, webhook = alerting.mesh, alerting.webhook
    inference = mesh.pids()["inference-0"]
    instance = f"127.0.0.1:{mesh.metrics_ports['inference']}"

    def paged(status: str) -> set[str]:
        return {
            a["labels"]["alertname"]
            for a in webhook.alerts("/critical", status)
            if a["labels"].get("job") == "meshserve-inference"
        }

    assert paged("firing") == set(), "a page before anything failed"
    os.kill(inference, signal.SIGSTOP)
    try:
        wait_until(lambda: paged("firing") >= {"MeshserveTargetDown", "MeshserveInferenceDown"}, 60, "both pages")
        [down] = [a for a in webhook.alerts("/critical", "firing") if a["labels"]["alertname"] == "MeshserveTargetDown"]
        assert down["labels"] == {
            "alertname": "MeshserveTargetDown",
            "job": "meshserve-inference",
            "instance": instance,
            "severity": "critical",
        }
        assert (
            down["annotations"]["summary"]
            == f"{instance} (meshserve-inference) has not answered Prometheus for 2 minutes"
        )
        assert not [a for a in webhook.alerts("/warning", "firing") if a["labels"].get("severity") == "critical"]
    finally:
        os.kill(inference, signal.SIGCONT)
    wait_until(lambda: paged("resolved") >= {"MeshserveTargetDown", "MeshserveInferenceDown"}, 60, "both resolve")
    assert all(n["receiver"] == "critical" for n in webhook.notifications("/critical"))


def test_warnings_are_grouped_per_alert_and_job_and_an_inference_outage_holds_them_back(alerting):
    """Two replicas' warnings of one alert arrive as one notification at the warning receiver; while the
    inference replica is stopped (MeshserveInferenceDown firing), a new warning is inhibited: Alertmanager
    marks it suppressed by that alert and delivers nothing for it."""
    webhook = alerting.webhook
    saturated = [
        posted_alert(
            "MeshserveQueueSaturated", job="meshserve-inference", instance=f"inference-{i}:9103", severity="warning"
        )
        for i in (0, 1)
    ]
    alerting.post(*saturated)
    wait_until(lambda: webhook.alerts("/warning", "firing"), 30, "the warnings arrive")
    [notification] = [
        n for n in webhook.notifications("/warning") if n["groupLabels"].get("alertname") == "MeshserveQueueSaturated"
    ]
    assert notification["groupLabels"] == {"alertname": "MeshserveQueueSaturated", "job": "meshserve-inference"}
    assert sorted(a["labels"]["instance"] for a in notification["alerts"]) == ["inference-0:9103", "inference-1:9103"]

    inference = alerting.mesh.pids()["inference-0"]
    os.kill(inference, signal.SIGSTOP)
    try:

        def outage_at_manager() -> bool:
            return any(
                a["labels"]["alertname"] == "MeshserveInferenceDown" and a["status"]["state"] == "active"
                for a in alerting.manager_alerts()
            )

        wait_until(outage_at_manager, 60, "MeshserveInferenceDown is active at Alertmanager")
        ttft = posted_alert("MeshserveTimeToFirstTokenHigh", job="meshserve-router", severity="warning")
        alerting.post(ttft)

        def ttft_state() -> dict | None:
            found = [
                a for a in alerting.manager_alerts() if a["labels"]["alertname"] == "MeshserveTimeToFirstTokenHigh"
            ]
            return found[0]["status"] if found else None

        wait_until(lambda: (ttft_state() or {}).get("state") == "suppressed", 30, "the warning is inhibited")
        assert ttft_state()["inhibitedBy"], "suppressed, but not by an inhibition"
        time.sleep(3)  # three group intervals: a notification, were one due, would have gone out
        assert not [
            a
            for a in webhook.alerts("/warning", "firing")
            if a["labels"]["alertname"] == "MeshserveTimeToFirstTokenHigh"
        ]
    finally:
        os.kill(inference, signal.SIGCONT)
    # once the outage resolves, the warning (still active) is delivered
    wait_until(
        lambda: [
            a
            for a in webhook.alerts("/warning", "firing")
            if a["labels"]["alertname"] == "MeshserveTimeToFirstTokenHigh"
        ],
        60,
        "the warning arrives after the outage",
    )


def test_the_committed_config_passes_amtool_and_routes_by_severity():
    result = run([tool("amtool"), "check-config", str(ALERTMANAGER_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr
    for severity in ("critical", "warning"):
        routed = run(
            [tool("amtool"), "config", "routes", "test", f"--config.file={ALERTMANAGER_CONFIG}", f"severity={severity}"]
        )
        assert routed.stdout.strip() == severity, routed.stdout + routed.stderr


def test_amtool_catches_a_route_to_a_missing_receiver(tmp_path):
    broken = tmp_path / "alertmanager.yml"
    broken.write_text(ALERTMANAGER_CONFIG.read_text().replace("receiver: critical", "receiver: pager"))
    assert run([tool("amtool"), "check-config", str(broken)]).returncode != 0
