"""Engine-level A/B of prepared model directories (e.g. fp32 vs int8): the real `Engine` over the
ONNX Runtime backend, no gRPC, the same prompts and report as `python -m services.bench.engine`,
plus the time of one 100-token prefill. The machine is shared and noisy, so each (model, concurrency)
run is its own process, the runs alternate A, B, A, B, each measurement waits for a quiet second,
and medians over `--repeats` are reported.

    .venv/bin/python bench/engine_precisions.py models/smollm2-135m-instruct/*-fp32-v5 \\
        models/smollm2-135m-instruct/*-int8-v5 --concurrency 1 8 32 --max-tokens 128 --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run_one(model: Path, concurrency: int, requests: int, max_tokens: int) -> dict:
    """One engine run in this process; returns the bench report plus the 100-token prefill time."""
    from services.bench.engine import encode_prompts, run_requests
    from services.bench.prompts import load_prompts
    from services.bench.report import summarize
    from services.bench.steps import best_prefill_ms, wait_for_idle
    from services.common.contract import SamplingParams
    from services.inference.backends.onnxruntime import OnnxRuntimeBackend
    from services.inference.engine import Engine, EngineConfig
    from services.modelstore.layout import ModelDirectory

    directory = ModelDirectory(model)
    base = EngineConfig()
    config = dataclasses.replace(base, num_slots=max(base.num_slots, concurrency))
    backend = OnnxRuntimeBackend(directory, config.num_slots, config.max_context)
    prefill = best_prefill_ms(backend)
    engine = Engine(backend, config)
    engine.start()
    try:
        encoded = encode_prompts(directory, load_prompts(None), chat=True)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        stop_ids = frozenset(directory.eos_token_ids)
        # a short unreported wave at the same concurrency: first runs of each shape, first touches of KV pages
        warm = dataclasses.replace(params, max_tokens=8)
        run_requests(engine, encoded, warm, stop_ids, concurrency, concurrency, label="warmup")
        wait_for_idle()
        results, wall_s = run_requests(engine, encoded, params, stop_ids, concurrency, requests)
    finally:
        engine.stop()
    report = summarize(results, wall_s)
    report.update(prefill_100_ms=round(prefill, 2), engine_steps=engine.steps)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", type=Path)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-stream", type=int, default=2, help="requests = this x concurrency (at least 4)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # child: MODEL CONCURRENCY REQUESTS
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(Path(args.one[0]), int(args.one[1]), int(args.one[2]), args.max_tokens)))
        return 0
    keys = ("tokens_per_s", "prefill_100_ms")
    table: dict[tuple[str, int], dict[str, list[float]]] = {}
    for _ in range(args.repeats):
        for concurrency in args.concurrency:
            for model in args.models:
                requests = max(4, args.requests_per_stream * concurrency)
                child = [
                    sys.executable,
                    __file__,
                    "--max-tokens",
                    str(args.max_tokens),
                    "--one",
                    str(model),
                    str(concurrency),
                    str(requests),
                ]
                started = time.perf_counter()
                done = subprocess.run(child, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{child} failed:\n{done.stderr}")
                out = done.stdout.strip().splitlines()[-1]
                report = json.loads(out)
                cell = table.setdefault((str(model), concurrency), {})
                for key in keys + ("ttft_ms", "itl_ms"):
                    value = report[key]["p50"] if isinstance(report[key], dict) else report[key]
                    cell.setdefault(key, []).append(value)
                print(
                    f"{model.name} c={concurrency}: {report['tokens_per_s']:.1f} tok/s, "
                    f"prefill {report['prefill_100_ms']:.1f} ms "
                    f"({time.perf_counter() - started:.0f}s)",
                    file=sys.stderr,
                    flush=True,
                )
    summary = [
        {"model": name, "concurrency": c} | {key: round(statistics.median(values), 2) for key, values in cell.items()}
        for (name, c), cell in table.items()
    ]
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
