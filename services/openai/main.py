"""`meshserve serve-openai`: the OpenAI-compatible HTTP service (uvicorn), a client of the routers."""

from __future__ import annotations

import argparse
import logging

from services.common.config_flags import add_config_args, config_from_args
from services.common.logs import setup_logging
from services.common.metrics import start_metrics_server
from services.common.server import ServerConfig, add_server_args
from services.common.telemetry import setup_tracing
from services.openai.config import OpenAIConfig

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("serve-openai", help="run the OpenAI-compatible HTTP API (a client of the routers)")
    add_server_args(
        parser,
        port=50054,
        metrics_port=9104,
        helps={"port": "HTTP port", "shutdown_grace_s": "drain time for in-flight requests"},
    )
    add_config_args(parser, OpenAIConfig)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from services.openai.app import create_app, server_options

    config = config_from_args(OpenAIConfig, args)
    server = ServerConfig.from_args(args)
    setup_logging("meshserve-openai")
    provider = setup_tracing("meshserve-openai")
    start_metrics_server(server.metrics_port, server.host)
    log.info(
        "meshserve-openai listening on %s:%d (metrics %d), routers %s",
        server.host,
        server.port,
        server.metrics_port,
        config.router_channel_target,
    )
    # uvicorn drains on SIGTERM/SIGINT: no new connections, in-flight requests get the grace period
    uvicorn.run(
        create_app(config),
        host=server.host,
        port=server.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(server.shutdown_grace_s),
        lifespan="on",
        **server_options(config),
    )
    provider.shutdown()
    return 0
