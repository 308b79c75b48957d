"""How much a long prompt arriving disturbs running streams (mixed prefill/decode steps), engine only.

    python bench/long_prompt_itl.py [--streams 16] [--prompt-tokens 1500] [--max-num-batched-tokens N] [--json]

Starts `--streams` greedy generations, lets them reach steady decoding, then submits one prompt
of `--prompt-tokens` tokens and reports the running streams' inter-token latency in the 3 s before and
while it is prefilled (and the ratio of the p99s), plus the long prompt's own time to first token.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np

from services.common.contract import SamplingParams
from services.inference.backends.onnxruntime import OnnxRuntimeBackend
from services.inference.engine import Engine, EngineConfig
from services.modelstore.layout import add_models_root_arg
from services.modelstore.prepare import prepare_model
from services.tokenizer.core import TokenizerCore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--max-prefill-tokens", type=int, default=EngineConfig().max_prefill_tokens)
    parser.add_argument("--max-num-batched-tokens", type=int, default=EngineConfig().max_num_batched_tokens)
    parser.add_argument("--precision", default=None, help="a prepared precision (default: meshserve's default)")
    add_models_root_arg(parser)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    model = prepare_model(args.models_root, *([args.precision] if args.precision else []))
    tokenizer = TokenizerCore(model)
    config = EngineConfig(
        num_slots=args.streams + 1,
        max_context=2048,
        max_new_tokens=1024,
        max_prefill_tokens=args.max_prefill_tokens,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    engine = Engine(OnnxRuntimeBackend(model, config.num_slots, config.max_context), config)
    engine.start()
    times: dict[str, list[float]] = {f"s{i}": [] for i in range(args.streams)}
    long_first = threading.Event()

    def recorder(name: str):
        return lambda out: times[name].extend([time.monotonic()] * len(out.token_ids))

    for name in times:
        engine.submit(
            name,
            tokenizer.encode_text(f"Story number {name}: once upon a time"),
            SamplingParams(max_tokens=1000, temperature=0.0),
            frozenset(),
            recorder(name),
        )
    while min(len(t) for t in times.values()) < 20:
        time.sleep(0.01)
    text = " ".join(f"word{i}" for i in range(args.prompt_tokens))
    long_ids = tokenizer.encode_text(text)[: args.prompt_tokens]
    submitted = time.monotonic()
    engine.submit(
        "long", long_ids, SamplingParams(max_tokens=1, temperature=0.0), frozenset(), lambda out: long_first.set()
    )
    long_first.wait(300)
    ttft = time.monotonic() - submitted
    time.sleep(0.5)
    for name in times:
        engine.abort(name)
    engine.stop()

    def gaps(lo: float, hi: float) -> np.ndarray:
        return np.concatenate([np.diff([t for t in ts if lo <= t <= hi]) for ts in times.values()]) * 1000

    before = gaps(submitted - 3.0, submitted)
    during = gaps(submitted, submitted + ttft)
    result = {
        "streams": args.streams,
        "prompt_tokens": len(long_ids),
        "precision": model.manifest["precision"],
        "max_prefill_tokens": args.max_prefill_tokens,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "long_prompt_ttft_ms": round(ttft * 1000, 1),
        "itl_ms_before": {
            "p50": round(float(np.percentile(before, 50)), 1),
            "p99": round(float(np.percentile(before, 99)), 1),
        },
        "itl_ms_during": {
            "p50": round(float(np.percentile(during, 50)), 1),
            "p99": round(float(np.percentile(during, 99)), 1),
            "max": round(float(during.max()), 1),
        },
        "itl_p99_during_over_before": round(float(np.percentile(during, 99) / np.percentile(before, 99)), 2),
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
