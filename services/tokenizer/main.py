"""`meshserve serve-tokenizer`: the tokenizer service process."""

from __future__ import annotations

import argparse
import asyncio

from meshserve.tokenizer.v1 import tokenizer_service_pb2 as pb
from meshserve.tokenizer.v1 import tokenizer_service_pb2_grpc as pb_grpc
from services.common.server import ServerConfig, ServiceProcess, add_server_args
from services.modelstore.layout import add_models_root_arg, find_model
from services.tokenizer.core import TokenizerCore
from services.tokenizer.servicer import TokenizerServicer


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("serve-tokenizer", help="run the tokenizer service")
    add_server_args(parser, port=50052, metrics_port=9102)
    add_models_root_arg(parser)
    parser.set_defaults(func=run)


async def serve(args: argparse.Namespace) -> None:
    process = ServiceProcess("meshserve-tokenizer", ServerConfig.from_args(args))
    # loading takes well under a second, so it happens before the port opens
    core = TokenizerCore(find_model(args.models_root))
    pb_grpc.add_TokenizerServiceServicer_to_server(TokenizerServicer(core), process.server)
    process.add_service(pb.DESCRIPTOR.services_by_name["TokenizerService"].full_name)
    await process.run()


def run(args: argparse.Namespace) -> int:
    asyncio.run(serve(args))
    return 0
