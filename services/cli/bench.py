"""`meshserve bench`: a load generator for the public `GenerationService/Generate` stream.

It keeps `--concurrency` streams open on ONE `grpc.aio` channel until `--requests` have been sent,
timing every stream on the client side:

- TTFT: from sending the request to the first chunk that carries at least one token id;
- ITL: the gap between two successive token-carrying chunks divided by the tokens in the later
  chunk, one value per token (so a chunk of 3 tokens after 30 ms counts as three 10 ms gaps);
- tokens: `completion_tokens` of the final `complete` message (errored streams count none).

`--json` prints the report as one object. The measuring lives in the services.bench package;
this module only parses the arguments.

    meshserve bench --concurrency 8 --requests 64 --max-tokens 128 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from services.bench.pool import positive_int
from services.bench.prompts import load_prompts


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `meshserve bench` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "bench",
        help="measure throughput, TTFT and inter-token latency of the public endpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", default="localhost:8080", help="public endpoint host:port (default %(default)s)")
    parser.add_argument(
        "--concurrency", type=positive_int, default=1, help="streams open at once (default %(default)s)"
    )
    parser.add_argument("--requests", type=positive_int, help="requests to send in all (default: 4 x concurrency)")
    parser.add_argument(
        "--max-tokens", type=positive_int, default=128, help="tokens to generate per request (default %(default)s)"
    )
    parser.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send each prompt as a user chat message (default); --no-chat sends it as a plain prompt",
    )
    parser.add_argument("--prompts", type=Path, help="file with one prompt per line (default: 16 built-in prompts)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default %(default)s)")
    parser.add_argument("--seed", type=int, help="sampling seed, for temperature > 0")
    parser.add_argument(
        "--warmup", type=int, default=0, help="requests sent before measuring, not reported (default 0)"
    )
    parser.add_argument("--timeout", type=float, help="per-request deadline in seconds")
    parser.add_argument(
        "--connect-timeout", type=float, default=10.0, help="seconds to wait for the endpoint (default %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.set_defaults(func=run_from_args)


def run_from_args(args: argparse.Namespace) -> int:
    """Runs `meshserve bench`; exits 0 when every request succeeded, 1 otherwise."""
    from services.bench.mesh import MeshBenchSettings, run_bench  # grpc and the stubs only when it runs
    from services.bench.report import format_table

    settings = MeshBenchSettings(
        target=args.target,
        requests=args.requests or 4 * args.concurrency,
        concurrency=args.concurrency,
        max_tokens=args.max_tokens,
        chat=args.chat,
        temperature=args.temperature,
        seed=args.seed,
        warmup=args.warmup,
        timeout_s=args.timeout,
        connect_timeout_s=args.connect_timeout,
    )
    try:
        prompts = load_prompts(args.prompts)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    try:
        report = asyncio.run(run_bench(settings, prompts, progress=not args.json))
    except TimeoutError:
        print(f"meshserve bench: {args.target} is not reachable (waited {args.connect_timeout:g}s)", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        print(format_table(report))
    return 0 if report["errors"] == 0 else 1
