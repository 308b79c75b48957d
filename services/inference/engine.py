"""The inference engine: a slotted KV cache, an iteration-level scheduler loop and sampling.

The engine runs on its own thread because every forward pass blocks; callers hand it requests
and receive outputs through a callback that must be thread-safe. Nothing here knows about gRPC.
"""

from __future__ import annotations

import collections
import os
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import numpy as np

from services.common.errors import InvalidArgumentError, ResourceExhaustedError, UnavailableError
from services.inference.backends.base import DecoderBackend, StepBatch
from services.inference.sampling import (
    MAX_LOGPROBS,
    SamplingParams,
    TokenLogprob,
    apply_penalties,
    sample_token,
    token_logprob,
    validate_sampling,
)

log = logging.getLogger(__name__)


class FinishReason(str, Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclass(frozen=True)
class EngineConfig:
    """Capacity and scheduling bounds of one engine."""

    num_slots: int = 16
    """Requests that can run at once; each owns one KV-cache slot."""
    max_context: int = 2048
    """Tokens per slot (prompt + generated)."""
    max_new_tokens: int = 1024
    """Largest max_tokens a request may ask for."""
    max_waiting: int = 64
    """Requests that may wait for a slot; more are refused with RESOURCE_EXHAUSTED."""
    max_prefill_tokens: int = 512
    """Prompt tokens per prefill step. Longer prompts are prefilled in chunks, and prefill steps
    alternate with decode steps, so a long prompt never stalls running streams for more than one chunk."""
    enable_prefix_caching: bool = True
    """Reuse the KV cache a freed slot still holds when a new prompt starts with the same tokens."""
    min_prefix_hit_tokens: int = 16
    """Shorter common prefixes are not worth choosing a slot for."""
    max_logprobs: int = MAX_LOGPROBS
    """Largest number of top alternatives a request may ask for."""

    def __post_init__(self) -> None:
        if self.num_slots < 1:
            raise ValueError("num_slots must be >= 1")
        if self.max_new_tokens >= self.max_context:
            raise ValueError("max_new_tokens must be smaller than max_context so a prompt fits")
        if self.max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")


@dataclass
class EngineOutput:
    """Tokens produced for one request by one step; `finish_reason` is set on the last one."""

    request_id: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None
    """One per token in token_ids, when the request asked for logprobs."""
    prompt_logprobs: list[TokenLogprob] | None = None
    """For prompt tokens 1..n-1 (the first has no context), on the first output, when asked for."""


@dataclass
class RequestTimes:
    """Monotonic timestamps of a request's life, for metrics and trace spans."""

    arrival: float
    scheduled: float | None = None
    prefill_done: float | None = None
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stop_token_ids: frozenset[int]
    on_output: Callable[[EngineOutput], None]
    times: RequestTimes
    priority: int = 0
    slot: int = -1
    cached: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    rng: np.random.Generator | None = None
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.prompt_token_ids)


