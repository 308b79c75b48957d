"""Overload through a running mesh: how fast refusals come and what accepted requests' TTFT does.

    meshserve up --inference-replicas 2 --router-replicas 2 --inference-arg=--num-slots=4 \
        --inference-arg=--max-waiting=0 --port 8080
    python bench/overload.py [--target localhost:8080] [--slots 8] [--seconds 5] [--json]

The same short chat requests one at a time, then from closed-loop clients filling NORMAL's share of the
slots for 3 s, then offered open-loop for `--seconds` at 3x the rate the slots serve unloaded
(services/bench/overload.py). Prints refusal latency and TTFT percentiles of each phase; the behaviour
(refused with RESOURCE_EXHAUSTED and RetryInfo, at once) is tests/e2e/test_resilience.py's to assert.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from services.bench.overload import Timed, overload


def percentile_ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def ttft(results: list[Timed]) -> dict[str, float | None]:
    firsts = [r.first_s for r in results if r.code == "OK" and r.first_s is not None]
    return {"p50_ms": percentile_ms(firsts, 0.5), "p99_ms": percentile_ms(firsts, 0.99), "ok": len(firsts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="localhost:8080")
    parser.add_argument("--slots", type=int, default=8, help="running slots of the whole main tier")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(overload(args.target, args.slots, args.seconds))
    refused = [r.took_s for r in result.offered if r.code != "OK"]
    report = {
        "offered": len(result.offered),
        "rate_per_s": result.rate,
        "accepted": len(result.offered) - len(refused),
        "refused": len(refused),
        "refusal_ms": {q: percentile_ms(refused, v) for q, v in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))},
        "ttft_unloaded": ttft(result.unloaded),
        "ttft_at_capacity": ttft(result.at_capacity),
        "at_capacity_requests": len(result.at_capacity),
        "ttft_overloaded": ttft(result.offered),
    }
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
