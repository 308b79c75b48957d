"""The runtime spike of issue 22: one backend step at the shapes the engine runs, for one or more prepared
model directories (each precision a candidate runtime path), interleaved A/B, each round of each model in a
fresh process; medians of the rounds. Shapes: a decode step of 1 / 8 / 32 rows over 150 or 1,500 cached
tokens a row, and one 128-token prefill chunk after 896 cached tokens.

    .venv/bin/python bench/step_shapes.py models/smollm2-135m-instruct/*-int8-v6 models/smollm2-135m-instruct/*-w8a8-v6

A model given as DIR@CHECKOUT runs with the backend of another checkout (a git worktree of an older commit,
with its own prepared DIR), so that two versions of the backend compare in one sitting:

    git worktree add /tmp/before <commit> && ln -s $PWD/models /tmp/before/models
    .venv/bin/python bench/step_shapes.py models/smollm2-135m-instruct/*-int8-v5@/tmp/before \
        models/smollm2-135m-instruct/*-int8-v6

Prints milliseconds a step (lower is better) and, for decode, tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from services.bench.steps import wait_for_idle
from services.inference.backends.base import StepBatch
from services.inference.backends.onnxruntime import OnnxRuntimeBackend
from services.modelstore.layout import ModelDirectory

ROWS = (1, 8, 32)
CONTEXTS = (150, 1500)
CHUNK, CHUNK_AFTER = 128, 896


def _fill(backend: OnnxRuntimeBackend, rows: int, context: int) -> None:
    """Prefills `context` random tokens into slots [0, rows), in chunks of 512 a row."""
    rng = np.random.default_rng(0)
    for slot in range(rows):
        ids = rng.integers(100, 20000, context)
        for start in range(0, context, 512):
            backend.forward(StepBatch.one_row(ids[start : start + 512], slot, cached=start))


def decode_step_ms(backend: OnnxRuntimeBackend, rows: int, context: int, steps: int) -> float:
    slots = np.arange(rows)
    tokens = np.random.default_rng(1).integers(100, 20000, (rows, 1))
    times = []
    for i in range(steps + 2):  # two warm-up steps of the shape
        batch = StepBatch(
            slots, tokens, np.full(rows, context + i), np.ones(rows, np.int64), np.zeros((rows, 1), np.int64)
        )
        started = time.perf_counter()
        logits = backend.forward(batch)
        times.append(time.perf_counter() - started)
        tokens = logits[:, 0].argmax(-1)[:, None]
    return statistics.median(times[2:]) * 1000


def prefill_chunk_ms(backend: OnnxRuntimeBackend, repeats: int = 3) -> float:
    ids = np.random.default_rng(2).integers(100, 20000, CHUNK)
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        backend.forward(StepBatch.one_row(ids, 0, cached=CHUNK_AFTER))  # rewrites the same positions
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:]) * 1000


def measure_one(model: Path, steps: int, threads: int, idle_wait_s: float) -> dict[str, float]:
    backend = OnnxRuntimeBackend(ModelDirectory(model), max(ROWS), 2048, intra_op_threads=threads)
    out: dict[str, float] = {}
    _fill(backend, 1, CHUNK_AFTER)
    wait_for_idle(timeout_s=idle_wait_s)
    out[f"prefill_{CHUNK}_after_{CHUNK_AFTER}_ms"] = prefill_chunk_ms(backend)
    for context in CONTEXTS:
        _fill(backend, max(ROWS), context)
        for rows in ROWS:
            wait_for_idle(timeout_s=idle_wait_s)
            ms = decode_step_ms(backend, rows, context, steps)
            out[f"decode_{rows}x{context}_ms"] = ms
            out[f"decode_{rows}x{context}_tok_s"] = rows * 1000 / ms
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="prepared model directories, each optionally @CHECKOUT")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="A/B rounds, each model in a fresh process")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--idle-wait", type=float, default=60.0, help="seconds to wait for idle CPUs per shape")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child: one model, one round
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(Path(args.models[0]), args.steps, args.threads, args.idle_wait)))
        return 0
    results: dict[str, dict[str, list[float]]] = {m: {} for m in args.models}
    for _ in range(args.repeats):
        for model in args.models:
            directory, _, checkout = model.partition("@")
            code = Path(checkout or Path(__file__).parents[1]).resolve()
            # this harness, importing the backend of `code`
            child = [sys.executable, __file__, str(Path(directory).resolve()), "--one"]
            child += ["--steps", str(args.steps), "--threads", str(args.threads), "--idle-wait", str(args.idle_wait)]
            env = os.environ | {"PYTHONPATH": os.pathsep.join([str(code), str(code / "gen" / "python")])}
            run = subprocess.run(child, check=True, capture_output=True, text=True, env=env, cwd=code)
            for key, value in json.loads(run.stdout.strip().splitlines()[-1]).items():
                results[model].setdefault(key, []).append(value)
    report = {
        name: {"precision": ModelDirectory(Path(name.partition("@")[0])).manifest["precision"]}
        | {key: round(statistics.median(values), 1) for key, values in metrics.items()}
        for name, metrics in results.items()
    }
    if args.json:
        print(json.dumps(report))
    else:
        for name, metrics in report.items():
            print(name)
            for key, value in metrics.items():
                print(f"  {key:32s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