class Engine:
    """Continuous batching over a `DecoderBackend`.

    Each loop iteration is one scheduling decision: admit waiting requests into free slots and
    prefill them, otherwise decode one token for every running request. Requests join and leave
    between steps.
    """

    def __init__(self, backend: DecoderBackend, config: EngineConfig) -> None:
        if backend.num_slots != config.num_slots or backend.max_context != config.max_context:
            raise ValueError("backend and engine config disagree on slots or context")
        self.backend = backend
        self.config = config
        self._inbox: queue.SimpleQueue[EngineRequest | None] = queue.SimpleQueue()
        self._aborts: set[str] = set()
        self._lock = threading.Lock()
        self._waiting: collections.deque[EngineRequest] = collections.deque()
        self._running: dict[str, EngineRequest] = {}
        self._free_slots = list(range(config.num_slots - 1, -1, -1))
        # the tokens whose keys/values each slot holds; kept after a request finishes, for prefix caching
        self._slot_tokens: list[list[int]] = [[] for _ in range(config.num_slots)]
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # of which found cached
        self._pending_count = 0  # submitted but not yet taken from the inbox
        self._stopped = False
        self._accepting = True
        self._last_step_decoded = False
        self._thread: threading.Thread | None = None
        self.steps = 0

    # -- public, thread-safe ---------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        self._inbox.put(None)
        if self._thread:
            self._thread.join(timeout=30)

    def stop_accepting(self) -> None:
        """Drain: refuse new requests (UNAVAILABLE, so a router retries elsewhere); running ones finish."""
        self._accepting = False

    @property
    def idle(self) -> bool:
        return not self._running and not self._waiting and self._pending_count == 0

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raises InvalidArgumentError for requests this engine can never serve."""
        c = self.config
        if not prompt_token_ids:
            raise InvalidArgumentError("prompt_token_ids", "the prompt has no tokens")
        vocab = self.backend.config.vocab_size
        if any(t < 0 or t >= vocab for t in prompt_token_ids):
            raise InvalidArgumentError("prompt_token_ids", f"token ids must be in [0, {vocab})")
        validate_sampling(params, c.max_new_tokens, c.max_logprobs)
        if len(prompt_token_ids) + params.max_tokens > c.max_context:
            raise InvalidArgumentError(
                "sampling.max_tokens",
                f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context of {c.max_context} tokens",
            )

    def submit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        stop_token_ids: frozenset[int],
        on_output: Callable[[EngineOutput], None],
        priority: int = 0,
    ) -> RequestTimes:
        """Queues a request; outputs arrive through `on_output` on the engine thread. Waiting
        requests are admitted highest `priority` first, in arrival order within a priority."""
        self.validate(prompt_token_ids, params)
        with self._lock:
            if self._stopped or not self._accepting:
                raise UnavailableError("this replica is draining", retry_after_s=0.1)
            queued = len(self._waiting) + self._pending_count
            free = len(self._free_slots)
            if queued >= free + self.config.max_waiting:
                raise ResourceExhaustedError(
                    f"{queued} requests are already waiting for {self.config.num_slots} slots; retry later",
                    retry_after_s=1.0,
                )
            self._pending_count += 1
        times = RequestTimes(arrival=time.monotonic())
        seed = params.seed if params.seed is not None else int.from_bytes(np.random.bytes(8), "little")
        request = EngineRequest(
            request_id, list(prompt_token_ids), params, stop_token_ids, on_output, times, priority,
            rng=np.random.default_rng(seed),
        )
        self._inbox.put(request)
        return times

    def abort(self, request_id: str) -> None:
        """Removes a request at the next step boundary; its slot is freed."""
        with self._lock:
            self._aborts.add(request_id)
        self._inbox.put(None)  # wake the loop if idle

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + self._pending_count

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - len(self._free_slots) / self.config.num_slots

    # -- engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopped:
            self._drain_inbox(block=not self._running and not self._waiting)
            self._apply_aborts()
            if self._stopped:
                break
            try:
                self._step()
            except Exception:  # a failed step must not hang its requests: end them with an error
                log.exception("engine step failed")
                for request in list(self._running.values()):
                    self._finish(request, FinishReason.ERROR, error="engine step failed")
        for request in list(self._running.values()) + list(self._waiting):
            request.on_output(EngineOutput(request.request_id, [], FinishReason.ABORT, error="engine stopped"))

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(block=block)
            while True:
                if item is not None:
                    with self._lock:
                        self._pending_count -= 1
                        self._enqueue(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _enqueue(self, request: EngineRequest) -> None:
        position = len(self._waiting)
        while position > 0 and self._waiting[position - 1].priority < request.priority:
            position -= 1
        self._waiting.insert(position, request)

    def _apply_aborts(self) -> None:
        with self._lock:
            aborts, self._aborts = self._aborts, set()
        if not aborts:
            return
        for request in [r for r in self._waiting if r.request_id in aborts]:
            self._waiting.remove(request)
            request.on_output(EngineOutput(request.request_id, [], FinishReason.ABORT))
        for request_id in aborts & self._running.keys():
            self._finish(self._running[request_id], FinishReason.ABORT)

    def _admit(self) -> None:
        """Gives free slots to waiting requests, highest priority first; they prefill from the next step."""
        while self._waiting and self._free_slots:
            request = self._waiting.popleft()
            with self._lock:
                slot, hit = self._pick_slot(request.prompt_token_ids)
                self._free_slots.remove(slot)
            if request.params.prompt_logprobs is not None:
                hit = 0  # every prompt position must go through the model to get its logprobs
            request.slot = slot
            # keep at least one prompt token to prefill: its logits give the first generated token
            request.cached = min(hit, len(request.prompt_token_ids) - 1)
            if self.config.enable_prefix_caching:
                self.prefix_cache_queries += len(request.prompt_token_ids)
                self.prefix_cache_hits += request.cached
            request.times.scheduled = time.monotonic()
            self._running[request.request_id] = request

    def _pick_slot(self, prompt: list[int]) -> tuple[int, int]:
        """The free slot whose retained tokens share the longest prefix with `prompt`, and that length."""
        best_slot, best = self._free_slots[-1], 0
        if self.config.enable_prefix_caching:
            for slot in self._free_slots:
                held = self._slot_tokens[slot]
                common = len(os.path.commonprefix([held, prompt])) if held else 0
                if common > best:
                    best_slot, best = slot, common
        if best < self.config.min_prefix_hit_tokens:
            # no useful hit: take the slot holding the least, so long cached prefixes survive longest
            return min(self._free_slots, key=lambda s: len(self._slot_tokens[s])), 0
        return best_slot, best

    def _plan(self) -> tuple[list[EngineRequest], list[list[int]]]:
        """One scheduling decision: a prefill chunk step or a decode step.

        Prefill steps take at most `max_prefill_tokens` prompt tokens (oldest admissions first) and
        alternate with decode steps while streams are decoding, which bounds their inter-token stall."""
        prefilling = [r for r in self._running.values() if r.prefilling]
        decoding = [r for r in self._running.values() if not r.prefilling]
        if prefilling and (not decoding or self._last_step_decoded):
            self._last_step_decoded = False
            rows, chunks, budget = [], [], self.config.max_prefill_tokens
            for request in prefilling:
                take = min(len(request.prompt_token_ids) - request.cached, budget)
                if take <= 0:
                    break
                rows.append(request)
                chunks.append(request.prompt_token_ids[request.cached : request.cached + take])
                budget -= take
            return rows, chunks
        self._last_step_decoded = True
        return decoding, [r.output_token_ids[-1:] for r in decoding]

    def _step(self) -> None:
        self._admit()
        rows, chunks = self._plan()
        if not rows:
            return
        seq = max(len(x) for x in chunks)
        input_ids = np.zeros((len(rows), seq), np.int64)
        for i, tokens in enumerate(chunks):
            input_ids[i, : len(tokens)] = tokens
        new_lengths = np.array([len(x) for x in chunks], np.int64)
        # logits for every chunk position only when someone asked for prompt logprobs
        wants_prompt = [r.params.prompt_logprobs is not None and r.prefilling for r in rows]
        n_logits = seq if any(wants_prompt) else 1
        logits_indices = np.minimum(np.arange(n_logits)[None, :], (new_lengths - 1)[:, None])
        if n_logits == 1:
            logits_indices = (new_lengths - 1)[:, None]
        # (with several positions, a row's last column is its last real token: padding repeats it)
        batch = StepBatch(
            slots=np.array([r.slot for r in rows], np.int64),
            input_ids=input_ids,
            cached_lengths=np.array([r.cached for r in rows], np.int64),
            new_lengths=new_lengths,
            logits_indices=logits_indices,
        )
        logits = self.backend.forward(batch)
        self.steps += 1
        now = time.monotonic()
        for i, request in enumerate(rows):
            n = int(new_lengths[i])
            if wants_prompt[i]:
                self._record_prompt_logprobs(request, logits[i], n)
            request.cached += n
            if request.prefilling:
                continue  # a chunk of a longer prompt: nothing to sample yet
            if request.times.prefill_done is None:
                request.times.prefill_done = now
            self._sample(request, logits[i, -1], now)  # the last requested position is the chunk's last token

    def _record_prompt_logprobs(self, request: EngineRequest, row_logits: np.ndarray, n: int) -> None:
        # logits at chunk position j predict prompt token cached + j + 1
        prompt = request.prompt_token_ids
        for j in range(n):
            target = request.cached + j + 1
            if target < len(prompt):
                request.prompt_logprobs.append(token_logprob(row_logits[j], prompt[target], request.params.prompt_logprobs))

    def _sample(self, request: EngineRequest, raw: np.ndarray, now: float) -> None:
        params = request.params
        adjusted = apply_penalties(raw, params, request.prompt_token_ids, request.output_token_ids, request.stop_token_ids)
        token = sample_token(adjusted, params, request.rng)
        request.output_token_ids.append(token)
        request.times.token_times.append(now)
        logprobs = [token_logprob(raw, token, params.logprobs)] if params.logprobs is not None else None
        prompt_logprobs = None
        if len(request.output_token_ids) == 1 and params.prompt_logprobs is not None:
            prompt_logprobs = request.prompt_logprobs
        finish = None
        if token in request.stop_token_ids:
            finish = FinishReason.STOP
        elif len(request.output_token_ids) >= params.max_tokens or request.cached + 1 >= self.config.max_context:
            finish = FinishReason.LENGTH
        output = EngineOutput(request.request_id, [token], logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        if finish is None:
            request.on_output(output)
        else:
            self._finish(request, finish, output)

    def _finish(self, request: EngineRequest, reason: FinishReason, last: EngineOutput | None = None, error: str | None = None) -> None:
        self._running.pop(request.request_id, None)
        # what the slot's cache now holds: the prompt and output tokens whose keys/values were written
        held = (request.prompt_token_ids + request.output_token_ids)[: request.cached]
        self._slot_tokens[request.slot] = held if reason in (FinishReason.STOP, FinishReason.LENGTH, FinishReason.ABORT) else []
        request.times.finished = time.monotonic()
        with self._lock:
            self._free_slots.append(request.slot)
        request.slot = -1
        output = last or EngineOutput(request.request_id, [])
        output.finish_reason, output.error = reason, error
        request.on_output(output)
