"""Backend-only step timings (no engine, no gRPC): decode tokens/s at several batch sizes and the
time of one 100-token prefill, for one or more prepared model directories, interleaved A/B (each
round of each model in a fresh process; medians). Rows hold `--context` cached tokens before decoding.

    .venv/bin/python bench/backend_steps.py models/smollm2-135m-instruct/*-v4 --batch 1 8 32 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.inference.backends.base import StepBatch  # noqa: E402
from services.inference.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from services.modelstore.layout import ModelDirectory  # noqa: E402


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


def decode_rate(backend: OnnxRuntimeBackend, rows: int, context: int, steps: int) -> float:
    """Tokens/s of `steps` decode steps of `rows` rows that each hold `context` cached tokens."""
    rng = np.random.default_rng(0)
    slots = np.arange(rows)
    prompt = rng.integers(100, 20000, (rows, context))
    backend.forward(StepBatch(slots, prompt, np.zeros(rows, np.int64), np.full(rows, context), np.full((rows, 1), context - 1)))
    cached = np.full(rows, context, np.int64)
    tokens = rng.integers(100, 20000, (rows, 1))
    started = time.perf_counter()
    for _ in range(steps):
        logits = backend.forward(StepBatch(slots, tokens, cached, np.ones(rows, np.int64), np.zeros((rows, 1), np.int64)))
        tokens = logits[:, 0].argmax(-1)[:, None]
        cached = cached + 1
    return rows * steps / (time.perf_counter() - started)


def prefill_ms(backend: OnnxRuntimeBackend, length: int) -> float:
    prompt = np.random.default_rng(1).integers(100, 20000, length)
    started = time.perf_counter()
    backend.forward(StepBatch.one_row(prompt))
    return (time.perf_counter() - started) * 1000


def best_prefill_ms(backend: OnnxRuntimeBackend, length: int = 100) -> float:
    """A warm-up of the shape, a quiet machine, then the best of three prefills of `length` tokens."""
    prefill_ms(backend, length)
    wait_for_idle()
    return min(prefill_ms(backend, length) for _ in range(3))


def measure_one(model: Path, batches: list[int], context: int, steps: int, threads: int) -> dict[str, float]:
    """One model in this process: prefill and decode timings."""
    backend = OnnxRuntimeBackend(ModelDirectory(model), max(batches), 1024, intra_op_threads=threads)
    out = {"prefill_100_ms": best_prefill_ms(backend)}
    for rows in batches:
        decode_rate(backend, rows, context, 2)  # warm-up of this shape
        wait_for_idle()
        out[f"decode_b{rows}_tok_s"] = decode_rate(backend, rows, context, steps)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--context", type=int, default=100, help="cached tokens per row before decoding")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="A/B rounds, each model in a fresh process (medians are reported)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child: one model, one round
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.models[0], args.batch, args.context, args.steps, args.threads)))
        return 0
    results: dict[str, dict[str, list[float]]] = {str(m): {} for m in args.models}
    for _ in range(args.repeats):
        for model in args.models:  # A, B, A, B ... each in its own process so no thread pools compete
            child = [sys.executable, __file__, str(model), "--one", "--context", str(args.context), "--steps", str(args.steps),
                     "--threads", str(args.threads), "--batch", *map(str, args.batch)]
            measured = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            for key, value in measured.items():
                results[str(model)].setdefault(key, []).append(value)
    report = {
        name: {key: round(statistics.median(values), 2) for key, values in metrics.items()}
        | {"precision": ModelDirectory(Path(name)).manifest["precision"]}
        for name, metrics in results.items()
    }
    if args.json:
        print(json.dumps(report))
    else:
        for name, metrics in report.items():
            print(name, metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
