"""Backend-only step timings (no engine, no gRPC): decode tokens/s at several batch sizes and the
time of one 100-token prefill, for one or more prepared model directories, interleaved A/B (each
round of each model in a fresh process; medians). Rows hold `--context` cached tokens before decoding.

    .venv/bin/python bench/backend_steps.py models/smollm2-135m-instruct/*-v5 --batch 1 8 32 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from services.bench.steps import best_prefill_ms, decode_rate, wait_for_idle
from services.inference.backends.onnxruntime import OnnxRuntimeBackend
from services.modelstore.layout import ModelDirectory


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
    parser.add_argument(
        "--repeats", type=int, default=3, help="A/B rounds, each model in a fresh process (medians are reported)"
    )
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
            child = [
                sys.executable,
                __file__,
                str(model),
                "--one",
                "--context",
                str(args.context),
                "--steps",
                str(args.steps),
                "--threads",
                str(args.threads),
                "--batch",
                *map(str, args.batch),
            ]
            measured = json.loads(
                subprocess.run(child, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            )
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
