"""`meshserve serve-router`: the public GenerationService process."""

from __future__ import annotations

import argparse
import asyncio

import grpc
from grpc_reflection.v1alpha import reflection

from meshserve.admin.v1 import rollout_service_pb2 as admin_pb
from meshserve.admin.v1 import rollout_service_pb2_grpc as admin_grpc
from meshserve.v1 import generation_service_pb2 as pb
from meshserve.v1 import generation_service_pb2_grpc as pb_grpc
from services.common.config_flags import add_config_args, config_from_args
from services.common.server import ServerConfig, ServiceProcess, add_server_args
from services.router.admin import RolloutServicer
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

    admin = await start_admin_server(router, config)
    await process.run(warm_up, on_drain)
    if admin is not None:
        await admin.stop(0)
    await router.close()


async def start_admin_server(router: Router, config: RouterConfig) -> grpc.aio.Server | None:
    """The RolloutService on its own port (--admin-port on --admin-host), apart from the public API so that
    Envoy, which routes only the public port, never exposes it; None without --admin-port."""
    if not config.admin_port:
        return None
    server = grpc.aio.server()
    admin_grpc.add_RolloutServiceServicer_to_server(RolloutServicer(router), server)
    name = admin_pb.DESCRIPTOR.services_by_name["RolloutService"].full_name
    reflection.enable_server_reflection([name, reflection.SERVICE_NAME], server)
    try:
        server.add_insecure_port(f"{config.admin_host}:{config.admin_port}")
    except RuntimeError as error:
        raise SystemExit(
            f"meshserve serve-router: cannot listen on --admin-port {config.admin_port}: {error}"
        ) from None
    await server.start()
    return server


def run(args: argparse.Namespace) -> int:
    asyncio.run(serve(args))
    return 0
