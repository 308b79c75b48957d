"""The router's core: tokenize, pick an inference replica, stream tokens back as text.

It talks to the other services through their gRPC stubs but knows nothing of the public
protobuf types; the servicer converts at the edge.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from meshserve.inference.v1 import inference_service_pb2 as inference_pb
from meshserve.inference.v1 import inference_service_pb2_grpc as inference_grpc
from meshserve.tokenizer.v1 import tokenizer_service_pb2 as tokenizer_pb
from meshserve.tokenizer.v1 import tokenizer_service_pb2_grpc as tokenizer_grpc
from opentelemetry import trace

from services.common.errors import UnavailableError
from services.common.grpc_status import from_rpc_error
from services.common.metrics import ServingMetrics
from services.common.telemetry import client_interceptors
from services.router.config import RouterConfig
from services.router.convert import GenerationRequest, ModelLimits

log = logging.getLogger(__name__)
tracer = trace.get_tracer("meshserve.router")


@dataclass(frozen=True)
class TextDelta:
    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class Completed:
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


_FINISH = {inference_pb.FINISH_REASON_STOP: "stop", inference_pb.FINISH_REASON_LENGTH: "length"}


class DownstreamError(Exception):
    """A dependency ended a call with a status the router passes on unchanged."""

    def __init__(self, error: grpc.aio.AioRpcError) -> None:
        super().__init__(error.details())
        self.code = error.code()
        self.details = error.details() or ""


def _passthrough(error: grpc.aio.AioRpcError) -> Exception:
    return from_rpc_error(error) or DownstreamError(error)


class _NotServing(Exception):
    pass


class InferenceReplica:
    def __init__(self, target: str) -> None:
        self.target = target
        self.channel = grpc.aio.insecure_channel(target, interceptors=client_interceptors())
        self.stub = inference_grpc.InferenceServiceStub(self.channel)


class Router:
    def __init__(self, config: RouterConfig, metrics: ServingMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.tokenizer_channel = grpc.aio.insecure_channel(config.tokenizer_target, interceptors=client_interceptors())
        self.tokenizer = tokenizer_grpc.TokenizerServiceStub(self.tokenizer_channel)
        self.replicas = [InferenceReplica(t) for t in config.inference_targets]
        self._round_robin = itertools.cycle(self.replicas)
        self.limits: ModelLimits | None = None
        self.eos_token_ids: list[int] = []

    async def connect(self, timeout_s: float = 120.0) -> ModelLimits:
        """Waits until the tokenizer and one inference replica are SERVING, and learns the model's limits."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                for channel in (self.tokenizer_channel, self.replicas[0].channel):
                    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                    if health.status != health_pb2.HealthCheckResponse.SERVING:
                        raise _NotServing()
                info = await self.replicas[0].stub.GetModelInfo(inference_pb.GetModelInfoRequest(), timeout=5)
                tok_info = await self.tokenizer.GetInfo(tokenizer_pb.GetInfoRequest(), timeout=5)
                break
            except (grpc.aio.AioRpcError, _NotServing) as error:
                if time.monotonic() > deadline:
                    raise UnavailableError("dependencies did not become ready") from error
                log.info("waiting for dependencies: %s", error.code().name if isinstance(error, grpc.aio.AioRpcError) else "NOT_SERVING")
                await asyncio.sleep(0.5)
        self.limits = ModelLimits(info.model, info.max_context_tokens, info.max_new_tokens)
        self.eos_token_ids = list(tok_info.eos_token_ids)
        return self.limits

    def pick_replica(self) -> InferenceReplica:
        return next(self._round_robin)

    async def tokenize(self, request: GenerationRequest, timeout: float | None) -> list[int]:
        if request.token_ids is not None:
            return request.token_ids
        if request.chat is not None:
            encode = tokenizer_pb.EncodeRequest(
                chat=tokenizer_pb.ChatMessages(messages=[tokenizer_pb.ChatMessage(role=r, content=c) for r, c in request.chat])
            )
        else:
            encode = tokenizer_pb.EncodeRequest(text=request.prompt)
        with tracer.start_as_current_span("tokenize") as span:
            try:
                response = await self.tokenizer.Encode(encode, timeout=timeout)
            except grpc.aio.AioRpcError as error:
                raise _passthrough(error) from None
            span.set_attribute("gen_ai.usage.prompt_tokens", len(response.ids))
        return list(response.ids)

    async def generate(self, request: GenerationRequest, deadline: float | None) -> AsyncIterator[TextDelta | Completed]:
        """Streams text deltas, then one Completed. `deadline` is a time.monotonic() value."""

        def remaining() -> float | None:
            return None if deadline is None else max(0.001, deadline - time.monotonic())

        prompt_ids = await self.tokenize(request, remaining())
        replica = self.pick_replica()
        s = request.sampling
        sampling = inference_pb.SamplingParameters(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p)
        if s.seed is not None:
            sampling.seed = s.seed
        call = replica.stub.Generate(
            inference_pb.GenerateRequest(
                request_id=request.request_id, prompt_token_ids=prompt_ids, sampling=sampling, stop_token_ids=self.eos_token_ids
            ),
            timeout=remaining(),
        )
        detokenizer = self.tokenizer.DecodeStream(timeout=remaining())
        # read through the call's iterator (not read()): trace interceptors end their span with it
        decoded_texts = detokenizer.__aiter__()
        completed: Completed | None = None
        completion_tokens = 0
        try:
            async for response in call:
                ids = list(response.token_ids)
                completion_tokens += len(ids)
                if ids:
                    await detokenizer.write(tokenizer_pb.DecodeStreamRequest(ids=ids))
                    text = (await anext(decoded_texts)).text
                    yield TextDelta(text, ids)
                if response.finish_reason != inference_pb.FINISH_REASON_UNSPECIFIED:
                    completed = Completed(_FINISH[response.finish_reason], response.prompt_tokens, completion_tokens)
            await detokenizer.done_writing()
            async for _ in decoded_texts:
                pass
        except grpc.aio.AioRpcError as error:
            raise _passthrough(error) from None
        except StopAsyncIteration:
            raise UnavailableError("the tokenizer closed the detokenization stream", retry_after_s=1.0) from None
        finally:
            # on client cancellation or any error, cancel downstream so the slot frees at once
            call.cancel()
            detokenizer.cancel()
        if completed is None:
            raise UnavailableError(f"inference replica {replica.target} ended the stream without finishing", retry_after_s=1.0)
        yield completed

    async def close(self) -> None:
        await self.tokenizer_channel.close()
        for replica in self.replicas:
            await replica.channel.close()

