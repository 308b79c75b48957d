"""`meshserve up`'s share of the machine for each inference replica."""

from __future__ import annotations

import os

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
