"""gRPC servicer of meshserve.inference.v1.InferenceService over AsyncEngine."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from meshserve.inference.v1 import inference_service_pb2 as pb
from meshserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from services.common.contract import DEFAULT_MAX_TOKENS, request_id_or_new, sampling_from_proto
from services.common.finish import to_inference_proto
from services.common.grpc_status import grpc_errors
from services.inference.async_engine import AsyncEngine
from services.inference.engine import EngineConfig
from services.inference.sampling import TokenLogprob
from services.modelstore.layout import ModelDirectory

DEFAULT_LOAD_REPORT_INTERVAL_MS = 5
"""Load reports coalesce the arrivals and finishes of this long: at most 200 reports a second."""


def to_pb_logprobs(logprobs: list[TokenLogprob] | None) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            alternatives=[pb.TokenAlternative(token_id=t, logprob=v) for t, v in lp.top],
        )
        for lp in logprobs or []
    ]


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(
        self,
        engine: AsyncEngine,
        config: EngineConfig,
        model: ModelDirectory,
        backend_name: str,
        model_version: str = "",
    ) -> None:
        self.engine = engine
        self.model_version = model_version
        self.config = config
        self.model = model
        self.backend_name = backend_name
        self.precision = model.precision
        """The precision that runs, reported by GetModelInfo (see `served_precision`)."""

    @grpc_errors
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        # the engine checks the request against the contract before it queues it
        params = sampling_from_proto(request.sampling, min(DEFAULT_MAX_TOKENS, self.config.max_new_tokens))
        results = self.engine.generate(
            request_id_or_new(request.request_id),
            list(request.prompt_token_ids),
            params,
            list(request.stop_token_ids),
            request.priority,
            list(request.resumed_token_ids),
            tenant=request.tenant,
        )
        async for result in results:
            yield pb.GenerateResponse(
                token_ids=result.token_ids,
                finish_reason=to_inference_proto(result.finish_reason),
                prompt_tokens=result.prompt_tokens,
                logprobs=to_pb_logprobs(result.logprobs),
                prompt_logprobs=to_pb_logprobs(result.prompt_logprobs),
                cached_prompt_tokens=result.cached_prompt_tokens,
            )

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        return pb.GetModelInfoResponse(
            model=self.model.name,
            max_context_tokens=self.config.max_context,
            max_new_tokens=self.config.max_new_tokens,
            backend=self.backend_name,
            max_running=self.config.num_slots,
            max_waiting=self.config.max_waiting,
            vocab_size=self.model.config.vocab_size,
            revision=self.model.revision,
            precision=self.precision,
            model_version=self.model_version,
        )

    @grpc_errors
    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        return pb.AbortResponse(aborted=self.engine.abort(request.request_id, request.tenant))

    async def GetLoad(self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext) -> pb.GetLoadResponse:
        running, waiting, kv_cache_usage = self.engine.load()
        return pb.GetLoadResponse(running=running, waiting=waiting, kv_cache_usage=kv_cache_usage)

    async def WatchLoad(
        self, request: pb.WatchLoadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchLoadResponse]:
        # bounded: a watcher may not ask for a flood, nor sleep through a drain
        min_interval_s = min(max(request.min_interval_ms or DEFAULT_LOAD_REPORT_INTERVAL_MS, 1), 1000) / 1000
        async for running, waiting, kv_cache_usage in self.engine.watch_load(min_interval_s):
            yield pb.WatchLoadResponse(
                load=pb.GetLoadResponse(running=running, waiting=waiting, kv_cache_usage=kv_cache_usage)
            )
