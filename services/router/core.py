"""The router's core: tokenize, pick an inference replica, stream tokens back as text.

It talks to the other services through their gRPC stubs but knows nothing of the public
protobuf types; the servicer converts at the edge.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from prometheus_client import Counter

from meshserve.inference.v1 import inference_service_pb2 as inference_pb
from meshserve.tokenizer.v1 import tokenizer_service_pb2 as tokenizer_pb
from meshserve.tokenizer.v1 import tokenizer_service_pb2_grpc as tokenizer_grpc
from services.common.contract import check_fits_context, sampling_to_proto
from services.common.errors import InvalidArgumentError, UnavailableError
from services.common.finish import FinishReason, from_inference_proto
from services.common.grpc_status import from_rpc_error
from services.common.metrics import degradation_metrics
from services.common.telemetry import client_interceptors
from services.router.config import RouterConfig
from services.router.convert import GenerationRequest, ModelLimits
from services.router.replicas import Replica, ReplicaSet, choose_replica, prefix_key, record_call_error
from services.router.result_cache import CachedAnswer, CachedDelta, ResultCache, cache_key
from services.router.result_cache_disk import DiskStore
from services.router.rollout import Rollout
from services.router.stops import StopStringMatcher
from services.router.tiers import PressureMonitor, ServiceTime, TierChoice, TierLoad, choose_tier

log = logging.getLogger(__name__)
tracer = trace.get_tracer("meshserve.router")


@dataclass(frozen=True)
class TextDelta:
    text: str
    token_ids: list[int]
    logprobs: list[inference_pb.TokenLogprob] = field(default_factory=list)  # one per token when asked for


@dataclass(frozen=True)
class Completed:
    finish_reason: FinishReason  # STOP or LENGTH
    prompt_tokens: int
    completion_tokens: int
    prompt_logprobs: list[inference_pb.TokenLogprob] = field(default_factory=list)
    cached_prompt_tokens: int = 0
    cached: bool = False
    """The whole answer came from the result cache."""
    model: str = ""
    """The model variant that generated it."""
    model_version: str = ""
    """The model version that generated it ("" when the router serves one unnamed version)."""


@dataclass(frozen=True)
class CacheLookup:
    """Before any text: whether a cacheable request's answer came from the result cache."""

    hit: bool


@dataclass(frozen=True)
class ServerInfo:
    replicas_serving: int
    replicas_total: int
    running: int
    waiting: int
    kv_cache_usage: float
    max_running: int


class _NotServing(Exception):
    pass


# a broken stream is continued elsewhere at most this many times
MAX_FAILOVERS = 2


class _Detokenization:
    """One request's DecodeStream to the tokenizer. Its requests come from a queue of ours rather than the
    call's write(): through a client interceptor, write() feeds a task of grpc's that waits for the next
    write, and when the call ends by itself (at its deadline) nothing ends that task, so the garbage
    collector destroys it later and logs errors ("Task was destroyed but it is pending", "aclose():
    asynchronous generator is already running"). Ending our request stream ends that task."""

    def __init__(self, stub: tokenizer_grpc.TokenizerServiceStub, timeout: float | None) -> None:
        self._requests: asyncio.Queue[tokenizer_pb.DecodeStreamRequest | None] = asyncio.Queue()
        self.call = stub.DecodeStream(self._request_stream(), timeout=timeout)
        # read through the call's iterator (not read()): trace interceptors end their span with it
        self._texts: AsyncIterator[tokenizer_pb.DecodeStreamResponse] = self.call.__aiter__()

    async def _request_stream(self) -> AsyncIterator[tokenizer_pb.DecodeStreamRequest]:
        while (request := await self._requests.get()) is not None:
            yield request

    async def text(self, ids: list[int]) -> str:
        """The text of `ids`. The stream's failures are raised as the tokenizer's (passed on), never as
        AioRpcError, so they are not mistaken for a failed replica."""
        self._requests.put_nowait(tokenizer_pb.DecodeStreamRequest(ids=ids))
        try:
            return (await anext(self._texts)).text
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        except StopAsyncIteration:
            raise UnavailableError("the tokenizer closed the detokenization stream", retry_after_s=1.0) from None

    async def finish(self) -> None:
        """Ends the request stream and waits for the tokenizer to end its side."""
        self._requests.put_nowait(None)
        async for _ in self._texts:
            pass

    def close(self) -> None:
        """However the request ended: the request stream ends and the call is cancelled (a no-op once done)."""
        self._requests.put_nowait(None)
        self.call.cancel()


