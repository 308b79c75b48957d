"""`meshserve chat` and `meshserve generate`: stream a generation from the public endpoint."""

from __future__ import annotations

import argparse
import sys

import grpc

from meshserve.v1 import generation_service_pb2 as pb
from meshserve.v1 import generation_service_pb2_grpc as pb_grpc


def add_connection_args(parser) -> None:
    """--target, --ca and --token: how a command reaches the public endpoint."""
    parser.add_argument("--target", default="localhost:8080", help="public endpoint host:port")
    parser.add_argument("--ca", help="PEM CA bundle: connect with TLS (e.g. .run/mesh-8080/tls/ca.pem from --dev-tls)")
    parser.add_argument("--token", help="bearer token (see `meshserve mint-token`)")


def auth_metadata(args: argparse.Namespace) -> list[tuple[str, str]] | None:
    return [("authorization", f"Bearer {args.token}")] if args.token else None


def add_parsers(subparsers) -> None:
    chat = subparsers.add_parser("chat", help="ask the model as a chat assistant")
    chat.add_argument("message")
    chat.add_argument("--system", help="system prompt (default: the model's own)")
    generate = subparsers.add_parser("generate", help="continue a plain prompt")
    generate.add_argument("prompt")
    for parser in (chat, generate):
        add_connection_args(parser)
        parser.add_argument("--max-tokens", type=int, help="tokens to generate (server default 256)")
        parser.add_argument("--temperature", type=float, help="0 is greedy (server default 1)")
        parser.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1]")
        parser.add_argument("--seed", type=int, help="seed for reproducible sampling")
        parser.add_argument("--timeout", type=float, help="deadline in seconds")
        parser.add_argument("--priority", choices=["low", "normal", "high"], help="scheduling class")
        parser.set_defaults(func=run)


def build_request(args: argparse.Namespace) -> pb.GenerateRequest:
    sampling = pb.SamplingParameters()
    if args.max_tokens is not None:
        sampling.max_tokens = args.max_tokens
    if args.temperature is not None:
        sampling.temperature = args.temperature
    if args.top_p is not None:
        sampling.top_p = args.top_p
    if args.seed is not None:
        sampling.seed = args.seed
    priority = pb.Priority.Value(f"PRIORITY_{args.priority.upper()}") if args.priority else pb.PRIORITY_UNSPECIFIED
    if hasattr(args, "message"):
        messages = [pb.ChatMessage(role="system", content=args.system)] if args.system else []
        messages.append(pb.ChatMessage(role="user", content=args.message))
        return pb.GenerateRequest(chat=pb.ChatMessages(messages=messages), sampling=sampling, priority=priority)
    return pb.GenerateRequest(prompt=args.prompt, sampling=sampling, priority=priority)


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    if args.ca:
        with open(args.ca, "rb") as f:
            return grpc.secure_channel(args.target, grpc.ssl_channel_credentials(root_certificates=f.read()))
    return grpc.insecure_channel(args.target)


def run(args: argparse.Namespace) -> int:
    metadata = auth_metadata(args)
    with open_channel(args) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        try:
            for response in stub.Generate(build_request(args), timeout=args.timeout, metadata=metadata):
                if response.HasField("chunk"):
                    sys.stdout.write(response.chunk.text)
                    sys.stdout.flush()
                else:
                    c = response.complete
                    sys.stdout.write("\n")
                    print(
                        f"[{pb.FinishReason.Name(c.finish_reason).removeprefix('FINISH_REASON_').lower()}: "
                        f"{c.prompt_tokens} prompt + {c.completion_tokens} completion tokens]",
                        file=sys.stderr,
                    )
        except grpc.RpcError as error:
            print(f"\nerror: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    return 0
