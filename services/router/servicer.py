"""gRPC servicer of the public meshserve.v1.GenerationService."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

import grpc

from meshserve.inference.v1 import inference_service_pb2 as inference_pb
from meshserve.v1 import generation_service_pb2 as pb
from meshserve.v1 import generation_service_pb2_grpc as pb_grpc
from services.common.contract import request_id_or_new
from services.common.errors import InvalidArgumentError, ServingError, UnavailableError
from services.common.finish import to_public_proto
from services.common.grpc_status import abort, abort_internal, grpc_errors, to_grpc_status
from services.common.metrics import GenAiMetrics, ServingMetrics, serving_replicas_gauge
from services.router.config import RouterConfig
from services.router.convert import ModelLimits, to_generation_request, to_tokenize_input
from services.router.core import CacheLookup, Completed, Router, TextDelta
from services.router.request_telemetry import RequestTelemetry
from services.router.rollout import pinned_version
from services.router.tenancy import Caller, TenantStreams


def _logprobs(items: list[inference_pb.TokenLogprob]) -> list[pb.TokenLogprob]:
    # the inference and public TokenLogprob messages have the same fields and numbers
    return [pb.TokenLogprob.FromString(item.SerializeToString()) for item in items]


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    def __init__(self, router: Router, config: RouterConfig) -> None:
        self.router = router
        self.config = config
        self.metrics: ServingMetrics | None = None  # created once the model name is known
        self.gen_ai: GenAiMetrics | None = None
        self.in_flight_by_version: dict[str, int] = {}
        self.tenant_streams = TenantStreams(config.max_streams_per_tenant)

    def on_connected(self) -> None:
        assert self.router.limits is not None
        model = self.router.limits.model_name
        self.metrics = ServingMetrics(model, None)  # a request's are bound to its version once it is routed
        self.gen_ai = GenAiMetrics(model)
        label = self.router.version_label
        for version in self.router.versions:
            self.in_flight_by_version[version] = 0
            running = self.metrics.for_version(label(version)).num_requests_running
            running.set_function(lambda v=version: self.in_flight_by_version[v])  # type: ignore[misc]
        serving_replicas_gauge(
            model,
            {label(v): (lambda s=s: len(s.healthy)) for v, s in self.router.versions.items()},  # type: ignore[misc]
        )

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        if self.metrics is None or self.gen_ai is None or self.router.limits is None:
            await abort(
                context, UnavailableError("the router is still connecting to its dependencies", retry_after_s=2.0)
            )
        telemetry = RequestTelemetry(self.metrics, self.gen_ai)
        remaining = context.time_remaining()
        # the server's own limit on a stream's life holds whatever deadline the client set, or none
        limit = self.config.max_stream_duration_s
        deadline = telemetry.started + (limit if remaining is None else min(remaining, limit))
        caller = Caller.from_metadata(context.invocation_metadata())
        code = "OK"
        counted_stream = False
        version: str | None = None
        try:
            generation = to_generation_request(request, self.router.limits, self.config.default_max_tokens)
            generation = dataclasses.replace(
                generation,
                priority=caller.priority(generation.priority),
                tenant=caller.tenant,
                model_version=pinned_version(context.invocation_metadata()),
            )
            telemetry.accepted(generation)
            self.tenant_streams.acquire(caller.tenant)
            counted_stream = True
            version = self.router.choose_version(generation)
            self.in_flight_by_version[version] += 1
            telemetry.routed(self.router.version_label(version))
            events = self.router.generate(generation, deadline, version)
            async with contextlib.aclosing(events):  # a cancelled call closes it here, not in the collector
                async for event in events:
                    if isinstance(event, CacheLookup):  # REST clients see it as a response header
                        await context.send_initial_metadata([("x-meshserve-cache", "hit" if event.hit else "miss")])
                    elif isinstance(event, TextDelta):
                        telemetry.tokens(len(event.token_ids))
                        yield pb.GenerateResponse(
                            chunk=pb.GenerateChunk(
                                text=event.text, token_ids=event.token_ids, logprobs=_logprobs(event.logprobs)
                            )
                        )
                    elif isinstance(event, Completed):
                        telemetry.completed(
                            generation.request_id,
                            event.finish_reason.value,
                            event.prompt_tokens,
                            event.completion_tokens,
                            event.cached_prompt_tokens,
                        )
                        yield pb.GenerateResponse(
                            complete=pb.GenerateComplete(
                                finish_reason=to_public_proto(event.finish_reason),
                                prompt_tokens=event.prompt_tokens,
                                completion_tokens=event.completion_tokens,
                                request_id=generation.request_id,
                                prompt_logprobs=_logprobs(event.prompt_logprobs),
                                cached_prompt_tokens=event.cached_prompt_tokens,
                                cached=event.cached,
                                model=event.model,
                                model_version=event.model_version,
                            )
                        )
        except ServingError as error:
            status = to_grpc_status(error)
            code = status.code.name
            await context.abort_with_status(status)
        except (asyncio.CancelledError, GeneratorExit):
            # the client went away or its deadline passed: cancelled at an await, or closed at a yield
            left = context.time_remaining()
            code = "DEADLINE_EXCEEDED" if left is not None and left <= 0 else "CANCELLED"
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:  # a bug: INTERNAL with an id to quote, never the exception's class or text
            code = "INTERNAL"
            await abort_internal(context, "GenerationService.Generate")
        finally:
            if version is not None:
                self.in_flight_by_version[version] -= 1
            if counted_stream:
                self.tenant_streams.release(caller.tenant)
            telemetry.finished(code)

    def _limits(self) -> ModelLimits:
        if self.router.limits is None:
            raise UnavailableError("the router is still connecting to its dependencies", retry_after_s=2.0)
        return self.router.limits

    @grpc_errors
    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        limits = self._limits()
        return pb.GetModelInfoResponse(
            model=limits.model_name,
            revision=limits.revision,
            precision=limits.precision,
            max_context_tokens=limits.max_context_tokens,
            vocab_size=limits.vocab_size,
            max_new_tokens=limits.max_new_tokens,
        )

    @grpc_errors
    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        self._limits()
        info = self.router.server_info()
        return pb.GetServerInfoResponse(
            replicas_serving=info.replicas_serving,
            replicas_total=info.replicas_total,
            running=info.running,
            waiting=info.waiting,
            kv_cache_usage=info.kv_cache_usage,
            max_running=info.max_running,
        )

    @grpc_errors
    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        limits = self._limits()
        ids = await self.router.tokenize(to_tokenize_input(request, limits), context.time_remaining())
        return pb.TokenizeResponse(token_ids=ids, count=len(ids), max_context_tokens=limits.max_context_tokens)

    @grpc_errors
    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        self._limits()
        if not request.request_id:
            raise InvalidArgumentError("request_id", "name the request to abort")
        request_id = request_id_or_new(request.request_id)
        caller = Caller.from_metadata(context.invocation_metadata())
        return pb.AbortResponse(aborted=await self.router.abort(request_id, caller.tenant))
