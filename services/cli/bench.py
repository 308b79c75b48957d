"""`meshserve bench`: a load generator for the public `GenerationService/Generate` stream.

It keeps `--concurrency` streams open on ONE `grpc.aio` channel until `--requests` have been sent,
timing every stream on the client side:

- TTFT: from sending the request to the first chunk that carries at least one token id;
- ITL: the gap between two successive token-carrying chunks divided by the tokens in the later
  chunk, one value per token (so a chunk of 3 tokens after 30 ms counts as three 10 ms gaps);
- tokens: `completion_tokens` of the final `complete` message (errored streams count none).

`summarize` turns the per-request results into the report (`--json` prints it as one object),
and is pure so it can be tested without gRPC. The client is deliberately light (async, no
per-token printing, a progress line at most ten times a second) because on a small machine it
shares the cores with the server it measures.

    meshserve bench --concurrency 8 --requests 64 --max-tokens 128 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Sequence

# Short, varied English prompts shared by the mesh bench, the engine bench and the llama.cpp peer
# (bench/llamacpp_peer.py), so all three measure the same work.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Write a haiku about the ocean.",
    "Explain photosynthesis in simple terms.",
    "Give me three tips for staying focused while studying.",
    "What is the difference between a list and a tuple in Python?",
    "Tell me a short story about a robot who learns to paint.",
    "How do vaccines work?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What are the health benefits of drinking water?",
    "Describe a sunset to someone who has never seen one.",
    "Why is the sky blue?",
    "Suggest a name for a friendly golden retriever.",
    "How does a bicycle stay upright?",
    "List five fruits that are high in vitamin C.",
    "What should I pack for a weekend camping trip?",
    "Explain what a black hole is.",
)

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    """What the client observed for one request. Times are in seconds."""

    ok: bool
    """True when the stream ended with a `complete` message and status OK."""
    code: str = "OK"
    """gRPC status name (`RESOURCE_EXHAUSTED`, ...) when the request failed."""
    tokens: int = 0
    """Generated tokens reported by the `complete` message (0 when the request failed)."""
    ttft_s: float | None = None
    """Time from sending to the first token-carrying chunk; None if no token arrived."""
    itl_s: list[float] = field(default_factory=list)
    """Per-token inter-token latencies, one value per token after the first chunk."""
    latency_s: float = 0.0
    """Time from sending to the end of the stream."""
    prompt_tokens: int = 0
    """Prompt tokens reported by the `complete` message."""


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between order statistics
    (numpy's default method); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _distribution_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    stats: dict[str, float | None] = {f"p{q}": _ms(percentile(values_s, q)) for q in PERCENTILES}
    stats["mean"] = _ms(sum(values_s) / len(values_s)) if values_s else None
    return stats


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def summarize(results: list[RequestResult], wall_s: float) -> dict:
    """Aggregates per-request results of one run lasting `wall_s` seconds into the report.

    Latency distributions (TTFT, ITL, end-to-end) cover successful requests only; ITL pools the
    per-token values of all of them. `tokens_per_s` is generated tokens over the wall time, so
    it is the aggregate throughput of all streams together.
    """
    ok = [r for r in results if r.ok]
    errors_by_code = dict(sorted(Counter(r.code for r in results if not r.ok).items()))
    tokens = sum(r.tokens for r in ok)
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    itl = [x for r in ok for x in r.itl_s]
    # the decode speed one stream sees: tokens after the first over the time they took
    per_stream = [
        (r.tokens - 1) / (r.latency_s - r.ttft_s)
        for r in ok
        if r.ttft_s is not None and r.tokens > 1 and r.latency_s > r.ttft_s
    ]
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "errors_by_code": errors_by_code,
        "tokens": tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "wall_s": round(wall_s, 4),
        "tokens_per_s": round(tokens / wall_s, 3) if wall_s > 0 else None,
        "ttft_ms": _distribution_ms(ttft),
        "itl_ms": _distribution_ms(itl),
        "e2e_ms": _distribution_ms([r.latency_s for r in ok]),
        "per_stream_tokens_per_s_p50": round(percentile(per_stream, 50), 3) if per_stream else None,
    }


def load_prompts(path: Path | None) -> list[str]:
    """One prompt per non-blank line of `path`, or the built-in prompts."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise SystemExit(f"{path} holds no prompts")
    return prompts


