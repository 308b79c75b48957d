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

from services.bench.prompts import load_prompts
from services.bench.settings import MeshBenchSettings
from services.common.config_flags import add_config_args, config_from_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `meshserve bench` on an argparse subparsers object; its settings' flags come from
    MeshBenchSettings."""
    parser = subparsers.add_parser(
        "bench",
        help="measure throughput, TTFT and inter-token latency of the public endpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(parser, MeshBenchSettings)
    parser.add_argument("--prompts", type=Path, help="file with one prompt per line (default: 16 built-in prompts)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.set_defaults(func=run_from_args)


def run_from_args(args: argparse.Namespace) -> int:
    """Runs `meshserve bench`; exits 0 when every request succeeded, 1 otherwise."""
    from services.bench.mesh import run_bench  # grpc and the stubs only when it runs
    from services.bench.report import format_table

    settings = config_from_args(MeshBenchSettings, args)
    try:
        prompts = load_prompts(args.prompts)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    try:
        report = asyncio.run(run_bench(settings, prompts, progress=not args.json))
    except TimeoutError:
        waited = f"waited {settings.connect_timeout_s:g}s"
        print(f"meshserve bench: {settings.target} is not reachable ({waited})", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        print(format_table(report))
    return 0 if report["errors"] == 0 else 1
