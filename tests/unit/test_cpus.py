"""Core sets for pinned inference replicas (services/common/cpus.py, `serve-inference --cpus`,
`meshserve up --inference-cpus`): the cpulist syntax, NUMA nodes read from a /sys tree, placement, and
the refusals. This machine has one NUMA node, so several nodes are a fixture tree laid out as Linux
lays out /sys/devices/system/node; pinning itself runs for real in a child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli.launcher import inference_core_sets
from services.common.cpus import CpuSetError, check_cpus, format_cpu_list, numa_nodes, parse_cpu_list, place_replicas

REPO = Path(__file__).resolve().parents[2]


def node_tree(root: Path, nodes: dict[int, str]) -> Path:
    """root/nodeN/cpulist for each node, plus the files /sys has beside them (not nodes)."""
    for node, cpulist in nodes.items():
        (root / f"node{node}").mkdir(parents=True)
        (root / f"node{node}" / "cpulist").write_text(cpulist + "\n")
        (root / f"node{node}" / "meminfo").write_text("Node 0 MemTotal: 1 kB\n")
    (root / "possible").write_text("0-1\n")
    (root / "power").mkdir()
    return root


def test_cpulists_parse_and_format_as_linux_writes_them():
    assert parse_cpu_list("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert parse_cpu_list("5") == {5}
    assert format_cpu_list({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    assert format_cpu_list(parse_cpu_list("3,1,2")) == "1-3"
    for bad in ("", "a", "1-", "3-1", "1,,2"):
        with pytest.raises(CpuSetError):
            parse_cpu_list(bad)


def test_numa_nodes_are_read_from_the_sys_tree(tmp_path):
    root = node_tree(tmp_path, {0: "0-3,8-11", 1: "4-7,12-15", 2: ""})  # node 2: memory only (no cores)
    assert numa_nodes(root) == {0: parse_cpu_list("0-3,8-11"), 1: parse_cpu_list("4-7,12-15")}
    assert numa_nodes(tmp_path / "absent") == {}


def test_this_machines_node_list_parses():
    """The real /sys: every node's cores are real cores (one node here, so placement is not exercised)."""
    nodes = numa_nodes()
    assert all(cores <= set(range(os.cpu_count() or 1)) for cores in nodes.values())


def test_replicas_go_round_robin_over_nodes_and_never_span_two(tmp_path):
    nodes = numa_nodes(node_tree(tmp_path, {0: "0-3", 1: "4-7"}))
    everything = frozenset(range(8))
    assert place_replicas(2, everything, nodes) == [{0, 1, 2, 3}, {4, 5, 6, 7}]
    assert place_replicas(4, everything, nodes) == [{0, 1}, {4, 5}, {2, 3}, {6, 7}]
    three = place_replicas(3, everything, nodes)
    assert three[0] | three[2] == {0, 1, 2, 3} and three[1] == {4, 5, 6, 7}
    for cores in place_replicas(6, everything, nodes):
        assert cores <= nodes[0] or cores <= nodes[1]
    # only the cores this process may use (a container's cpuset): node 1 has one left
    assert place_replicas(3, frozenset({0, 1, 2, 4}), nodes) == [{0}, {4}, {1, 2}]


def test_one_node_or_none_splits_the_cores_in_order():
    assert place_replicas(2, frozenset({0, 1}), {}) == [{0}, {1}]
    assert place_replicas(1, frozenset({0, 1}), {0: frozenset({0, 1})}) == [{0, 1}]
    assert place_replicas(3, frozenset(range(7)), {0: frozenset(range(7))}) == [{0, 1}, {2, 3}, {4, 5, 6}]


def test_more_replicas_than_cores_or_a_core_the_machine_lacks_is_refused():
    with pytest.raises(CpuSetError, match="3 pinned replicas need a core each, but this process may use 2"):
        place_replicas(3, frozenset({0, 1}), {})
    with pytest.raises(CpuSetError, match=r"names core\(s\) 4-7, which this machine does not have"):
        check_cpus(parse_cpu_list("0-7"), frozenset({0, 1, 2, 3}))


def test_launcher_core_sets_default_per_replica_auto_none_and_refusals():
    two = frozenset({0, 1})
    assert inference_core_sets(None, 1, two, {}) is None  # one replica: not pinned unless asked
    assert inference_core_sets(None, 2, two, {}) == ["0", "1"]  # several: pinned by default (it measured faster)
    assert inference_core_sets(None, 3, two, {}) is None  # fewer cores than replicas: shared, as before
    assert inference_core_sets(["none"], 2, two, {}) is None
    assert inference_core_sets(["auto"], 2, two, {}) == ["0", "1"]
    assert inference_core_sets(["1", "0"], 2, two, {}) == ["1", "0"]
    for spec, replicas, message in (
        (["0-63"], 1, "names core(s) 2-63, which this machine does not have"),
        (["0"], 2, "1 core set(s) for 2 inference replica(s)"),
        (["0-1", "1"], 2, "replicas 0 and 1 would share core(s) 1"),
        (["auto"], 3, "3 pinned replicas need a core each"),
    ):
        with pytest.raises(SystemExit, match=r"^meshserve up: --inference-cpus: ") as refused:
            inference_core_sets(spec, replicas, two, {})
        assert message in str(refused.value)


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "gen" / "python")])}
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_serve_inference_pins_itself_and_its_threads_follow_the_set():
    probe = (
        "import argparse, json, os; from services.inference.main import pin_to_cpus;"
        "a = argparse.Namespace(cpus='0', threads=0); pin_to_cpus(a);"
        "print(json.dumps([sorted(os.sched_getaffinity(0)), a.threads]))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "gen" / "python")])}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [[0], 1]


def test_a_core_set_the_machine_lacks_stops_serve_inference_and_up_before_they_start_anything(tmp_path):
    missing = str(os.cpu_count() or 1)  # cores are numbered from 0: this one does not exist
    result = _run_cli("serve-inference", "--cpus", missing, "--models-root", str(tmp_path / "models"))
    assert result.returncode == 1
    assert f"meshserve serve-inference: --cpus {missing}: core set {missing} names core(s) {missing}" in result.stderr
    result = _run_cli(
        "up", "--inference-cpus", f"0-{missing}", "--models-root", str(tmp_path / "models"), "--run-dir", str(tmp_path)
    )
    assert result.returncode == 1 and "meshserve up: --inference-cpus: core set" in result.stderr
    assert not (tmp_path / "models").exists() and not list(tmp_path.glob("mesh-*")), "something was started"