def format_table(report: dict) -> str:
    """The human-readable form of a `summarize` report."""

    def num(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        f"requests        {report['requests']} ({report['ok']} ok, {report['errors']} errors)",
    ]
    if report["errors_by_code"]:
        lines.append("errors by code  " + ", ".join(f"{k}={v}" for k, v in report["errors_by_code"].items()))
    lines += [
        f"concurrency     {report.get('concurrency', '-')}",
        f"max tokens      {report.get('max_tokens', '-')}",
        f"tokens          {report['tokens']} generated, {report['prompt_tokens']} prompt",
        f"wall time       {num(report['wall_s'], 2)} s",
        f"throughput      {num(report['tokens_per_s'])} tok/s aggregate, "
        f"{num(report['per_stream_tokens_per_s_p50'])} tok/s per stream (p50)",
        "",
        f"{'latency (ms)':<14}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}",
    ]
    for label, key in (("TTFT", "ttft_ms"), ("ITL", "itl_ms"), ("end-to-end", "e2e_ms")):
        stats = report[key]
        lines.append(f"{label:<14}" + "".join(f"{num(stats[k]):>10}" for k in ("p50", "p90", "p99", "mean")))
    return "\n".join(lines)


class _Progress:
    """A carriage-return progress line on stderr, redrawn at most ten times a second."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.done = 0
        self.errors = 0
        self.tokens = 0
        self.started = time.perf_counter()
        self._drawn = 0.0

    def update(self, result: RequestResult) -> None:
        self.done += 1
        self.errors += not result.ok
        self.tokens += result.tokens
        now = time.perf_counter()
        if self.enabled and (now - self._drawn >= 0.1 or self.done == self.total):
            self._drawn = now
            width = 30
            filled = width * self.done // max(self.total, 1)
            rate = self.tokens / max(now - self.started, 1e-9)
            sys.stderr.write(
                f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} requests, "
                f"{self.errors} errors, {rate:.1f} tok/s "
            )
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def build_request(pb, prompt: str, args: argparse.Namespace, request_id: str):
    sampling = pb.SamplingParameters(max_tokens=args.max_tokens, temperature=args.temperature)
    if args.seed is not None:
        sampling.seed = args.seed
    if args.chat:
        chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=prompt)])
        return pb.GenerateRequest(chat=chat, sampling=sampling, request_id=request_id)
    return pb.GenerateRequest(prompt=prompt, sampling=sampling, request_id=request_id)


async def _one_request(stub, request, timeout: float | None) -> RequestResult:
    import grpc

    started = time.perf_counter()
    last: float | None = None
    ttft: float | None = None
    itl: list[float] = []
    try:
        call = stub.Generate(request, timeout=timeout)
        async for response in call:
            if response.HasField("chunk"):
                n = len(response.chunk.token_ids)
                if not n:
                    continue
                now = time.perf_counter()
                if last is None:
                    ttft = now - started
                else:
                    itl.extend([(now - last) / n] * n)
                last = now
            else:
                complete = response.complete
                # keep reading so a status after `complete` is still seen
                async for _ in call:
                    pass
                return RequestResult(
                    ok=True,
                    tokens=complete.completion_tokens,
                    ttft_s=ttft,
                    itl_s=itl,
                    latency_s=time.perf_counter() - started,
                    prompt_tokens=complete.prompt_tokens,
                )
        code = "NO_COMPLETE"  # the stream ended OK but without its final message
    except grpc.aio.AioRpcError as exc:
        code = exc.code().name
    except Exception as exc:  # noqa: BLE001 - a client-side failure is a result, not a crash
        code = type(exc).__name__
    return RequestResult(ok=False, code=code, ttft_s=ttft, itl_s=itl, latency_s=time.perf_counter() - started)


async def run_pool(
    total: int, concurrency: int, warmup: int, one: Callable[[int], Awaitable[RequestResult]],
    on_result: Callable[[RequestResult], None] = lambda result: None,
) -> tuple[list[RequestResult], float]:
    """`warmup` requests one at a time (left out), then `total` requests, at most `concurrency` at
    once; `one(i)` sends request i (i < 0 for warm-ups). Returns the results and the wall time."""
    for i in range(warmup):
        await one(-1 - i)
    results: list[RequestResult] = []
    indices = iter(range(total))

    async def worker() -> None:
        for i in indices:
            results.append(await one(i))
            on_result(results[-1])

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, total))))
    return results, time.perf_counter() - started


async def run_bench(args: argparse.Namespace, prompts: list[str], progress: bool) -> dict:
    """Runs the benchmark and returns the `summarize` report plus the run's settings."""
    import grpc
    from meshserve.v1 import generation_service_pb2 as pb
    from meshserve.v1 import generation_service_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        await asyncio.wait_for(channel.channel_ready(), timeout=args.connect_timeout)

        def one(i: int) -> Awaitable[RequestResult]:
            name = f"bench-{i}" if i >= 0 else f"bench-warmup-{-1 - i}"
            return _one_request(stub, build_request(pb, prompts[i % len(prompts)], args, name), args.timeout)

        bar = _Progress(args.requests, progress)
        results, wall_s = await run_pool(args.requests, args.concurrency, args.warmup, one, bar.update)
        bar.close()

    report = summarize(results, wall_s)
    report.update(
        target=args.target,
        concurrency=args.concurrency,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        input="chat" if args.chat else "prompt",
        num_prompts=len(prompts),
        warmup=args.warmup,
    )
    return report


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return number


