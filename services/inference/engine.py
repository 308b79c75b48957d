"""The inference engine: a slotted KV cache, an iteration-level scheduler loop and sampling.

The engine runs on its own thread because every forward pass blocks; callers hand it requests
and receive outputs through a callback that must be thread-safe. Nothing here knows about gRPC.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from services.common.contract import EngineLimits, SamplingParams, validate_generation
from services.common.errors import ResourceExhaustedError, UnavailableError
from services.common.finish import FinishReason
from services.inference.backends.base import DecoderBackend, StepBatch
from services.inference.constraints import RowConstraint
from services.inference.sampling import (
    TokenLogprob,
    apply_logit_bias,
    apply_penalties,
    sample_token,
    token_logprob,
    token_logprobs,
)

log = logging.getLogger(__name__)


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
    max_prefill_tokens: int = 128
    """Prompt tokens per step while no request is decoding. Longer prompts are prefilled in chunks."""
    max_num_batched_tokens: int = 48
    """Tokens per step while requests are decoding (as vLLM's option of that name): every decode row
    takes one, prefill chunks share what is left, never less than `min_prefill_tokens` (so waiting
    prompts always advance). Decode rows and prefill chunks run in one step, so a long prompt raises
    the streams' inter-token time by the cost of its share instead of stalling them for a whole chunk
    (bench/long_prompt_itl.py measures it)."""
    min_prefill_tokens: int = 16
    """The prefill share of a step that decode rows fill up."""
    num_speculative_tokens: int = 4
    """Draft tokens per decode row, guessed by prompt lookup (the tokens that followed the last earlier
    occurrence of the row's latest n-gram in its prompt and output) and checked in the same step: each
    accepted draft is a token gained without a step of its own. The text does not change: every position
    is sampled as without drafts (same logits, same random draws), a draft only survives if it equals
    that token. 0 disables (docs/benchmarks.md has what it gains at one stream)."""
    speculative_max_rows: int = 2
    """Rows a step may decode and still draft for: drafts pay where a step is bound by reading the
    weights (few rows), not where it computes (many)."""
    enable_prefix_caching: bool = True
    """Reuse keys and values already computed for the same leading prompt tokens: those a freed slot
    still holds, or, copied into the new request's slot, those of any other slot (a running request's
    prompt too: once a system prompt is computed, later requests copy it instead of prefilling it;
    requests admitted together before that each prefill it). Only positions a prefill computed are reused
    (a previous prompt, not its generated answer): see `Engine` on why every position is computed the
    same way whatever the cache held."""
    min_prefix_hit_tokens: int = 16
    """Shorter common prefixes are not worth choosing a slot for."""

    def __post_init__(self) -> None:
        if self.num_slots < 1:
            raise ValueError("num_slots must be >= 1")
        if self.max_new_tokens >= self.max_context:
            raise ValueError("max_new_tokens must be smaller than max_context so a prompt fits")
        if self.max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")
        if min(self.max_prefill_tokens, self.min_prefill_tokens) < 4:
            raise ValueError(
                "max_prefill_tokens and min_prefill_tokens must be >= 4 (a chunk and its rest both keep >= 2 tokens)"
            )
        if self.num_speculative_tokens < 0 or self.speculative_max_rows < 0:
            raise ValueError("num_speculative_tokens and speculative_max_rows must be >= 0")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")


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
    cached_prompt_tokens: int | None = None
    """Prompt positions taken from the prefix cache, on the first output that carries a token."""


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
    on_output: Callable[[EngineOutput], object]  # its return value is ignored
    times: RequestTimes
    priority: int = 0
    slot: int = -1
    num_computed_tokens: int = 0
    """Positions whose keys/values the slot holds: prompt prefix from the cache, prefilled chunks, decoded tokens."""
    num_cached_prompt_tokens: int = 0
    """Of the prompt, positions taken from the prefix cache at admission instead of prefilled."""
    output_token_ids: list[int] = field(default_factory=list)
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    resumed_token_ids: list[int] = field(default_factory=list)
    """Tokens generated by an earlier attempt: replayed as this request's first outputs, not emitted."""
    draft: list[int] = field(default_factory=list)
    """Speculative tokens after the last output, in this step's chunk (see EngineConfig.num_speculative_tokens)."""
    constraint: RowConstraint | None = None
    """The grammar state of a constrained request (compiled before submit, services/inference/constraints.py)."""

    @property
    def prefilling(self) -> bool:
        return self.num_computed_tokens < len(self.prompt_token_ids)


class Engine:
    """Continuous batching over a `DecoderBackend`.

    Each loop iteration is one scheduling decision: admit waiting requests into free slots, then
    one step that decodes a token for every decoding request and prefills prompt chunks beside them
    (a mixed, packed batch under a token budget). Requests join and leave between steps.

    Greedy output depends on the request alone, not on the batch, the chunking, the drafts or the cache.
    The backends compute a row independently of the other rows of its step and of where a prompt is
    split into chunks. Where a row with one new token takes other kernels than a longer one (int4's
    projections, the attention of older graphs; by tenths of a logit), the backend says so
    (`mixed_steps` False) and decode and prefill steps alternate. And every prompt position is computed
    by a prefill of >= 2 tokens (no chunk and no uncached rest is a single token, and the prefix cache
    reuses only prefill-computed positions), every generated position by a decode row, including the
    tokens a resumed request replays.
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
        self.prefix_copies = 0  # prefixes copied from another slot
        self.speculative_accepted = 0  # drafted tokens that were the sampled ones
        self.speculative_rejected = 0
        self._pending_count = 0  # submitted but not yet taken from the inbox
        self._stopped = False
        self._accepting = True
        self._last_step_decoded = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.on_load_change: Callable[[], None] = lambda: None
        """Called (on the submitting or the engine thread) when a request arrives, is admitted to a
        slot, or finishes."""

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

    def validate(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        stop_token_ids: Sequence[int] = (),
        resumed_token_ids: Sequence[int] = (),
        priority: int = 0,
    ) -> None:
        """Raises InvalidArgumentError for requests this engine can never serve (the request contract,
        services/common/contract.py, with this engine's vocabulary and context)."""
        limits = EngineLimits(self.backend.config.vocab_size, self.config.max_context, self.config.max_new_tokens)
        validate_generation(limits, prompt_token_ids, params, stop_token_ids, resumed_token_ids, priority)

    def submit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        stop_token_ids: Sequence[int],
        on_output: Callable[[EngineOutput], object],
        priority: int = 0,
        resumed_token_ids: Sequence[int] = (),
        constraint: RowConstraint | None = None,
    ) -> RequestTimes:
        """Queues a request; outputs arrive through `on_output` on the engine thread. Waiting
        requests are admitted highest `priority` first, in arrival order within a priority.
        `resumed_token_ids` continue an interrupted generation: they count as its first outputs.
        `constraint` is the compiled `params.constraint` (compiled off this thread, before submitting)."""
        self.validate(prompt_token_ids, params, list(stop_token_ids), resumed_token_ids, priority)
        if (params.constraint is None) != (constraint is None):
            raise ValueError("a constrained request needs its compiled constraint, and only it has one")
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
        self.on_load_change()
        times = RequestTimes(arrival=time.monotonic())
        seed = params.seed if params.seed is not None else int.from_bytes(np.random.bytes(8), "little")
        request = EngineRequest(
            request_id,
            list(prompt_token_ids),
            params,
            frozenset(stop_token_ids),
            on_output,
            times,
            priority,
            rng=np.random.default_rng(seed),
            resumed_token_ids=list(resumed_token_ids),
            constraint=constraint,
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
        # the fraction of KV positions in use (vLLM's kv_cache_usage_perc), not of slots: over every slot's
        # max_context, what running requests hold, their whole prompt from admission on (as vLLM allocates
        # a prompt's blocks when it schedules it), so the load report sent at admission already counts it.
        # Read from other threads: list() copies the running requests without releasing the GIL, so the
        # engine thread cannot change the dict under it
        used = sum(
            max(request.num_computed_tokens, len(request.prompt_token_ids)) for request in list(self._running.values())
        )
        return min(1.0, used / (self.config.num_slots * self.config.max_context))

    # -- engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopped:
            self._drain_inbox(block=not self._running and not self._waiting)
            self._apply_aborts()
            if self._stopped:
                break
            try:
                self._step()
            except Exception:  # not attributable to a request (those fail alone, in _step): end them all
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
        aborted_waiting = [r for r in self._waiting if r.request_id in aborts]
        for request in aborted_waiting:
            self._waiting.remove(request)
            request.on_output(EngineOutput(request.request_id, [], FinishReason.ABORT))
        if aborted_waiting:
            self.on_load_change()
        for request_id in aborts & self._running.keys():
            self._finish(self._running[request_id], FinishReason.ABORT)

    def _admit(self) -> None:
        """Gives free slots to waiting requests, highest priority first; they prefill from the next step."""
        admitted = bool(self._waiting and self._free_slots)
        while self._waiting and self._free_slots:
            request = self._waiting.popleft()
            # prompt logprobs need every prompt position through the model: no cache to look up
            use_cache = self.config.enable_prefix_caching and request.params.prompt_logprobs is None
            slot, hit = self._pick_slot(request.prompt_token_ids, use_cache)  # only this thread changes _free_slots
            with self._lock:
                self._free_slots.remove(slot)
            if use_cache:
                try:
                    hit = self._share_prefix(request.prompt_token_ids, slot, hit)
                except Exception:  # a failed copy costs a prefill, nothing else
                    log.exception("request %s: copying a cached prefix failed; prefilling it", request.request_id)
            request.slot = slot
            # keep at least two prompt tokens to prefill: their logits give the first generated
            # token, and a single one would take the decode kernels (see the class docstring)
            request.num_computed_tokens = max(0, min(hit, len(request.prompt_token_ids) - 2))
            request.num_cached_prompt_tokens = request.num_computed_tokens
            if use_cache:
                self.prefix_cache_queries += len(request.prompt_token_ids)
                self.prefix_cache_hits += request.num_computed_tokens
            request.times.scheduled = time.monotonic()
            self._running[request.request_id] = request
        if admitted:  # a load report read during this pass may have missed the moving requests
            self.on_load_change()

    def _pick_slot(self, prompt: list[int], use_cache: bool) -> tuple[int, int]:
        """The free slot whose retained tokens share the longest prefix with `prompt`, and that length
        (without `use_cache`: the slot holding the least, so cached prefixes survive)."""
        best_slot, best = self._free_slots[-1], 0
        if use_cache:
            for slot in self._free_slots:
                held = self._slot_tokens[slot]
                common = len(os.path.commonprefix([held, prompt])) if held else 0
                if common > best:
                    best_slot, best = slot, common
        if best < self.config.min_prefix_hit_tokens:
            # no useful hit: take the slot holding the least, so long cached prefixes survive longest
            return min(self._free_slots, key=lambda s: len(self._slot_tokens[s])), 0
        return best_slot, best

    def _share_prefix(self, prompt: list[int], slot: int, hit: int) -> int:
        """Copies into `slot` the longest prefix of `prompt` that a running request's slot holds, when
        that beats the `hit` the slot itself has; returns the prefix length now in `slot`. (Free slots
        need no look: `_pick_slot` already took the free slot with the longest one.)"""
        best_slot, best = -1, hit
        for request in self._running.values():
            # only what its prefill computed: `num_computed_tokens` runs past the prompt while it decodes
            common = min(len(os.path.commonprefix([request.prompt_token_ids, prompt])), request.num_computed_tokens)
            if common > best:
                best_slot, best = request.slot, common
        # the last two prompt tokens are prefilled anyway; a short copy is not worth it
        usable = min(best, len(prompt) - 2)
        if best_slot < 0 or usable < self.config.min_prefix_hit_tokens or usable <= hit:
            return hit
        self.backend.copy_prefix(best_slot, slot, usable)
        self.prefix_copies += 1
        return usable

    def _plan(self) -> tuple[list[EngineRequest], list[list[int]]]:
        """One scheduling decision: every decoding request's next token, and prompt chunks of the
        prefilling ones (oldest admissions first) in the same step, within the step's token budget."""
        decoding = [r for r in self._running.values() if not r.prefilling]
        if decoding and not self.backend.mixed_steps:
            # a backend whose decode rows round differently beside prefill: alternate the two kinds of step
            prefill_waits = len(decoding) < len(self._running)
            self._last_step_decoded = not (prefill_waits and self._last_step_decoded)
            if self._last_step_decoded:
                return decoding, [r.output_token_ids[-1:] for r in decoding]
            decoding = []
        c = self.config
        # (a backend without mixed steps never gets here with decode rows)
        speculate = c.num_speculative_tokens > 0 and len(decoding) <= c.speculative_max_rows
        for request in decoding:
            request.draft = self._draft(request) if speculate else []
        rows, chunks = list(decoding), [r.output_token_ids[-1:] + r.draft for r in decoding]
        budget = c.max_prefill_tokens
        if decoding:
            budget = min(budget, max(c.max_num_batched_tokens - len(decoding), c.min_prefill_tokens))
        for request in self._running.values():
            if not request.prefilling:
                continue
            rest = len(request.prompt_token_ids) - request.num_computed_tokens
            take = min(rest, budget)
            if take < rest:  # a chunk of a longer prompt: neither it nor what is left is one token
                take = min(take, rest - 2)
            if take < min(2, rest):
                break
            rows.append(request)
            chunks.append(request.prompt_token_ids[request.num_computed_tokens : request.num_computed_tokens + take])
            budget -= take
        return rows, chunks

    def _draft(self, request: EngineRequest) -> list[int]:
        """Prompt lookup: the tokens that followed the latest earlier occurrence of the last 3 (else 2)
        tokens of prompt + output, bounded by the tokens the request may still generate and its slot."""
        if len(request.output_token_ids) < len(request.resumed_token_ids):
            return []  # replaying: those positions are decoded one by one, as they were first
        room = min(
            self.config.num_speculative_tokens,
            request.params.max_tokens - len(request.output_token_ids) - 1,
            self.config.max_context - request.num_computed_tokens - 1,
        )
        if room <= 0:
            return []
        history = request.prompt_token_ids + request.output_token_ids
        for n in (3, 2):
            if len(history) <= n:
                continue
            tail, last = history[-n:], history[-1]
            for start in range(len(history) - n - 1, -1, -1):
                # the cheap test first: most positions fail on the n-gram's last token, without a slice
                if history[start + n - 1] == last and history[start : start + n] == tail:
                    return history[start + n : start + n + room]
        return []

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
        # logits for every chunk position of the rows that asked for prompt logprobs or carry drafts,
        # of the last position for the others; a row's last column is its last real token (padding repeats it)
        wants_prompt = [r.params.prompt_logprobs is not None and r.prefilling for r in rows]
        wants_all = np.array([w or bool(r.draft) for w, r in zip(wants_prompt, rows)])
        n_logits = int(new_lengths[wants_all].max()) if wants_all.any() else 1
        last = (new_lengths - 1)[:, None]
        logits_indices = np.where(wants_all[:, None], np.minimum(np.arange(n_logits)[None, :], last), last)
        batch = StepBatch(
            slots=np.array([r.slot for r in rows], np.int64),
            input_ids=input_ids,
            cached_lengths=np.array([r.num_computed_tokens for r in rows], np.int64),
            new_lengths=new_lengths,
            logits_indices=logits_indices,
        )
        results = self._forward(rows, batch)
        self.steps += 1
        now = time.monotonic()
        for i, request, row_logits in results:
            try:
                self._advance(request, row_logits, int(new_lengths[i]), wants_prompt[i], now)
            except Exception:  # a fault of this request (its sampling, stops, logprobs): it fails alone
                self._fail(request, "processing its step's output")

    def _forward(self, rows: list[EngineRequest], batch: StepBatch) -> list[tuple[int, EngineRequest, np.ndarray]]:
        """(row index, request, its logits) of every row the step computed. When the batch fails, each
        row is run alone (rows are computed independently, so a row's logits are the same alone or
        batched): a row that fails again is the culprit and fails alone; the others go on."""
        try:
            return [
                (i, request, row_logits)
                for (i, request), row_logits in zip(enumerate(rows), self.backend.forward(batch))
            ]
        except Exception:
            if len(rows) == 1:
                self._fail(rows[0], "its forward step")
                return []
            log.exception("a forward step of %d rows failed; running its rows one by one", len(rows))
        results = []
        for i, request in enumerate(rows):
            try:
                results.append((i, request, self.backend.forward(batch.row(i))[0]))
            except Exception:
                self._fail(request, "its forward step")
        return results

    def _fail(self, request: EngineRequest, stage: str) -> None:
        # the request id and the stage, never the prompt
        log.exception("request %s failed in %s", request.request_id, stage)
        self._finish(request, FinishReason.ERROR, error="internal error")

    def _advance(self, request: EngineRequest, row_logits: np.ndarray, n: int, wants_prompt: bool, now: float) -> None:
        """Takes one row's step result: prompt logprobs, the new position count, and a sampled token
        once the prompt is complete."""
        if wants_prompt:
            self._record_prompt_logprobs(request, row_logits, n)
        request.num_computed_tokens += n
        if request.prefilling:
            return  # a chunk of a longer prompt: nothing to sample yet
        if request.times.prefill_done is None:
            request.times.prefill_done = now
        if request.draft:
            self._verify(request, row_logits, n, now)
            return
        self._sample(request, row_logits[-1], now)  # the last requested position is the chunk's last token

    def _verify(self, request: EngineRequest, row_logits: np.ndarray, n: int, now: float) -> None:
        """A decode row with drafts: positions are sampled in order, as without drafts, while the token
        sampled equals the next draft; positions after the first disagreement are not kept."""
        draft, request.draft = request.draft, []
        request.num_computed_tokens -= n - 1  # the last output's position; each accepted draft adds one
        for position in range(n):
            self._sample(request, row_logits[position], now)
            if request.request_id not in self._running or position == n - 1:
                return  # finished (stop, length), or no draft left to check
            if request.output_token_ids[-1] != draft[position]:
                self.speculative_rejected += n - 1 - position
                return
            request.num_computed_tokens += 1
            self.speculative_accepted += 1

    def _record_prompt_logprobs(self, request: EngineRequest, row_logits: np.ndarray, n: int) -> None:
        # logits at chunk position j predict prompt token num_computed_tokens + j + 1
        targets = request.prompt_token_ids[request.num_computed_tokens + 1 : request.num_computed_tokens + n + 1]
        assert request.params.prompt_logprobs is not None  # only requests that asked for them get here
        request.prompt_logprobs += token_logprobs(row_logits[: len(targets)], targets, request.params.prompt_logprobs)

    def _sample(self, request: EngineRequest, raw: np.ndarray, now: float) -> None:
        params = request.params
        logits, guide = raw, request.constraint
        if params.logit_bias or guide is not None:  # only these rows pay: a free row's logits go on as they are
            logits = apply_logit_bias(raw, params)
            if guide is not None:
                logits = guide.apply(logits)
        adjusted = apply_penalties(
            logits, params, request.prompt_token_ids, request.output_token_ids, request.stop_token_ids
        )
        token = sample_token(adjusted, params, request.rng)  # also when replaying: the seeded RNG advances alike
        done = len(request.output_token_ids)
        if done < len(request.resumed_token_ids):
            request.output_token_ids.append(request.resumed_token_ids[done])  # validation keeps it short of max_tokens
            if guide is not None:  # the grammar state follows the replayed tokens, as it followed the originals
                guide.accept(request.resumed_token_ids[done])
            return
        if guide is not None:
            guide.accept(token)
        request.output_token_ids.append(token)
        request.times.token_times.append(now)
        logprobs = [token_logprob(raw, token, params.logprobs)] if params.logprobs is not None else None
        prompt_logprobs = cached_prompt_tokens = None
        if len(request.output_token_ids) == len(request.resumed_token_ids) + 1:  # the first token sent
            cached_prompt_tokens = request.num_cached_prompt_tokens
            if params.prompt_logprobs is not None:
                prompt_logprobs = request.prompt_logprobs
        finish = None
        if token in request.stop_token_ids or (guide is not None and guide.done):  # done: the grammar is complete
            finish = FinishReason.STOP
        elif len(request.output_token_ids) >= params.max_tokens:  # validate() keeps prompt + max_tokens in the context
            finish = FinishReason.LENGTH
        output = EngineOutput(
            request.request_id,
            [token],
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            cached_prompt_tokens=cached_prompt_tokens,
        )
        if finish is None:
            request.on_output(output)
        else:
            self._finish(request, finish, output)

    def _finish(
        self, request: EngineRequest, reason: FinishReason, last: EngineOutput | None = None, error: str | None = None
    ) -> None:
        self._running.pop(request.request_id, None)
        # what a later prompt may reuse: the prompt positions written (by prefill) to the slot's cache
        held = request.prompt_token_ids[: request.num_computed_tokens]
        self._slot_tokens[request.slot] = (
            held if reason in (FinishReason.STOP, FinishReason.LENGTH, FinishReason.ABORT) else []
        )
        request.times.finished = time.monotonic()
        with self._lock:
            self._free_slots.append(request.slot)
        request.slot = -1
        output = last or EngineOutput(request.request_id, [])
        output.finish_reason, output.error = reason, error
        request.on_output(output)
        self.on_load_change()
