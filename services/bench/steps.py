"""Backend step timings (no engine, no gRPC) and waiting for a quiet machine, for the A/B scripts
in bench/ (backend_steps.py, engine_precisions.py)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from services.inference.backends.base import DecoderBackend, StepBatch


def wait_for_idle(min_idle: float = 0.85, timeout_s: float = 60.0) -> None:
    """The machine is shared: wait (up to timeout_s) for a second in which the CPUs are mostly idle."""
    deadline = time.monotonic() + timeout_s

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]

    while time.monotonic() < deadline:
        total0, idle0 = sample()
        time.sleep(1.0)
        total1, idle1 = sample()
        if (idle1 - idle0) >= min_idle * max(total1 - total0, 1):
            return


def decode_rate(backend: DecoderBackend, rows: int, context: int, steps: int) -> float:
    """Tokens/s of `steps` decode steps of `rows` rows that each hold `context` cached tokens."""
    rng = np.random.default_rng(0)
    slots = np.arange(rows)
    prompt = rng.integers(100, 20000, (rows, context))
    backend.forward(
        StepBatch(slots, prompt, np.zeros(rows, np.int64), np.full(rows, context), np.full((rows, 1), context - 1))
    )
    cached = np.full(rows, context, np.int64)
    tokens = rng.integers(100, 20000, (rows, 1))
    started = time.perf_counter()
    for _ in range(steps):
        logits = backend.forward(
            StepBatch(slots, tokens, cached, np.ones(rows, np.int64), np.zeros((rows, 1), np.int64))
        )
        tokens = logits[:, 0].argmax(-1)[:, None]
        cached = cached + 1
    return rows * steps / (time.perf_counter() - started)


def prefill_ms(backend: DecoderBackend, length: int) -> float:
    """Milliseconds of one prefill of `length` random tokens into slot 0."""
    prompt = np.random.default_rng(1).integers(100, 20000, length)
    started = time.perf_counter()
    backend.forward(StepBatch.one_row(prompt))
    return (time.perf_counter() - started) * 1000


def best_prefill_ms(backend: DecoderBackend, length: int = 100) -> float:
    """A warm-up of the shape, a quiet machine, then the best of three prefills of `length` tokens."""
    prefill_ms(backend, length)
    wait_for_idle()
    return min(prefill_ms(backend, length) for _ in range(3))