def add_parser(subparsers) -> None:
    """Registers `meshserve bench` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "bench",
        help="measure throughput, TTFT and inter-token latency of the public endpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", default="localhost:8080", help="public endpoint host:port (default %(default)s)")
    parser.add_argument("--concurrency", type=positive_int, default=1, help="streams open at once (default %(default)s)")
    parser.add_argument("--requests", type=positive_int, help="requests to send in all (default: 4 x concurrency)")
    parser.add_argument("--max-tokens", type=positive_int, default=128, help="tokens to generate per request (default %(default)s)")
    parser.add_argument(
        "--chat", action=argparse.BooleanOptionalAction, default=True,
        help="send each prompt as a user chat message (default); --no-chat sends it as a plain prompt",
    )
    parser.add_argument("--prompts", type=Path, help="file with one prompt per line (default: 16 built-in prompts)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default %(default)s)")
    parser.add_argument("--seed", type=int, help="sampling seed, for temperature > 0")
    parser.add_argument("--warmup", type=int, default=0, help="requests sent before measuring, not reported (default 0)")
    parser.add_argument("--timeout", type=float, help="per-request deadline in seconds")
    parser.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for the endpoint (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.set_defaults(func=run_from_args)


def run_from_args(args: argparse.Namespace) -> int:
    """Runs `meshserve bench`; exits 0 when every request succeeded, 1 otherwise."""
    if args.requests is None:
        args.requests = 4 * args.concurrency
    prompts = load_prompts(args.prompts)
    try:
        report = asyncio.run(run_bench(args, prompts, progress=not args.json))
    except asyncio.TimeoutError:
        print(f"meshserve bench: {args.target} is not reachable (waited {args.connect_timeout:g}s)", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        print(format_table(report))
    return 0 if report["errors"] == 0 else 1
