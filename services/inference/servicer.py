"""gRPC servicer of meshserve.inference.v1.InferenceService over AsyncEngine."""

from __future__ import annotations

import uuid
from typing import AsyncIterator

import grpc
from meshserve.inference.v1 import inference_service_pb2 as pb
from meshserve.inference.v1 import inference_service_pb2_grpc as pb_grpc

from services.common.grpc_status import grpc_errors
from services.inference.async_engine import AsyncEngine
from services.inference.engine import EngineConfig, FinishReason
from services.inference.sampling import SamplingParams, TokenLogprob

DEFAULT_LOAD_REPORT_INTERVAL_MS = 5
"""Load reports coalesce the arrivals and finishes of this long: at most 200 reports a second."""

_FINISH = {None: pb.FINISH_REASON_UNSPECIFIED, FinishReason.STOP: pb.FINISH_REASON_STOP, FinishReason.LENGTH: pb.FINISH_REASON_LENGTH}


def to_pb_logprobs(logprobs: list[TokenLogprob] | None) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                        alternatives=[pb.TokenAlternative(token_id=t, logprob=v) for t, v in lp.top])
        for lp in logprobs or []
    ]


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, engine: AsyncEngine, config: EngineConfig, model_name: str, backend_name: str) -> None:
        self.engine = engine
        self.config = config
        self.model_name = model_name
        self.backend_name = backend_name

    @grpc_errors
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        s = request.sampling
        params = SamplingParams(
            max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed if s.HasField("seed") else None,
            top_k=s.top_k, min_p=s.min_p, repetition_penalty=s.repetition_penalty or 1.0,
            presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty, min_tokens=s.min_tokens,
            logprobs=s.logprobs if s.HasField("logprobs") else None,
            prompt_logprobs=s.prompt_logprobs if s.HasField("prompt_logprobs") else None,
        )
        request_id = request.request_id or uuid.uuid4().hex
        results = self.engine.generate(
            request_id, list(request.prompt_token_ids), params, frozenset(request.stop_token_ids), request.priority,
            list(request.resumed_token_ids),
        )
        async for result in results:
            yield pb.GenerateResponse(
                token_ids=result.token_ids, finish_reason=_FINISH[result.finish_reason], prompt_tokens=result.prompt_tokens,
                logprobs=to_pb_logprobs(result.logprobs), prompt_logprobs=to_pb_logprobs(result.prompt_logprobs),
            )

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        return pb.GetModelInfoResponse(
            model=self.model_name,
            max_context_tokens=self.config.max_context,
            max_new_tokens=self.config.max_new_tokens,
            backend=self.backend_name,
            max_running=self.config.num_slots,
            max_waiting=self.config.max_waiting,
        )

    async def GetLoad(self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext) -> pb.GetLoadResponse:
        running, waiting, kv_cache_usage = self.engine.load()
        return pb.GetLoadResponse(running=running, waiting=waiting, kv_cache_usage=kv_cache_usage)

    async def WatchLoad(self, request: pb.WatchLoadRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.WatchLoadResponse]:
        # bounded: a watcher may not ask for a flood, nor sleep through a drain
        min_interval_s = min(max(request.min_interval_ms or DEFAULT_LOAD_REPORT_INTERVAL_MS, 1), 1000) / 1000
        async for running, waiting, kv_cache_usage in self.engine.watch_load(min_interval_s):
            yield pb.WatchLoadResponse(load=pb.GetLoadResponse(running=running, waiting=waiting, kv_cache_usage=kv_cache_usage))
