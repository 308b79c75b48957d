"""`meshserve perplexity`: a model's perplexity on a text, measured through the public API.

The text is split at paragraph boundaries into windows of at most `--max-chars` characters (each
must fit the model's context); every window is one Generate request with `prompt_logprobs`, and
the perplexity is exp of the mean negative log-probability of every window's tokens after its
first. The same windows, scored by a backend directly (services/inference/evaluate.py), give
the number to compare with: see tests/e2e/test_quality.py.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

DEFAULT_MAX_CHARS = 4000


def windows(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> list[str]:
    """Consecutive runs of whole paragraphs of at most `max_chars` characters (a longer paragraph
    is a window of its own)."""
    out: list[str] = []
    for paragraph in (p.strip() for p in text.split("\n\n")):
        if not paragraph:
            continue
        if out and len(out[-1]) + 2 + len(paragraph) <= max_chars:
            out[-1] += "\n\n" + paragraph
        else:
            out.append(paragraph)
    return out


def prompt_log_probs(channel, texts: list[str], timeout: float = 300.0, metadata=None) -> list[list[float]]:
    """log p(token i | tokens before it) for i >= 1 of every text, as the service computes them."""
    from meshserve.v1 import generation_service_pb2 as pb
    from meshserve.v1 import generation_service_pb2_grpc as pb_grpc

    stub = pb_grpc.GenerationServiceStub(channel)
    out = []
    for text in texts:
        request = pb.GenerateRequest(
            prompt=text, no_cache=True, sampling=pb.SamplingParameters(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        )
        complete = [
            r.complete for r in stub.Generate(request, timeout=timeout, metadata=metadata) if r.HasField("complete")
        ][-1]
        out.append([entry.logprob for entry in complete.prompt_logprobs])
    return out


def perplexity_of(log_probs: list[list[float]]) -> float:
    flat = [lp for window in log_probs for lp in window]
    return math.exp(-sum(flat) / len(flat))


def add_parser(subparsers) -> None:
    from services.cli.client import add_connection_args, auth_metadata, open_channel

    parser = subparsers.add_parser("perplexity", help="perplexity of the served model on a text, through the API")
    parser.add_argument(
        "file", type=Path, help="UTF-8 text, paragraphs separated by blank lines (e.g. tests/data/perplexity_text.txt)"
    )
    add_connection_args(parser)
    parser.add_argument(
        "--max-chars", type=int, default=DEFAULT_MAX_CHARS, help="characters per request (default %(default)s)"
    )

    def run(args: argparse.Namespace) -> int:
        import grpc

        texts = windows(args.file.read_text(encoding="utf-8"), args.max_chars)
        try:
            with open_channel(args) as channel:
                log_probs = prompt_log_probs(channel, texts, metadata=auth_metadata(args))
        except grpc.RpcError as error:
            print(f"meshserve perplexity: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
        print(
            json.dumps(
                {
                    "windows": len(texts),
                    "tokens": sum(len(w) for w in log_probs),
                    "perplexity": round(perplexity_of(log_probs), 4),
                }
            )
        )
        return 0

    parser.set_defaults(func=run)
