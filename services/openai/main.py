"""`meshserve serve-openai`: the OpenAI-compatible HTTP service (uvicorn), a client of the routers."""

from __future__ import annotations

import argparse
import logging

from services.common.logs import setup_logging
from services.common.metrics import start_metrics_server
from services.common.telemetry import setup_tracing
from services.openai.config import OpenAIConfig

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("serve-openai", help="run the OpenAI-compatible HTTP API (a client of the routers)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 in containers)")
    parser.add_argument("--port", type=int, default=50054, help="HTTP port")
    parser.add_argument("--metrics-port", type=int, default=9104, help="Prometheus /metrics port (0: off)")
    parser.add_argument("--shutdown-grace-s", type=float, default=30.0, help="drain time for in-flight requests")
    parser.add_argument(
        "--router-target",
        action="append",
        dest="router_targets",
        help="router host:port (repeat for several, IP:port each; or one dns:///NAME:PORT); default 127.0.0.1:50051",
    )
    parser.add_argument(
        "--tokenizer-target",
        help="tokenizer host:port, asked for the text of tokens in logprobs (without it they read token_id:N)",
    )
    parser.add_argument("--max-choices", type=int, default=16, help="generations per request (n x prompts) at most")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from services.openai.app import create_app

    try:
        config = OpenAIConfig(
            tuple(args.router_targets or ["127.0.0.1:50051"]),
            args.tokenizer_target,
            args.max_choices,
            args.shutdown_grace_s,
        )
    except ValueError as error:
        raise SystemExit(f"serve-openai: {error}") from None
    setup_logging("meshserve-openai")
    provider = setup_tracing("meshserve-openai")
    start_metrics_server(args.metrics_port, args.host)
    log.info(
        "meshserve-openai listening on %s:%d (metrics %d), routers %s",
        args.host,
        args.port,
        args.metrics_port,
        config.router_channel_target,
    )
    # uvicorn drains on SIGTERM/SIGINT: no new connections, in-flight requests get the grace period
    uvicorn.run(
        create_app(config),
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(args.shutdown_grace_s),
        lifespan="on",
    )
    provider.shutdown()
    return 0
