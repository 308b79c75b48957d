"""Time to first chunk of an answer generated vs. replayed from the result cache, through a running mesh.

    python bench/result_cache_ttft.py [--target localhost:8080] [--rounds 5] [--json]

Each round asks a new greedy question twice: the first is generated (a miss), the second replayed from the
router's result cache (a hit): run it against one router, or routers sharing Redis (each router's memory
tier is its own, and Envoy spreads the two calls). Prints both times per round and their medians; the test of the cache
(tests/e2e/test_result_cache.py) asserts the replay's content, this measures its speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid

import grpc

from meshserve.v1 import generation_service_pb2 as pb
from meshserve.v1 import generation_service_pb2_grpc as pb_grpc


def first_chunk_s(stub: pb_grpc.GenerationServiceStub, request: pb.GenerateRequest) -> tuple[float, bool]:
    """Seconds to the first response, and whether the answer came from the cache."""
    started = time.monotonic()
    call = stub.Generate(request, timeout=120)
    responses = [next(call)]
    first = time.monotonic() - started
    responses += list(call)
    return first, responses[-1].complete.cached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="localhost:8080")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rounds = []
    with grpc.insecure_channel(args.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        for _ in range(args.rounds):
            # a question no earlier run asked, so the first call is a miss
            text = f"What is the capital of France? (ref {uuid.uuid4().hex[:8]})"
            request = pb.GenerateRequest(
                chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=text)]),
                sampling=pb.SamplingParameters(max_tokens=args.max_tokens, temperature=0.0),
            )
            generated, generated_cached = first_chunk_s(stub, request)
            replayed, replayed_cached = first_chunk_s(stub, request)
            assert not generated_cached and replayed_cached, "the mesh's result cache is off or did not hold it"
            rounds.append({"generated_ms": generated * 1000, "cached_ms": replayed * 1000})
    report = {
        "rounds": rounds,
        "generated_ms_p50": statistics.median(r["generated_ms"] for r in rounds),
        "cached_ms_p50": statistics.median(r["cached_ms"] for r in rounds),
    }
    if args.json:
        print(json.dumps(report))
        return
    for r in rounds:
        print(f"TTFT generated {r['generated_ms']:.1f} ms, from the cache {r['cached_ms']:.1f} ms")
    print(f"median: generated {report['generated_ms_p50']:.1f} ms, from the cache {report['cached_ms_p50']:.1f} ms")


if __name__ == "__main__":
    main()
