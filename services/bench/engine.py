"""Engine-only benchmark: the ONNX Runtime engine without gRPC, tokenizer service or Envoy.

It loads the prepared model, tokenizes the same built-in prompts as `meshserve bench` (chat
template by default), keeps `--concurrency` requests in the engine until `--requests` have
finished, and prints the same report (`services.bench.report.summarize`), so the mesh's overhead is
the difference between the two:

    python -m services.bench.engine --concurrency 4 --max-tokens 32 --json

Times are taken in the engine's output callback (on the engine thread), from `submit` to the
first tokens (TTFT) and between successive outputs (ITL, per token). One short warm-up wave runs
first and is not reported. Greedy decoding, so repeated runs generate the same tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import queue
import resource
import sys
import time
from pathlib import Path

from services.bench.pool import positive_int
from services.bench.prompts import load_prompts
from services.bench.report import RequestResult, format_table, summarize
from services.common.finish import FinishReason
from services.inference.engine import Engine, EngineConfig
from services.modelstore.prepare import DEFAULT_PRECISION, PRECISIONS, prepare_model


class _Tracker:
    """Collects one request's timings from the engine thread and signals when it ends."""

    def __init__(self, index: int, done: queue.SimpleQueue) -> None:
        self.index = index
        self.done = done
        self.started = 0.0
        self.last: float | None = None
        self.ttft: float | None = None
        self.itl: list[float] = []
        self.tokens = 0
        self.finish: FinishReason | None = None
        self.error: str | None = None
        self.finished_at = 0.0

    def on_output(self, output) -> None:  # engine thread: record and hand over, nothing slow
        now = time.perf_counter()
        n = len(output.token_ids)
        if n:
            if self.last is None:
                self.ttft = now - self.started
            else:
                self.itl.extend([(now - self.last) / n] * n)
            self.last = now
            self.tokens += n
        if output.finish_reason is not None:
            self.finish = output.finish_reason
            self.error = output.error
            self.finished_at = now
            self.done.put(self)

    def result(self, prompt_tokens: int) -> RequestResult:
        ok = self.finish is not None and self.finish.completes
        return RequestResult(
            ok=ok,
            code="OK" if ok else (self.finish.value if self.finish else "unknown").upper(),
            tokens=self.tokens if ok else 0,
            ttft_s=self.ttft,
            itl_s=self.itl,
            latency_s=self.finished_at - self.started,
            prompt_tokens=prompt_tokens if ok else 0,
        )


def encode_prompts(model, prompts: list[str], chat: bool) -> list[list[int]]:
    """Token ids of each prompt, rendered with the model's chat template when `chat`: the tokenizer
    service's own core, so the prompts match the mesh's."""
    from services.tokenizer.core import ChatMessage, TokenizerCore

    core = TokenizerCore(model)
    return [core.encode_chat([ChatMessage("user", p)]) if chat else core.encode_text(p) for p in prompts]


def run_requests(
    engine,
    encoded: list[list[int]],
    params,
    stop_ids: frozenset[int],
    concurrency: int,
    total: int,
    label: str = "bench",
) -> tuple[list[RequestResult], float]:
    """Keeps `concurrency` requests in the engine until `total` have finished; returns the
    results and the wall time."""
    done: queue.SimpleQueue[_Tracker] = queue.SimpleQueue()
    results: list[RequestResult] = []
    in_flight = 0
    sent = 0

    def send() -> None:
        nonlocal sent, in_flight
        prompt = encoded[sent % len(encoded)]
        tracker = _Tracker(sent, done)
        tracker.started = time.perf_counter()
        engine.submit(f"{label}-{sent}", prompt, params, stop_ids, tracker.on_output)
        sent += 1
        in_flight += 1

    started = time.perf_counter()
    while sent < min(concurrency, total):
        send()
    while in_flight:
        tracker = done.get()
        in_flight -= 1
        results.append(tracker.result(len(encoded[tracker.index % len(encoded)])))
        if sent < total:
            send()
    return results, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.bench.engine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--models-root", type=Path, default=Path("models"), help="prepared models (default %(default)s)"
    )
    parser.add_argument(
        "--precision", choices=PRECISIONS, default=DEFAULT_PRECISION, help="which prepared weights to run"
    )
    parser.add_argument(
        "--concurrency", type=positive_int, default=1, help="requests in the engine at once (default %(default)s)"
    )
    parser.add_argument("--requests", type=positive_int, help="requests in all (default: one per concurrent stream)")
    parser.add_argument(
        "--max-tokens", type=positive_int, default=128, help="tokens to generate per request (default %(default)s)"
    )
    parser.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="render prompts with the chat template (default); --no-chat encodes them as plain text",
    )
    parser.add_argument("--prompts", type=Path, help="file with one prompt per line (default: the built-in prompts)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: one per core)")
    parser.add_argument(
        "--num-slots", type=int, help="KV-cache slots (default: the engine default, or concurrency if larger)"
    )
    parser.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=EngineConfig.num_speculative_tokens,
        help="prompt-lookup drafts a row",
    )
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=EngineConfig.max_num_batched_tokens, help="tokens a mixed step"
    )
    parser.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run one short unreported wave first (default); --no-warmup measures a cold engine",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    total = args.requests or args.concurrency
    logging.basicConfig(level=logging.WARNING)
    try:
        prompts = load_prompts(args.prompts)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None

    from services.common.contract import SamplingParams
    from services.inference.backends.onnxruntime import OnnxRuntimeBackend

    model = prepare_model(args.models_root, args.precision)
    defaults = EngineConfig()
    config = dataclasses.replace(
        defaults,
        num_slots=args.num_slots or max(defaults.num_slots, args.concurrency),
        num_speculative_tokens=args.num_speculative_tokens,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    load_started = time.perf_counter()
    backend = OnnxRuntimeBackend(model, config.num_slots, config.max_context, intra_op_threads=args.threads)
    engine = Engine(backend, config)
    engine.start()
    load_s = time.perf_counter() - load_started
    try:
        encoded = encode_prompts(model, prompts, args.chat)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
        stop_ids = frozenset(model.eos_token_ids)
        # one short wave at the same concurrency, so the measured requests do not pay for lazy
        # initialisation (ONNX Runtime's first runs of a shape, first touches of KV-cache pages)
        if args.warmup:
            warm = dataclasses.replace(params, max_tokens=min(params.max_tokens, 8))
            run_requests(engine, encoded, warm, stop_ids, args.concurrency, args.concurrency, label="warmup")
        progress = not args.json
        if progress:
            print(f"running {total} requests, {args.concurrency} at a time ...", file=sys.stderr, flush=True)
        results, wall_s = run_requests(engine, encoded, params, stop_ids, args.concurrency, total)
    finally:
        engine.stop()

    report = summarize(results, wall_s)
    report.update(
        speculative_accepted=engine.speculative_accepted,
        speculative_rejected=engine.speculative_rejected,
        target="engine",
        model=model.path.name,
        backend=backend.name,
        concurrency=args.concurrency,
        max_tokens=args.max_tokens,
        temperature=0.0,
        input="chat" if args.chat else "prompt",
        num_prompts=len(encoded),
        num_slots=config.num_slots,
        threads=args.threads,
        load_s=round(load_s, 3),
        engine_steps=engine.steps,
        warmup=args.warmup,
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    )
    if args.json:
        print(json.dumps(report))
    else:
        print(format_table(report))
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