class Router:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.tokenizer_channel = grpc.aio.insecure_channel(config.tokenizer_target, interceptors=client_interceptors())
        self.tokenizer = tokenizer_grpc.TokenizerServiceStub(self.tokenizer_channel)
        discovery = config.inference_discovery
        self.versions = {
            name: ReplicaSet(targets, discovery=discovery, model_version=name)
            for name, targets in config.version_targets().items()
        }
        """The model versions served side by side, each its own replicas; one unnamed ("") without a rollout."""
        self.rollout: Rollout = config.rollout()
        self.fallback = ReplicaSet(config.fallback_targets, discovery=discovery) if config.fallback_targets else None
        self.pressure = PressureMonitor(config.shed_utilisation, config.shed_low_after_s)
        self.service_time = ServiceTime()
        self._pressure_task: asyncio.Task[None] | None = None
        self.fallback_requests: Counter | None = None  # created with the model name, in connect()
        self.limits: ModelLimits | None = None
        self.eos_token_ids: frozenset[int] = frozenset()
        self.max_token_bytes = 0
        self.result_cache: ResultCache | None = None  # created with the model name, in connect()

    @property
    def replicas(self) -> ReplicaSet:
        """The stable version's replicas (the only version's, without a rollout)."""
        return self.versions[self.rollout.stable]

    def version_label(self, version: str) -> str:
        """The model_version label of `version`'s metrics: its name, or for the unnamed version the
        version its replicas report."""
        return version or (self.limits.model_version if self.limits else "")

    async def connect(self, timeout_s: float = 120.0) -> ModelLimits:
        """Waits until the tokenizer and an inference replica (of the stable version) are SERVING, learns
        the model's limits, and starts watching the replicas' health and load (every version's). The
        versions of a rollout are versions of one model: the stable one's limits are checked for all."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                health = await health_pb2_grpc.HealthStub(self.tokenizer_channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
                await self.replicas.poll_once()
                serving = self.replicas.healthy
                if health.status != health_pb2.HealthCheckResponse.SERVING or not serving:
                    raise _NotServing()
                info = serving[0].info  # a replica serves once the poll has its GetModelInfo
                assert info is not None
                tok_info = await self.tokenizer.GetInfo(tokenizer_pb.GetInfoRequest(), timeout=5)
                break
            except (grpc.aio.AioRpcError, _NotServing) as error:
                if time.monotonic() > deadline:
                    raise UnavailableError("dependencies did not become ready") from error
                log.info(
                    "waiting for dependencies: %s",
                    error.code().name if isinstance(error, grpc.aio.AioRpcError) else "NOT_SERVING",
                )
                await asyncio.sleep(0.5)
        # ids the model knows and the detokenizer can turn into text
        vocab_size = min(info.vocab_size, tok_info.vocab_size)
        self.limits = ModelLimits(
            info.model,
            info.max_context_tokens,
            info.max_new_tokens,
            vocab_size,
            info.revision,
            info.precision,
            info.model_version,
        )
        self.eos_token_ids = frozenset(tok_info.eos_token_ids)
        self.max_token_bytes = tok_info.max_token_bytes
        if self.config.result_cache_mb:
            disk = self.config.result_cache_disk
            self.result_cache = ResultCache(
                info.model,
                int(self.config.result_cache_mb * (1 << 20)),
                self.config.result_cache_redis,
                self.config.result_cache_ttl_s,
                DiskStore(
                    Path(disk), int(self.config.result_cache_disk_mb * (1 << 20)), self.config.result_cache_disk_ttl_s
                )
                if disk
                else None,
            )
            await self.result_cache.open()
        for replicas in self.versions.values():
            replicas.start()
        if self.fallback is not None:
            self.fallback.start()
        self.fallback_requests = degradation_metrics(info.model, lambda: float(self.pressure.shedding))
        if self.config.shed_low_after_s:
            self._pressure_task = asyncio.get_running_loop().create_task(self._watch_pressure())
        return self.limits

    async def _watch_pressure(self) -> None:
        while True:
            main = self._tier_load(*self.versions.values())  # the whole main tier, every version
            self.pressure.observe(main.load / main.max_running if main.max_running else 1.0, time.monotonic())
            await asyncio.sleep(0.25)

    @staticmethod
    def _tier_load(*sets: ReplicaSet) -> TierLoad:
        return TierLoad(
            sum(s.load for s in sets),
            sum(s.capacity for s in sets),
            sum(r.max_running for s in sets for r in s.healthy),
        )

    def choose_version(self, request: GenerationRequest) -> str:
        """The model version a new request goes to: its pin (header, else its tenant's), else the
        weighted turn over the versions that serve (services/router/rollout.py)."""
        return self.rollout.choose(
            request.model_version, request.tenant, lambda name: bool(self.versions[name].healthy)
        )

    def choose_tier(self, priority: int, remaining_s: float | None, version: str | None = None) -> TierChoice:
        """Before any work: shed LOW under sustained pressure, then the main tier (the version's
        replicas), or the fallback tier for what the main one cannot meet, or RESOURCE_EXHAUSTED."""
        self.pressure.check(priority)
        fallback = self._tier_load(self.fallback) if self.fallback is not None else None
        main = self.versions[version] if version is not None else self.replicas
        return choose_tier(priority, self._tier_load(main), fallback, remaining_s, self.service_time.mean_s)

    def _variant(self, replicas: ReplicaSet) -> ModelLimits:
        """The limits as the tier serves them: the fallback tier names its precision in the model."""
        assert self.limits is not None  # connect() learnt them
        if replicas is not self.fallback:
            return self.limits
        info = next((r.info for r in replicas.healthy if r.info), None)
        precision = info.precision if info else "fallback"
        return dataclasses.replace(self.limits, model_name=f"{self.limits.model_name}:{precision}", precision=precision)

    async def tokenize(self, request: GenerationRequest, timeout: float | None) -> list[int]:
        if request.token_ids is not None:
            return request.token_ids
        # a prompt that cannot fit the context is refused from its length alone: here, before a
        # megabyte travels to the tokenizer (which checks the same again)
        assert self.limits is not None  # connect() learnt them
        max_tokens = self.limits.max_context_tokens - 1
        if request.chat is not None:
            check_fits_context(sum(len(c.encode()) for _, c in request.chat), self.max_token_bytes, max_tokens, "chat")
        else:
            assert request.prompt is not None  # a request carries token ids, a chat or a prompt
            check_fits_context(len(request.prompt.encode()), self.max_token_bytes, max_tokens, "prompt")
        if request.chat is not None:
            encode = tokenizer_pb.EncodeRequest(
                chat=tokenizer_pb.ChatMessages(
                    messages=[tokenizer_pb.ChatMessage(role=r, content=c) for r, c in request.chat]
                ),
                max_tokens=max_tokens,
            )
        else:
            encode = tokenizer_pb.EncodeRequest(text=request.prompt, max_tokens=max_tokens)
        with tracer.start_as_current_span("tokenize") as span:
            try:
                response = await self.tokenizer.Encode(encode, timeout=timeout)
            except grpc.aio.AioRpcError as error:
                passed_on = from_rpc_error(error)
                if isinstance(passed_on, InvalidArgumentError) and passed_on.field == "text":
                    passed_on = InvalidArgumentError("prompt", passed_on.description)  # the public name
                raise passed_on from None
            # not a GenAI usage attribute (the deprecated gen_ai.usage.prompt_tokens was): the usage is the
            # GenAI span's, and tooling that sums gen_ai.usage.* would count the prompt twice
            span.set_attribute("meshserve.prompt_tokens", len(response.ids))
        return list(response.ids)

    async def generate(
        self, request: GenerationRequest, deadline: float | None, version: str | None = None
    ) -> AsyncGenerator[CacheLookup | TextDelta | Completed, None]:
        """Streams text deltas, then one Completed. `deadline` is a time.monotonic() value; `version` is
        the model version `choose_version` chose (chosen here when not given). The whole request stays on
        that version's replicas, failovers included, whatever weights change meanwhile.

        If the inference replica fails mid-stream, generation continues on another replica, which
        resumes from the prompt and the tokens already streamed (`resumed_token_ids`), so the client
        sees one answer with nothing repeated or missing (identical to an undisturbed run when
        decoding is greedy or seeded)."""

        def remaining() -> float | None:
            return None if deadline is None else max(0.001, deadline - time.monotonic())

        # the cheap path first: a cached answer needs no slot and no tokenizing, so it is looked up before
        # admission (a full tier does not refuse it) and before the prompt goes to the tokenizer
        if version is None:
            version = self.choose_version(request)
        cache = self.result_cache
        assert self.limits is not None  # connect() learnt them
        # one version's answers never answer another's: the version is part of the key
        cache_as = cache_key(request, self.limits, version) if cache is not None else None
        if cache is not None and cache_as is not None:
            found = await cache.get(cache_as, count_miss=False)
            if found is not None:
                yield CacheLookup(hit=True)
                for event in self._replay(*found, version):
                    yield event
                return
        choice = self.choose_tier(request.priority, remaining(), version)
        tier = self.fallback if choice.fallback else self.versions[version]
        assert tier is not None  # choose_tier picks the fallback tier only where there is one
        variant = self._variant(tier)
        if choice.fallback:
            assert self.fallback_requests is not None  # connect() made it
            self.fallback_requests.labels(self.limits.model_name, choice.reason).inc()
            trace.get_current_span().set_attribute("meshserve.fallback.reason", choice.reason)
        if cache is not None and cache_as is not None:
            # the fallback tier's answers are its own: stored under its variant's key
            if choice.fallback:
                cache_as = cache_key(request, variant, version)
                assert cache_as is not None  # a request is cacheable or not whatever the tier
                found = await cache.get(cache_as)
            else:
                found = None
                cache.misses.inc()
            yield CacheLookup(hit=found is not None)
            if found is not None:
                for event in self._replay(*found, version):
                    yield event
                return
        prompt_ids = await self.tokenize(request, remaining())
        self._check_context(request, len(prompt_ids))
        streamed: list[CachedDelta] = []  # what the client got, to store a complete answer
        key = prefix_key(prompt_ids)
        detokenizer = _Detokenization(self.tokenizer, remaining())
        generated: list[int] = []
        tried: set[str] = set()
        completed: Completed | None = None
        prompt_logprobs: list[inference_pb.TokenLogprob] = []
        cached_prompt_tokens = 0
        stops = StopStringMatcher(request.stop)
        try:
            while completed is None:
                replica = choose_replica(tier.replicas, key, exclude=tried)
                if replica is None:
                    raise UnavailableError("no inference replica is serving", retry_after_s=1.0)
                tried.add(replica.target)
                call = replica.stub.Generate(
                    self._inference_request(request, prompt_ids, generated), timeout=remaining()
                )
                attempt_started = time.monotonic()
                replica.in_flight += 1
                try:
                    async for response in call:
                        ids = list(response.token_ids)
                        if response.prompt_logprobs:
                            prompt_logprobs = list(response.prompt_logprobs)
                        cached_prompt_tokens = max(cached_prompt_tokens, response.cached_prompt_tokens)
                        if ids:
                            generated += ids
                            text = stops.push(await detokenizer.text(ids))
                            logprobs = list(response.logprobs)
                            if cache_as is not None:  # kept only when the answer may be stored
                                streamed.append(CachedDelta(text, ids, logprobs))
                            yield TextDelta(text, ids, logprobs)
                            if stops.stopped:
                                completed = Completed(
                                    FinishReason.STOP,
                                    len(prompt_ids),
                                    len(generated),
                                    prompt_logprobs,
                                    cached_prompt_tokens,
                                    model=variant.model_name,
                                    model_version=version,
                                )
                                break
                        if (finish := from_inference_proto(response.finish_reason)) is not None:
                            if held := stops.flush():
                                if cache_as is not None:
                                    streamed.append(CachedDelta(held, [], []))
                                yield TextDelta(held, [])
                            completed = Completed(
                                finish,
                                len(prompt_ids),
                                len(generated),
                                prompt_logprobs,
                                cached_prompt_tokens,
                                model=variant.model_name,
                                model_version=version,
                            )
                except grpc.aio.AioRpcError as error:
                    if not self._can_fail_over(error, tried, tier):
                        raise from_rpc_error(error) from None
                    record_call_error(replica, error.code())
                    log.warning(
                        "inference replica %s refused or failed (%s); continuing on another",
                        replica.target,
                        error.code().name,
                    )
                    continue
                finally:
                    replica.in_flight -= 1
                    call.cancel()  # on client cancellation this frees the slot at once
                if completed is not None and tier is not self.fallback:  # how long a main-tier slot is held
                    self.service_time.observe(time.monotonic() - attempt_started)
                if completed is None:
                    log.warning("inference replica %s ended a stream without finishing it", replica.target)
                    raise UnavailableError("an inference replica ended the stream early", retry_after_s=1.0)
            await detokenizer.finish()
        except grpc.aio.AioRpcError as error:  # the tokenizer's, ending its stream
            raise from_rpc_error(error) from None
        finally:
            detokenizer.close()
        if cache is not None and cache_as is not None:  # only a complete, successful answer gets here
            await cache.put(
                cache_as,
                CachedAnswer(
                    streamed,
                    completed.finish_reason,
                    completed.prompt_tokens,
                    completed.completion_tokens,
                    completed.prompt_logprobs,
                    completed.model,
                ),
            )
        yield completed

    @staticmethod
    def _replay(answer: CachedAnswer, cache_tier: str, version: str) -> list[TextDelta | Completed]:
        """A cached answer as the events its generation streamed."""
        trace.get_current_span().add_event("result_cache_hit", {"meshserve.result_cache.tier": cache_tier})
        events: list[TextDelta | Completed] = [TextDelta(d.text, d.token_ids, d.logprobs) for d in answer.deltas]
        # nothing was computed: the whole prompt counts as cached
        events.append(
            Completed(
                answer.finish_reason,
                answer.prompt_tokens,
                answer.completion_tokens,
                answer.prompt_logprobs,
                answer.prompt_tokens,
                cached=True,
                model=answer.model,
                model_version=version,
            )
        )
        return events

    def _check_context(self, request: GenerationRequest, prompt_tokens: int) -> None:
        """Refuses, before any inference work, prompts that cannot fit the model's context."""
        assert self.limits is not None  # connect() learnt them
        context = self.limits.max_context_tokens
        field = "prompt" if request.prompt is not None else "chat" if request.chat is not None else "token_ids"
        if prompt_tokens >= context:
            raise InvalidArgumentError(
                field, f"the prompt has {prompt_tokens} tokens; the limit (max_context_tokens) is {context - 1}"
            )
        if prompt_tokens + request.sampling.max_tokens > context:
            raise InvalidArgumentError(
                "sampling.max_tokens",
                f"prompt ({prompt_tokens} tokens) + max_tokens ({request.sampling.max_tokens}) exceeds the model's "
                f"context (max_context_tokens = {context})",
            )

    def _can_fail_over(self, error: grpc.aio.AioRpcError, tried: set[str], tier: ReplicaSet) -> bool:
        # Only what the replica's state caused: UNAVAILABLE (it died, is draining or still loading) and
        # RESOURCE_EXHAUSTED (its queue is full; refused before any work). An error the request caused
        # (INVALID_ARGUMENT, INTERNAL from a request that failed alone, ...) would fail on every replica
        # and is passed on. The tokens so far go with the request as resumed tokens.
        retryable = error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
        others = any(r.target not in tried for r in tier.healthy)
        return retryable and others and len(tried) <= MAX_FAILOVERS

    def _inference_request(
        self, request: GenerationRequest, prompt_ids: list[int], generated: list[int]
    ) -> inference_pb.GenerateRequest:
        """The inference request for an attempt; after a failover `generated` (what the client already
        has) is resumed: the replica replays those tokens and continues after them."""
        sampling = sampling_to_proto(request.sampling, inference_pb.SamplingParameters())
        if generated:  # a continuation after failover: the first attempt sent the prompt logprobs
            sampling.ClearField("prompt_logprobs")
        return inference_pb.GenerateRequest(
            request_id=request.request_id,
            prompt_token_ids=prompt_ids,
            resumed_token_ids=generated,
            sampling=sampling,
            stop_token_ids=sorted(self.eos_token_ids.union(request.stop_token_ids)),
            priority=request.priority,
            tenant=request.tenant,
        )

    def server_info(self) -> ServerInfo:
        serving = [r for replicas in self.versions.values() for r in replicas.healthy]
        return ServerInfo(
            replicas_serving=len(serving),
            replicas_total=sum(len(replicas.replicas) for replicas in self.versions.values()),
            running=sum(r.running for r in serving),
            waiting=sum(r.waiting for r in serving),
            kv_cache_usage=sum(r.kv_cache_usage for r in serving) / len(serving) if serving else 0.0,
            max_running=sum(r.max_running for r in serving),
        )

    async def abort(self, request_id: str, tenant: str) -> bool:
        """Ends `tenant`'s running generations of `request_id` on every replica (the stream may run
        through another router); True when one was found."""

        async def abort_on(replica: Replica) -> int:
            try:
                request = inference_pb.AbortRequest(request_id=request_id, tenant=tenant)
                response: inference_pb.AbortResponse = await replica.stub.Abort(request, timeout=2)
                return response.aborted
            except grpc.aio.AioRpcError as error:
                log.warning("abort on inference replica %s failed: %s", replica.target, error.code().name)
                return 0

        replicas = [r for s in self.versions.values() for r in s.healthy]
        replicas += self.fallback.healthy if self.fallback is not None else []
        return sum(await asyncio.gather(*(abort_on(r) for r in replicas))) > 0

    async def close(self) -> None:
        if self._pressure_task is not None:
            self._pressure_task.cancel()
        if self.fallback is not None:
            await self.fallback.close()
        if self.result_cache is not None:
            await self.result_cache.close()
        await self.tokenizer_channel.close()
        for replicas in self.versions.values():
            await replicas.close()
