"""The load generator of `meshserve bench`: the public `GenerationService/Generate` stream.

It keeps `concurrency` streams open on ONE `grpc.aio` channel until `requests` have been sent,
timing every stream on the client side as report.py defines (TTFT, ITL per token, tokens of the
final `complete` message). The client is deliberately light (async, no per-token printing, a
progress line at most ten times a second) because on a small machine it shares the cores with the
server it measures.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any

import grpc

from meshserve.v1 import generation_service_pb2 as pb
from meshserve.v1 import generation_service_pb2_grpc as pb_grpc
from services.bench.pool import Progress, run_pool
from services.bench.report import RequestResult, summarize
from services.bench.settings import MeshBenchSettings


def build_request(prompt: str, settings: MeshBenchSettings, request_id: str) -> pb.GenerateRequest:
    sampling = pb.SamplingParameters(max_tokens=settings.max_tokens, temperature=settings.temperature)
    if settings.seed is not None:
        sampling.seed = settings.seed
    if settings.chat:
        chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=prompt)])
        return pb.GenerateRequest(chat=chat, sampling=sampling, request_id=request_id, no_cache=True)
    return pb.GenerateRequest(prompt=prompt, sampling=sampling, request_id=request_id, no_cache=True)


async def one_request(
    stub: pb_grpc.GenerationServiceStub, request: pb.GenerateRequest, timeout: float | None
) -> RequestResult:
    """Sends one request and times its stream; a failure is a result, never an exception."""
    started = time.perf_counter()
    last: float | None = None
    ttft: float | None = None
    itl: list[float] = []
    try:
        call = stub.Generate(request, timeout=timeout)
        async for response in call:
            if response.HasField("chunk"):
                n = len(response.chunk.token_ids)
                if not n:
                    continue
                now = time.perf_counter()
                if last is None:
                    ttft = now - started
                else:
                    itl.extend([(now - last) / n] * n)
                last = now
            else:
                complete = response.complete
                # keep reading so a status after `complete` is still seen
                async for _ in call:
                    pass
                return RequestResult(
                    ok=True,
                    tokens=complete.completion_tokens,
                    ttft_s=ttft,
                    itl_s=itl,
                    latency_s=time.perf_counter() - started,
                    prompt_tokens=complete.prompt_tokens,
                )
        code = "NO_COMPLETE"  # the stream ended OK but without its final message
    except grpc.aio.AioRpcError as exc:
        code = exc.code().name
    except Exception as exc:
        code = type(exc).__name__
    return RequestResult(ok=False, code=code, ttft_s=ttft, itl_s=itl, latency_s=time.perf_counter() - started)


async def run_bench(settings: MeshBenchSettings, prompts: list[str], progress: bool) -> dict[str, Any]:
    """Runs the benchmark and returns the `summarize` report plus the run's settings.

    Raises asyncio.TimeoutError when the endpoint is not reachable within `connect_timeout_s`."""
    async with grpc.aio.insecure_channel(settings.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        await asyncio.wait_for(channel.channel_ready(), timeout=settings.connect_timeout_s)

        def one(i: int) -> Awaitable[RequestResult]:
            name = f"bench-{i}" if i >= 0 else f"bench-warmup-{-1 - i}"
            return one_request(stub, build_request(prompts[i % len(prompts)], settings, name), settings.timeout_s)

        bar = Progress(settings.total_requests, progress)
        results, wall_s = await run_pool(
            settings.total_requests, settings.concurrency, settings.warmup, one, bar.update
        )
        bar.close()

    report = summarize(results, wall_s)
    report.update(
        target=settings.target,
        concurrency=settings.concurrency,
        max_tokens=settings.max_tokens,
        temperature=settings.temperature,
        input="chat" if settings.chat else "prompt",
        num_prompts=len(prompts),
        warmup=settings.warmup,
    )
    return report
