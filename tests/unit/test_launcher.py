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
