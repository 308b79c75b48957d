"""`meshserve up`'s share of the machine for each inference replica."""

from __future__ import annotations

import os

import pytest

from services.cli import launcher


def test_inference_replicas_split_the_cores_between_them(monkeypatch):
    monkeypatch.delenv("MESHSERVE_INFERENCE_THREADS", raising=False)
    for cores, replicas, args in (
        (2, 1, []),
        (2, 2, ["--threads=1"]),
        (8, 3, ["--threads=2"]),
        (1, 4, ["--threads=1"]),
    ):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert launcher.inference_threads_args(replicas) == args
    monkeypatch.setenv("MESHSERVE_INFERENCE_THREADS", "3")  # the operator's choice is kept
    assert launcher.inference_threads_args(2) == []


def test_model_versions_are_named_precisions_each_once():
    assert launcher.model_versions(["blue=int8", "green=int4"]) == [("blue", "int8"), ("green", "int4")]
    for specs, message in (
        (["blue"], "expected NAME=PRECISION"),
        (["blue=int3"], "expected NAME=PRECISION, PRECISION one of"),
        (["Blue=int8"], "'Blue' is not a version name"),
        (["blue=int8", "blue=int4"], "'blue' is given twice"),
    ):
        with pytest.raises(SystemExit, match=message):
            launcher.model_versions(specs)


def test_up_refuses_two_listeners_on_one_port_before_it_starts_anything(tmp_path):
    """bench/mesh.sh once put the routers' admin port (router port + 10) on the tokenizer's: the router started
    beside it (SO_REUSEPORT) and answered half of the tokenizer's health checks with UNIMPLEMENTED."""
    from services.cli.main import build_parser

    def up(*flags: str) -> None:
        launcher.run(build_parser().parse_args(["up", "--run-dir", str(tmp_path), *flags]))

    layout = ["--port", "31000", "--router-port", "31010", "--tokenizer-port", "31020", "--inference-port", "31030"]
    with pytest.raises(
        SystemExit, match=r"--tokenizer-port and router 0's admin port \(--router-admin-port\) are both port 31020"
    ):
        up(*layout)
    with pytest.raises(
        SystemExit,
        match=r"inference 1.s metrics \(--metrics-port-base\) and inference 1 \(--inference-port\) are both port 9113",
    ):
        up("--inference-replicas", "2", "--inference-port", "9013")
    assert not any(tmp_path.iterdir()), "nothing may start (no run directory) before the ports are checked"
