"""Constrained vs. free decoding on the engine (no gRPC), in one run, and grammar compile times.

    python bench/structured_outputs.py [--models-root models] [--precision int8] [--max-tokens 96] [--json]

Four phases on one engine, greedy:
  1. `--streams` free streams alone;
  2. as many JSON-schema-constrained streams alone;
  3. both together (free beside constrained);
  4. twice as many free streams (free beside free: the baseline of 3).
For each stream: decode tokens/s (tokens after the first over the time since the first). The phases
alternate for `--rounds` rounds; reported are the medians of the rounds' ratios: constrained to free
(2 vs 1; the issue's goal: >= 0.7) and free streams beside constrained ones to free streams beside as
many free ones (3 vs 4, the same batch size; the goal: within noise). Then the compile time of every
test constraint of bench/grammar_backends.py (cold: llguidance builds it; cached: a request's copy).
docs/structured-outputs.md keeps the numbers with date and machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from grammar_backends import CASES  # beside this script

from services.common.contract import Constraint, SamplingParams
from services.common.errors import InvalidArgumentError
from services.inference.backends.selection import create_backend
from services.inference.constraints import GrammarCompiler
from services.inference.engine import Engine, EngineConfig
from services.modelstore.layout import find_model
from services.modelstore.prepare import DEFAULT_PRECISION, PRECISIONS
from services.tokenizer.core import ChatMessage, TokenizerCore

FACTS = json.dumps(
    {
        "type": "object",
        "properties": {
            "facts": {"type": "array", "minItems": 12, "maxItems": 12, "items": {"type": "string", "maxLength": 80}}
        },
        "required": ["facts"],
        "additionalProperties": False,
    }
)
PROMPTS = [
    "List facts about the ocean.",
    "List facts about bicycles.",
    "List facts about Rome.",
    "List facts about the planets.",
]


class _Stream:
    def __init__(self) -> None:
        self.times: list[float] = []
        self.done = threading.Event()

    def on_output(self, output) -> None:
        now = time.perf_counter()
        self.times += [now] * len(output.token_ids)
        if output.finish_reason is not None:
            self.done.set()

    def rate(self) -> float:
        if len(self.times) < 2 or self.times[-1] == self.times[0]:
            return float("nan")
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def _to_kind(kind: str, constraint: Any) -> Constraint:
    if kind == "json":
        return Constraint("json_schema", json.dumps(constraint))
    if kind == "regex":
        return Constraint("regex", constraint)
    if kind == "choice":
        return Constraint("choice", choices=tuple(constraint))
    return Constraint("grammar", constraint)


def run_phase(engine, grammars, tokenizer, free: int, constrained: int, max_tokens: int) -> dict[str, list[float]]:
    streams: dict[str, list[_Stream]] = {"free": [], "constrained": []}
    for i in range(free + constrained):
        kind = "free" if i < free else "constrained"
        prompt = tokenizer.encode_chat([ChatMessage("user", PROMPTS[i % len(PROMPTS)])])
        if kind == "free":
            params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0.0)
            row = None
        else:
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, constraint=Constraint("json_schema", FACTS))
            row = grammars.compile(params.constraint)
        stream = _Stream()
        streams[kind].append(stream)
        engine.submit(f"{kind}-{i}", prompt, params, frozenset({2}), stream.on_output, constraint=row)
    for group in streams.values():
        for stream in group:
            assert stream.done.wait(600)
    return {kind: [s.rate() for s in group] for kind, group in streams.items() if group}


def compile_times(grammars: GrammarCompiler, repeats: int) -> dict[str, dict[str, float]]:
    out = {}
    for name, kind, constraint, _ in CASES:
        c = _to_kind(kind, constraint)
        cold, cached = [], []
        try:
            grammars.compile(c)
        except InvalidArgumentError as refusal:  # outside llguidance's coverage (grammar_backends.py shows it)
            out[name] = {"refused": refusal.description}
            continue
        for _ in range(repeats):
            started = time.perf_counter()
            grammars._build(c)  # what a cache miss costs
            cold.append(time.perf_counter() - started)
            started = time.perf_counter()
            grammars.compile(c)  # what a request pays once it is cached
            cached.append(time.perf_counter() - started)
        out[name] = {
            "cold_ms_p50": statistics.median(cold) * 1000,
            "cold_ms_p99": float(np.percentile(cold, 99)) * 1000,
            "cached_ms_p99": float(np.percentile(cached, 99)) * 1000,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-root", type=Path, default=Path("models"))
    parser.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION)
    parser.add_argument("--streams", type=int, default=2, help="free and constrained streams (each) per phase")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--compile-repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three phases (medians reported)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    model = find_model(args.models_root, args.precision)
    config = EngineConfig(num_slots=2 * args.streams, max_context=512, max_new_tokens=args.max_tokens + 1)
    engine = Engine(create_backend("onnxruntime", model, config.num_slots, config.max_context), config)
    engine.start()
    grammars = GrammarCompiler(model.tokenizer_path.read_text(), model.eos_token_ids, model.config.vocab_size)
    tokenizer = TokenizerCore(model)
    try:
        run_phase(engine, grammars, tokenizer, 1, 1, 16)  # warm-up, not reported
        alone_free: list[float] = []
        alone_constrained: list[float] = []
        mixed: dict[str, list[float]] = {"free": [], "constrained": []}
        mixed_baseline: list[float] = []
        ratios, beside_ratios = [], []
        # the phases alternate, round after round, so a shared machine's load shifts hit them alike
        for _ in range(args.rounds):
            free = run_phase(engine, grammars, tokenizer, args.streams, 0, args.max_tokens)["free"]
            constrained = run_phase(engine, grammars, tokenizer, 0, args.streams, args.max_tokens)["constrained"]
            both = run_phase(engine, grammars, tokenizer, args.streams, args.streams, args.max_tokens)
            baseline = run_phase(engine, grammars, tokenizer, 2 * args.streams, 0, args.max_tokens)["free"]
            mixed_baseline += baseline
            alone_free += free
            alone_constrained += constrained
            mixed["free"] += both["free"]
            mixed["constrained"] += both["constrained"]
            ratios.append(statistics.fmean(constrained) / statistics.fmean(free))
            beside_ratios.append(statistics.fmean(both["free"]) / statistics.fmean(baseline))
    finally:
        engine.stop()
    mean = statistics.median
    report = {
        "free_alone_tokens_per_s": alone_free,
        "constrained_alone_tokens_per_s": alone_constrained,
        "mixed_free_tokens_per_s": mixed["free"],
        "mixed_constrained_tokens_per_s": mixed["constrained"],
        "free_beside_free_tokens_per_s": mixed_baseline,
        "constrained_to_free_ratio": statistics.median(ratios),
        "free_beside_constrained_to_beside_free_ratio": statistics.median(beside_ratios),
        "compile": compile_times(grammars, args.compile_repeats),
    }
    grammars.close()
    if args.json:
        print(json.dumps(report, indent=2))
        return

    def rates(values: list[float]) -> str:
        return ", ".join(f"{v:.1f}" for v in values) + f" (median {mean(values):.1f})"

    print(f"streams per kind: {args.streams}, max_tokens {args.max_tokens}, {args.precision}, greedy")
    print(f"free alone           tokens/s per stream: {rates(alone_free)}")
    print(f"constrained alone    tokens/s per stream: {rates(alone_constrained)}")
    print(f"free beside constr.  tokens/s per stream: {rates(mixed['free'])}")
    print(f"constrained beside   tokens/s per stream: {rates(mixed['constrained'])}")
    print(f"free beside free     tokens/s per stream: {rates(mixed_baseline)}")
    ratio, beside = report["constrained_to_free_ratio"], report["free_beside_constrained_to_beside_free_ratio"]
    print(f"constrained / free (alone), median of rounds: {ratio:.2f}   (goal >= 0.7)")
    print(f"free beside constrained / free beside free, median of rounds: {beside:.2f}   (goal: ~1)")
    print("grammar compile (ms)                 cold p50  cold p99  cached p99")
    for name, c in report["compile"].items():
        if "refused" in c:
            print(f"  {name:34s} refused: {c['refused'][:70]}")
            continue
        print(f"  {name:34s} {c['cold_ms_p50']:8.2f}  {c['cold_ms_p99']:8.2f}  {c['cached_ms_p99']:8.3f}")
    worst = max(c["cold_ms_p99"] for c in report["compile"].values() if "refused" not in c)
    print(f"  p99 over the test constraints (worst case): {worst:.2f} ms")


if __name__ == "__main__":
    main()
