"""The overload measurement through the public API: the same short chat requests one at a time (unloaded),
at capacity, then offered open-loop at three times what the slots serve. Shared by the overload test
(tests/e2e/test_resilience.py, which asserts what is refused and how) and bench/overload.py (which prints
the latencies)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc

from meshserve.v1 import generation_service_pb2 as pb
from meshserve.v1 import generation_service_pb2_grpc as pb_grpc

PROMPTS = [
    "Describe the ocean in detail.",
    "Explain how a bicycle works.",
    "Write about the history of Rome.",
    "Tell me about the planets of the solar system.",
]


@dataclass(frozen=True)
class Timed:
    """One request: its status name, time to first token, time to the end, whether an error had details."""

    code: str
    first_s: float | None
    took_s: float
    details: bool


@dataclass(frozen=True)
class Overload:
    rate: float
    """Arrivals per second of the open-loop offer."""
    unloaded: list[Timed]
    at_capacity: list[Timed]
    offered: list[Timed]


def chat(prompt: str, max_tokens: int, min_tokens: int = 0) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=prompt)]),
        sampling=pb.SamplingParameters(max_tokens=max_tokens, temperature=0.0, min_tokens=min_tokens),
        no_cache=True,  # every request must reach a replica
    )


async def timed(stub: pb_grpc.GenerationServiceStub, request: pb.GenerateRequest) -> Timed:
    started, first = time.monotonic(), None
    try:
        async for response in stub.Generate(request, timeout=60):
            if response.HasField("chunk") and first is None:
                first = time.monotonic() - started
        return Timed("OK", first, time.monotonic() - started, False)
    except grpc.aio.AioRpcError as error:
        details = any(k == "grpc-status-details-bin" for k, _ in (error.trailing_metadata() or ()))
        return Timed(error.code().name, None, time.monotonic() - started, details)


async def overload(target: str, slots: int = 8, seconds: float = 5.0) -> Overload:
    """Unloaded (one at a time); at capacity (closed-loop clients filling NORMAL's share of `slots`, for
    3 s); then an open-loop offer of 3x capacity for `seconds`: arrivals at 3 x (`slots` / the unloaded
    service time), whatever the mesh answers."""
    async with grpc.aio.insecure_channel(target) as channel:
        await channel.channel_ready()
        stub = pb_grpc.GenerationServiceStub(channel)

        def request(i: int) -> pb.GenerateRequest:
            return chat(PROMPTS[i % len(PROMPTS)], 24, min_tokens=24)

        await asyncio.gather(*(timed(stub, chat(p, 4)) for p in PROMPTS))  # warm: one-time costs
        unloaded = [await timed(stub, request(i)) for i in range(6)]

        async def client(i: int, until: float) -> list[Timed]:
            results = []
            while time.monotonic() < until:
                results.append(await timed(stub, request(i)))
            return results

        until = time.monotonic() + 3
        clients = int(0.9 * slots)  # NORMAL's admission share
        at_capacity = [r for rs in await asyncio.gather(*(client(i, until) for i in range(clients))) for r in rs]
        rate = 3 * slots / (sum(r.took_s for r in unloaded) / len(unloaded))
        tasks, end, i = [], time.monotonic() + seconds, 0
        while time.monotonic() < end:
            tasks.append(asyncio.create_task(timed(stub, request(i))))
            i += 1
            await asyncio.sleep(1 / rate)  # the offer's pace, not a wait for something to happen
        return Overload(rate, unloaded, at_capacity, list(await asyncio.gather(*tasks)))
