"""`meshserve up`'s share of the machine for each inference replica."""

from __future__ import annotations

import os

from services.cli import launcher


def test_inference_replicas_split_the_cores_between_them(monkeypatch):
    for cores, replicas, threads in ((2, 1, 2), (2, 2, 1), (8, 3, 2), (1, 4, 1)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert launcher.inference_threads(replicas) == threads
