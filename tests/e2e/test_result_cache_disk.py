"""The result cache's disk tier with real processes: a router restarted by the launcher answers a repeated
greedy request from its SQLite file without asking a replica, and a file truncated while the router is
stopped costs a warning, not the router."""

from __future__ import annotations

import os
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import wait_until
from tests.e2e.conftest import launch_mesh, metric_value
from tests.e2e.test_result_cache import content, question, run


@pytest.fixture(scope="module")
def disk_path(tmp_path_factory):
    return tmp_path_factory.mktemp("result-cache") / "router.db"


@pytest.fixture(scope="module")
def disk_mesh(model_dir, otlp_receiver, disk_path):
    with launch_mesh(
        otlp_receiver,
        inference_args=["--num-slots=4"],
        router_args=[f"--result-cache-disk={disk_path}", "--drain-notice-s=0"],
    ) as mesh:
        yield mesh


def serving_through_envoy(mesh) -> bool:
    with grpc.insecure_channel(mesh.target) as channel:
        try:
            request = health_pb2.HealthCheckRequest(service="meshserve.v1.GenerationService")
            status = health_pb2_grpc.HealthStub(channel).Check(request, timeout=1).status
        except grpc.RpcError:
            return False
    return status == health_pb2.HealthCheckResponse.SERVING


def exited(pid: int) -> bool:
    """Gone, or a zombie its (stopped) parent has not reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def restart_router(mesh, while_stopped=lambda: None) -> None:
    """SIGTERMs the router and lets the launcher start it again, running `while_stopped` in between
    (the launcher is stopped meanwhile, so it cannot restart the router early)."""
    router = mesh.pids()["router-0"]
    os.kill(mesh.process.pid, signal.SIGSTOP)
    try:
        os.kill(router, signal.SIGTERM)
        wait_until(lambda: exited(router), 60, "the router exited")
        while_stopped()
    finally:
        os.kill(mesh.process.pid, signal.SIGCONT)
    wait_until(lambda: mesh.pids()["router-0"] != router, 30, "the launcher restarted the router")
    wait_until(lambda: serving_through_envoy(mesh), 120, "Envoy routes to the restarted router")


def replica_lookups(mesh) -> float:
    return metric_value(mesh.metrics("inference-0"), "meshserve_prefix_cache_queries_total")


def test_a_restarted_router_answers_a_repeated_greedy_request_from_disk(disk_mesh, disk_path):
    request = question("What is the capital of Italy?", temperature=0.0, logprobs=1)
    fresh, _, _ = run(disk_mesh.target, request)
    assert not fresh[-1].complete.cached
    restart_router(disk_mesh)
    assert disk_path.exists()
    lookups = replica_lookups(disk_mesh)
    again, _, metadata = run(disk_mesh.target, request)
    assert again[-1].complete.cached and ("x-meshserve-cache", "hit") in metadata
    assert content(again) == content(fresh)  # chunk for chunk, as generated before the restart
    router_metrics = disk_mesh.metrics("router-0")
    assert metric_value(router_metrics, "meshserve_result_cache_hits_total", tier="disk") == 1
    assert metric_value(router_metrics, "meshserve_result_cache_disk_bytes") > 0
    assert replica_lookups(disk_mesh) == lookups  # no replica saw the request


def test_a_file_truncated_while_the_router_is_stopped_costs_a_warning_not_the_router(disk_mesh, disk_path):
    request = question("Name a large ocean.", temperature=0.0)
    fresh, _, _ = run(disk_mesh.target, request)

    def truncate() -> None:
        size = disk_path.stat().st_size
        with open(disk_path, "r+b") as file:
            file.truncate(size // 2 + 1000)

    restart_router(disk_mesh, truncate)
    answered, _, _ = run(disk_mesh.target, request)
    assert answered[-1].HasField("complete") and not answered[-1].complete.cached  # the old file is not served
    assert content(answered) == content(fresh)
    log = open(disk_mesh.log_path).read()
    assert log.count("is truncated") == 1 and "moved it to" in log
    assert list(disk_path.parent.glob("router.db.unusable-*"))
    again, _, _ = run(disk_mesh.target, request)  # the fresh file stores and serves
    assert again[-1].complete.cached
