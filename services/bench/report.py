"""What a benchmark run measured: one `RequestResult` per request, `summarize` into the report
(a JSON-serialisable dict), `format_table` for people.

Definitions every benchmark follows, so their reports compare:

- TTFT: from sending the request to the first output that carries at least one token;
- ITL: the gap between two successive token-carrying outputs divided by the tokens in the later
  one, one value per token (so a chunk of 3 tokens after 30 ms counts as three 10 ms gaps);
- tokens: the completion tokens of a successful request (failed requests count none).

Pure functions: tested without gRPC or a model (tests/unit/test_bench_summary.py).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

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


def summarize(results: list[RequestResult], wall_s: float) -> dict[str, Any]:
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
    per_stream_p50 = percentile(per_stream, 50)
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
        "per_stream_tokens_per_s_p50": round(per_stream_p50, 3) if per_stream_p50 is not None else None,
    }


def format_table(report: dict[str, Any]) -> str:
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
