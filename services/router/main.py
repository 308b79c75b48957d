"""`meshserve serve-router`: the public GenerationService process."""

from __future__ import annotations

import argparse
import asyncio

from meshserve.v1 import generation_service_pb2 as pb
from meshserve.v1 import generation_service_pb2_grpc as pb_grpc
from services.common.server import ServerConfig, ServiceProcess, add_server_args
from services.router.config import RouterConfig
from services.router.core import Router
from services.router.servicer import GenerationServicer


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("serve-router", help="run the public router service")
    add_server_args(parser, port=50051, metrics_port=9101)
    parser.add_argument("--tokenizer-target", default="127.0.0.1:50052", help="tokenizer service host:port")
    parser.add_argument(
        "--inference-target",
        action="append",
        dest="inference_targets",
        help="inference replica host:port (repeat for several)",
    )
    parser.add_argument(
        "--inference-discovery",
        choices=["static", "dns"],
        default=RouterConfig.inference_discovery,
        help="static: each --inference-target/--fallback-target is one replica; dns: each is a name whose every "
        "address is a replica, resolved again every few seconds (Swarm dnsrr services, headless Services)",
    )
    parser.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request leaves it unset")
    parser.add_argument(
        "--max-streams-per-tenant",
        type=int,
        default=RouterConfig.max_streams_per_tenant,
        help="concurrent streams per tenant on this router (0: no limit); unauthenticated traffic is one tenant",
    )
    parser.add_argument(
        "--max-stream-duration-s",
        type=float,
        default=RouterConfig.max_stream_duration_s,
        help="server-side limit on a stream's duration (DEADLINE_EXCEEDED past it)",
    )
    parser.add_argument(
        "--fallback-target",
        action="append",
        dest="fallback_targets",
        default=[],
        help="inference replica of the lighter fallback tier, host:port (repeat for several)",
    )
    parser.add_argument(
        "--shed-utilisation",
        type=float,
        default=RouterConfig.shed_utilisation,
        help="main-tier utilisation above which LOW requests are shed (after --shed-low-after-s)",
    )
    parser.add_argument(
        "--shed-low-after-s",
        type=float,
        default=RouterConfig.shed_low_after_s,
        help="seconds of sustained utilisation above --shed-utilisation before LOW is shed (0: never)",
    )
    parser.add_argument(
        "--result-cache-mb",
        type=float,
        default=RouterConfig.result_cache_mb,
        help="memory tier of the result cache for deterministic requests, in MiB (0: off)",
    )
    parser.add_argument(
        "--result-cache-redis", metavar="URL", help="shared tier of the result cache, e.g. redis://127.0.0.1:6379/0"
    )
    parser.add_argument(
        "--result-cache-ttl-s",
        type=int,
        default=RouterConfig.result_cache_ttl_s,
        help="seconds the shared tier keeps an answer",
    )
    parser.add_argument(
        "--drain-notice-s",
        type=float,
        default=2.0,
        help="after SIGTERM, keep accepting this long while Envoy's health checks notice NOT_SERVING",
    )
    parser.set_defaults(func=run)


async def serve(args: argparse.Namespace) -> None:
    config = RouterConfig(
        tokenizer_target=args.tokenizer_target,
        inference_targets=tuple(args.inference_targets or ["127.0.0.1:50053"]),
        inference_discovery=args.inference_discovery,
        default_max_tokens=args.default_max_tokens,
        max_streams_per_tenant=args.max_streams_per_tenant,
        max_stream_duration_s=args.max_stream_duration_s,
        fallback_targets=tuple(args.fallback_targets),
        shed_utilisation=args.shed_utilisation,
        shed_low_after_s=args.shed_low_after_s,
        result_cache_mb=args.result_cache_mb,
        result_cache_redis=args.result_cache_redis,
        result_cache_ttl_s=args.result_cache_ttl_s,
    )
    process = ServiceProcess("meshserve-router", ServerConfig.from_args(args))
    router = Router(config)
    servicer = GenerationServicer(router, config)
    pb_grpc.add_GenerationServiceServicer_to_server(servicer, process.server)
    process.add_service(pb.DESCRIPTOR.services_by_name["GenerationService"].full_name)

    async def warm_up() -> None:
        await router.connect()
        servicer.on_connected()

    async def on_drain() -> None:
        await asyncio.sleep(args.drain_notice_s)

    await process.run(warm_up, on_drain)
    await router.close()


def run(args: argparse.Namespace) -> int:
    asyncio.run(serve(args))
    return 0
