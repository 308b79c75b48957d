"""Keeping a number of requests in flight until all are done, and showing how far it got."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable

from services.bench.report import RequestResult


async def run_pool(
    total: int,
    concurrency: int,
    warmup: int,
    one: Callable[[int], Awaitable[RequestResult]],
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


class Progress:
    """A carriage-return progress line on stderr, redrawn at most ten times a second (the client
    shares the cores with the server it measures, so it must stay light)."""

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


def positive_int(value: str) -> int:
    """An argparse type for counts of requests, streams and tokens."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return number
