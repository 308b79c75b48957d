"""Bridges the engine thread and asyncio: one queue per request, metrics and trace spans from
the engine's timestamps, and abort when the caller goes away."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from opentelemetry import trace

from services.common.contract import SamplingParams
from services.common.errors import AbortedError, InternalError, InvalidArgumentError, UnavailableError
from services.common.finish import FinishReason
from services.common.metrics import EngineMetrics
from services.inference.constraints import GrammarCompiler
from services.inference.engine import Engine, EngineOutput, RequestTimes
from services.inference.sampling import TokenLogprob

tracer = trace.get_tracer("meshserve.inference")

# monotonic -> epoch nanoseconds, for spans whose times were taken on the engine thread
_EPOCH_NS = time.time_ns()
_MONO = time.monotonic()


def _epoch_ns(monotonic: float) -> int:
    return _EPOCH_NS + int((monotonic - _MONO) * 1e9)


@dataclass
class GenerationResult:
    """Tokens of one or more engine steps, coalesced when the caller reads slower than the engine."""

    token_ids: list[int]
    finish_reason: FinishReason | None
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    cached_prompt_tokens: int = 0
    """Prompt positions the prefix cache supplied (on the result that carries the first token)."""


class OutputMailbox:
    """Hands engine outputs to one event loop with one wakeup per burst. Every step the engine thread
    emits a token for each running request; a call_soon_threadsafe (a write to the loop's self-pipe)
    for each one cost ~4% of the inference process at 32 streams. Outputs keep their order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[EngineOutput], EngineOutput]] = []

    def post(self, queue: asyncio.Queue[EngineOutput], output: EngineOutput) -> None:
        """From any thread: `output` goes into `queue` on the loop."""
        with self._lock:
            wake = not self._pending  # otherwise a delivery is already scheduled and takes this one too
            self._pending.append((queue, output))
        if wake and not self._loop.is_closed():  # the engine thread may outlive the loop at shutdown
            self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, output in pending:
            queue.put_nowait(output)


