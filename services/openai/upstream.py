"""The gRPC side of the OpenAI-compatible service: a client of the routers' public
meshserve.v1.GenerationService, and the tokenizer service for the text of tokens named in logprobs.

Calls carry what Envoy established about the caller (the verified tenant, the highest priority it may use)
as metadata, the client's deadline, and the trace context (the OpenTelemetry client interceptor)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence

import grpc

from meshserve.tokenizer.v1 import tokenizer_service_pb2 as tokenizer_pb
from meshserve.tokenizer.v1 import tokenizer_service_pb2_grpc as tokenizer_grpc
from meshserve.v1 import generation_service_pb2 as pb
from meshserve.v1 import generation_service_pb2_grpc as pb_grpc
from services.common.contract import MAX_PRIORITY_HEADER, MODEL_VERSION_HEADER, TENANT_HEADER
from services.common.grpc_status import from_rpc_error
from services.common.telemetry import client_interceptors
from services.openai.config import OpenAIConfig

FORWARDED_HEADERS = (TENANT_HEADER, MAX_PRIORITY_HEADER, MODEL_VERSION_HEADER)
"""Request headers passed on to the router as gRPC metadata of the same names: the two Envoy sets from the
verified token (a client's own are removed at Envoy), and the client's pin to a model version."""

_SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
# Round robin over the routers a target resolves to, skipping those whose health is not SERVING (a draining
# router), and retrying UNAVAILABLE before any response came (gRPC never retries a stream once a message
# arrived, so nothing is generated twice).
_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": _SERVICE},
        "methodConfig": [
            {
                "name": [{"service": _SERVICE}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)
_CHANNEL_OPTIONS = [
    ("grpc.service_config", _SERVICE_CONFIG),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
]


def forwarded_metadata(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    return [(name, headers[name]) for name in FORWARDED_HEADERS if headers.get(name)]


class RouterClient:
    """Generate calls to the routers over one channel."""

    def __init__(self, config: OpenAIConfig) -> None:
        self.channel = grpc.aio.insecure_channel(
            config.router_channel_target, options=_CHANNEL_OPTIONS, interceptors=client_interceptors()
        )
        self.stub = pb_grpc.GenerationServiceStub(self.channel)
        self._model_info: pb.GetModelInfoResponse | None = None

    async def model_info(self) -> pb.GetModelInfoResponse:
        """The served model (its name is what responses carry), asked of a router once and kept."""
        if self._model_info is None:
            try:
                self._model_info = await self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
            except grpc.aio.AioRpcError as error:
                raise from_rpc_error(error) from None
        return self._model_info

    async def generate(
        self, request: pb.GenerateRequest, metadata: list[tuple[str, str]], timeout_s: float | None
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """The Generate stream; a failed call raises the domain error its status carries (from_rpc_error).
        Closing the iterator early (the HTTP client went away) cancels the call, which frees the slot."""
        call = self.stub.Generate(request, metadata=metadata, timeout=timeout_s)
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()  # a no-op once the call ended

    async def close(self) -> None:
        await self.channel.close()


class _Ended:
    """Put on the queue when a choice's stream ends."""


class Generation:
    """The Generate calls answering one OpenAI request (one per choice), started at once and read
    concurrently into one queue, so choices stream interleaved as their tokens come. The queue is bounded: a
    client that reads slowly stops the calls being read (gRPC flow control then holds back the router), so
    nothing here grows with a slow reader."""

    QUEUE_SIZE = 64
    """Responses read ahead of the client, over all choices."""

    def __init__(
        self,
        router: RouterClient,
        requests: Sequence[pb.GenerateRequest],
        metadata: list[tuple[str, str]],
        timeout_s: float | None,
    ) -> None:
        self.router = router
        self.queue: asyncio.Queue[tuple[int, pb.GenerateResponse | Exception | _Ended]] = asyncio.Queue(self.QUEUE_SIZE)
        self.running = len(requests)
        self.tasks = [
            asyncio.create_task(self._read(i, request, metadata, timeout_s)) for i, request in enumerate(requests)
        ]

    async def _read(
        self, index: int, request: pb.GenerateRequest, metadata: list[tuple[str, str]], timeout_s: float | None
    ) -> None:
        stream = self.router.generate(request, metadata, timeout_s)
        try:
            async for response in stream:
                await self.queue.put((index, response))
            await self.queue.put((index, _Ended()))
        except Exception as error:
            await self.queue.put((index, error))
        finally:
            await stream.aclose()  # cancels the call if it is still running

    async def next(self) -> tuple[int, pb.GenerateResponse] | None:
        """The next response of any choice; None once every choice ended. A failed call raises its error."""
        while self.running:
            index, item = await self.queue.get()
            if isinstance(item, Exception):
                raise item
            if isinstance(item, _Ended):
                self.running -= 1
                continue
            return index, item
        return None

    async def first_answers(self) -> list[tuple[int, pb.GenerateResponse]]:
        """Reads until every choice answered once (its first chunk, or a refusal, which raises)."""
        seen: set[int] = set()
        first = []
        while len(seen) < len(self.tasks) and (event := await self.next()) is not None:
            first.append(event)
            seen.add(event[0])
        return first

    def cancel(self) -> None:
        """Cancels every call still running (a no-op for those that ended)."""
        for task in self.tasks:
            task.cancel()


class TokenTexts:
    """The text of single tokens (for logprobs), asked of the tokenizer's Decode once per token id and kept
    (the vocabulary is small: 49,152 ids for SmolLM2, so everything fits). Without a tokenizer target nothing
    is known and the response names tokens token_id:N. At most MAX_CONCURRENT_DECODES calls run at once, and
    an id being decoded for one request is awaited, not decoded again, by another: the tokenizer serves
    every request's Encode too."""

    MAX_CONCURRENT_DECODES = 16

    def __init__(self, target: str | None) -> None:
        self.channel = grpc.aio.insecure_channel(target, interceptors=client_interceptors()) if target else None
        self.stub = tokenizer_grpc.TokenizerServiceStub(self.channel) if self.channel else None
        self.known: dict[int, str] = {}
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._slots = asyncio.Semaphore(self.MAX_CONCURRENT_DECODES)

    async def _decode(self, token_id: int, timeout_s: float | None) -> None:
        assert self.stub is not None
        try:
            async with self._slots:
                response = await self.stub.Decode(
                    tokenizer_pb.DecodeRequest(ids=[token_id], skip_special_tokens=False), timeout=timeout_s
                )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        finally:
            self._pending.pop(token_id, None)
        self.known[token_id] = response.text

    async def lookup(self, token_ids: Iterable[int], timeout_s: float | None = 10.0) -> Mapping[int, str]:
        """The text of every id, decoding those not known yet (a bounded number at a time)."""
        if self.stub is None:
            return {}
        waits = []
        for token_id in set(token_ids) - self.known.keys():
            if token_id not in self._pending:
                self._pending[token_id] = asyncio.ensure_future(self._decode(token_id, timeout_s))
            waits.append(self._pending[token_id])
        if waits:
            await asyncio.gather(*waits)
        return self.known

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
