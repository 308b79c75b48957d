"""Fixtures shared by every test layer."""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODELS_ROOT = REPO / "models"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_block(offsets) -> int:
    """A base port b such that b + o is free for every o in `offsets`, below the kernel's ephemeral range
    (where free_port's ports and every client socket live), for a launcher that derives ports from a base."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(10000, 30000 - max(offsets))
        sockets = []
        try:
            for offset in offsets:
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no free block of ports at offsets {sorted(offsets)}")


@pytest.fixture(scope="session")
def model_dir():
    """The real prepared SmolLM2 model (prepared once; idempotent afterwards)."""
    from services.modelstore.prepare import prepare_model

    return prepare_model(MODELS_ROOT)


def wait_until(predicate, timeout_s: float = 60.0, what: str = "the condition holds", interval_s: float = 0.05) -> None:
    """Polls `predicate` until it is true; fails the test, naming `what`, after `timeout_s`. The one way
    tests wait: never a fixed sleep that hopes something happened meanwhile."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting until {what}"
        time.sleep(interval_s)


async def wait_until_async(predicate, timeout_s: float = 10.0, what: str = "the condition holds") -> None:
    """`wait_until` for tests on an event loop: polls without blocking the loop the code under test runs on."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting until {what}"
        await asyncio.sleep(0.01)


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    """Asks a process to stop with `sig`, and kills it if it has not exited within `timeout` seconds."""
    process.send_signal(sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
