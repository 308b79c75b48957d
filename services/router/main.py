"""`meshserve serve-router`: the public GenerationService process."""

from __future__ import annotations

import argparse
import asyncio

from meshserve.v1 import generation_service_pb2 as pb
from meshserve.v1 import generation_service_pb2_grpc as pb_grpc
from services.common.config_flags import add_config_args, config_from_args
from services.common.server import ServerConfig, ServiceProcess, add_server_args
from services.router.config import RouterConfig
from services.router.core import Router
from services.router.servicer import GenerationServicer


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("serve-router", help="run the public router service")
    add_server_args(parser, port=50051, metrics_port=9101)
    add_config_args(parser, RouterConfig)
    parser.set_defaults(func=run)


async def serve(args: argparse.Namespace) -> None:
    config = config_from_args(RouterConfig, args)
    process = ServiceProcess("meshserve-router", ServerConfig.from_args(args))
    router = Router(config)
    servicer = GenerationServicer(router, config)
    pb_grpc.add_GenerationServiceServicer_to_server(servicer, process.server)
    process.add_service(pb.DESCRIPTOR.services_by_name["GenerationService"].full_name)

    async def warm_up() -> None:
        await router.connect()
        servicer.on_connected()

    async def on_drain() -> None:
        await asyncio.sleep(config.drain_notice_s)

    await process.run(warm_up, on_drain)
    await router.close()


def run(args: argparse.Namespace) -> int:
    asyncio.run(serve(args))
    return 0