class AsyncEngine:
    def __init__(self, metrics: EngineMetrics, grammars: GrammarCompiler | None = None) -> None:
        self.engine: Engine | None = None
        self.metrics = metrics
        self.grammars = grammars
        """Compiles constrained requests' grammars before they are queued (None: constraints are refused)."""
        self._sequence = itertools.count()
        # request id -> {engine id: tenant} of its running generations (an id may repeat), for Abort
        self._active: dict[str, dict[str, str]] = {}
        self._aborted: set[str] = set()  # engine ids ended by Abort
        self._load_watchers: set[asyncio.Event] = set()
        self._draining = False
        self._mailbox: OutputMailbox | None = None  # on the loop attach() runs on, with the engine

    def attach(self, engine: Engine) -> None:
        """Starts serving with a loaded engine (until then requests get UNAVAILABLE)."""
        loop = asyncio.get_running_loop()

        def on_load_change() -> None:
            if not loop.is_closed():  # the engine thread may outlive the loop at shutdown
                loop.call_soon_threadsafe(self._notify_load_change)

        engine.on_load_change = on_load_change
        self._mailbox = OutputMailbox(loop)
        self.engine = engine
        engine.start()
        self._notify_load_change()
        self.metrics.num_requests_running.set_function(lambda: engine.num_running)
        self.metrics.num_requests_waiting.set_function(lambda: engine.num_waiting)

    def load(self) -> tuple[int, int, float]:
        """(running, waiting, KV cache usage) now; zeros while the model loads."""
        engine = self.engine
        return (engine.num_running, engine.num_waiting, engine.kv_cache_usage) if engine else (0, 0, 0.0)

    def _notify_load_change(self) -> None:
        for changed in self._load_watchers:
            changed.set()

    async def watch_load(
        self, min_interval_s: float, heartbeat_s: float = 1.0
    ) -> AsyncIterator[tuple[int, int, float]]:
        """The load at once, then after every change (bursts within `min_interval_s` coalesced into
        one report), and every `heartbeat_s` while nothing changes."""
        changed = asyncio.Event()
        self._load_watchers.add(changed)
        try:
            while not self._draining:  # a draining replica takes no work: its watchers need no load
                changed.clear()  # before reading: a change from here on is reported next time
                yield self.load()
                try:
                    await asyncio.wait_for(changed.wait(), heartbeat_s)
                except TimeoutError:
                    continue
                await asyncio.sleep(min_interval_s)
        finally:
            self._load_watchers.discard(changed)

    async def drain(self, grace_s: float) -> None:
        """Refuses new requests and waits (at most `grace_s`) for running ones to finish."""
        self._draining = True
        self._notify_load_change()  # ends the load watches, which would otherwise hold the server open
        engine = self.engine
        if engine is None:
            return
        engine.stop_accepting()
        deadline = time.monotonic() + grace_s
        while not engine.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def abort(self, request_id: str, tenant: str) -> int:
        """Ends the generations of `request_id` that `tenant` started; returns how many."""
        engine = self.engine
        ids = [e for e, owner in self._active.get(request_id, {}).items() if owner == tenant]
        if engine is not None:
            for engine_id in ids:
                self._aborted.add(engine_id)
                engine.abort(engine_id)
        return len(ids)

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        stop_token_ids: Sequence[int],
        priority: int = 0,
        resumed_token_ids: Sequence[int] = (),
        tenant: str = "",
    ) -> AsyncIterator[GenerationResult]:
        engine, mailbox = self.engine, self._mailbox
        if engine is None or mailbox is None:
            raise UnavailableError("the model is still loading", retry_after_s=2.0)
        outputs: asyncio.Queue[EngineOutput] = asyncio.Queue()
        # client-chosen ids may repeat; the engine needs one that is unique
        engine_id = f"{request_id}#{next(self._sequence)}"
        constraint = None
        if params.constraint is not None:
            # the cheap checks first; then the grammar, off the loop and the engine thread, bounded in time
            engine.validate(prompt_token_ids, params, stop_token_ids, resumed_token_ids, priority)
            if self.grammars is None:
                raise InvalidArgumentError(params.constraint.field, "this replica serves no constrained decoding")
            constraint = await self.grammars.compile_async(params.constraint, resumed_token_ids)
        times = engine.submit(
            engine_id,
            prompt_token_ids,
            params,
            stop_token_ids,
            lambda out: mailbox.post(outputs, out),
            priority,
            resumed_token_ids,
            constraint,
        )
        self._active.setdefault(request_id, {})[engine_id] = tenant
        self.metrics.prompt_tokens.inc(len(prompt_token_ids))
        finish: FinishReason | None = None
        generated = 0
        try:
            while finish is None:
                output = await outputs.get()
                tokens = list(output.token_ids)
                logprobs = list(output.logprobs) if output.logprobs is not None else None
                prompt_logprobs = output.prompt_logprobs
                cached_prompt_tokens = output.cached_prompt_tokens or 0
                finish = output.finish_reason
                while finish is None and not outputs.empty():
                    output = outputs.get_nowait()
                    tokens += output.token_ids
                    cached_prompt_tokens = max(cached_prompt_tokens, output.cached_prompt_tokens or 0)
                    if logprobs is not None and output.logprobs:
                        logprobs += output.logprobs
                    finish = output.finish_reason
                if finish is FinishReason.ERROR:  # this request failed; the replica and its other streams go on
                    raise InternalError(f"internal error (request {request_id})")
                if finish is FinishReason.ABORT and engine_id in self._aborted:
                    raise AbortedError("the request was aborted by its tenant")
                if finish is FinishReason.ABORT:  # the replica stopped: another one can continue the request
                    raise UnavailableError(f"generation ended early: {output.error or finish.value}", retry_after_s=1.0)
                generated += len(tokens)
                self.metrics.generation_tokens.inc(len(tokens))
                yield GenerationResult(
                    tokens, finish, len(prompt_token_ids), logprobs, prompt_logprobs, cached_prompt_tokens
                )
        finally:
            if finish is None:  # the caller went away: free the slot at the next step
                engine.abort(engine_id)
            running = self._active.get(request_id, {})
            running.pop(engine_id, None)
            if not running:
                self._active.pop(request_id, None)
            self._aborted.discard(engine_id)
            self._record(request_id, times, params, len(prompt_token_ids), generated, len(resumed_token_ids))

    def _record(
        self,
        request_id: str,
        times: RequestTimes,
        params: SamplingParams,
        prompt_tokens: int,
        generated: int,
        resumed: int,
    ) -> None:
        # metrics, and the same latencies on the Generate server span. meshserve's own names: the GenAI
        # conventions (v0.1.0) have none for these (vLLM's gen_ai.latency.* never were theirs), and their
        # gen_ai.* attributes belong on the router's GenAI span alone, where tooling sums the usage once
        m = self.metrics
        request_span = trace.get_current_span()
        request_span.set_attribute("meshserve.request_id", request_id)
        request_span.set_attribute("meshserve.model.version", self.metrics.model_version)
        token_times = list(times.token_times)
        if times.scheduled is not None:
            queued = times.scheduled - times.arrival
            m.request_queue_time.observe(queued)
            request_span.set_attribute("meshserve.latency.time_in_queue", queued)
        if token_times:
            ttft, e2e = token_times[0] - times.arrival, token_times[-1] - times.arrival
            m.time_to_first_token.observe(ttft)
            for earlier, later in itertools.pairwise(token_times):
                m.inter_token_latency.observe(later - earlier)
            m.e2e_request_latency.observe(e2e)
            request_span.set_attribute("meshserve.latency.time_to_first_token", ttft)
            request_span.set_attribute("meshserve.latency.e2e", e2e)
        # queue wait, prefill and decode as child spans of the Generate server span
        end = times.finished or time.monotonic()
        spans = [("queue_wait", times.arrival, times.scheduled or end)]
        if times.scheduled is not None:
            spans.append(("prefill", times.scheduled, times.prefill_done or end))
        if times.prefill_done is not None:
            spans.append(("decode", times.prefill_done, end))
        for name, start, stop in spans:
            span = tracer.start_span(name, start_time=_epoch_ns(start))
            if name == "prefill":
                span.set_attribute("meshserve.prompt_tokens", prompt_tokens)
            if name == "decode":
                span.set_attribute("meshserve.completion_tokens", generated)
                span.set_attribute("meshserve.sampling.max_tokens", params.max_tokens)
                span.set_attribute("meshserve.sampling.temperature", params.temperature)
                span.set_attribute("meshserve.sampling.top_p", params.top_p)
                if resumed:  # replayed through decode steps after a failover, not generated again
                    span.set_attribute("meshserve.resumed_tokens", resumed)
            span.end(end_time=_epoch_ns(stop))
