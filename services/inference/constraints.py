"""Grammar-constrained decoding with llguidance: a request's constraint compiled into a matcher that
masks its logits at every step (docs/structured-outputs.md says why llguidance, with the measurements).

The split of work keeps the engine loop and the free rows out of it:

- `GrammarCompiler.compile_async` compiles a constraint before the request is queued, on a thread of its
  own and bounded in time (llguidance's own fuel limits, then a wall-clock timeout): a constraint that
  does not compile, or too slowly, is an `InvalidArgumentError` naming its field, and the engine never
  sees it. Compiled grammars are cached (a pristine matcher per constraint, copied for each request), and
  so are refusals, so a repeated hostile schema costs a dictionary lookup.
- `RowConstraint` is one request's matcher. The engine calls `apply` on its row's logits before sampling
  and `accept` with the token it chose (or replays); `accept` starts computing the next mask at once on a
  worker thread (llguidance releases the GIL), so it overlaps the next forward pass. Rows without a
  constraint never touch any of this.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import logging
import threading
from collections.abc import Sequence
from typing import Any

import llguidance
import llguidance.numpy as llnp
import numpy as np

from services.common.contract import Constraint
from services.common.errors import InvalidArgumentError

log = logging.getLogger(__name__)

COMPILE_TIMEOUT_S = 2.0
"""Wall-clock bound of one compilation; llguidance's fuel limits (below) usually stop a hostile one first."""
CACHE_ENTRIES = 256
"""Compiled constraints kept (and as many refusals)."""


def parser_limits() -> llguidance.LLParserLimits:
    """llguidance's work bounds, which make compilation and every mask bounded in work, not only in time."""
    return llguidance.LLParserLimits(
        # building the lexer's regexes (~50k fuel per ms): about 20 ms of work, then the grammar is refused
        initial_lexer_fuel=1_000_000,
        # per mask: lexer work (~14k per ms) and Earley items (~20k per ms), a few ms at most per row and step
        step_lexer_fuel=100_000,
        step_max_items=50_000,
        max_grammar_size=200_000,
    )


class ConstraintError(Exception):
    """A token the grammar does not allow was fed to a matcher (a bug, or a forged resumed token)."""


def _lark_string(text: str) -> str:
    # a Lark string literal: llguidance reads JSON's escapes in it
    return json.dumps(text, ensure_ascii=False)


def grammar_of(constraint: Constraint) -> str:
    """The llguidance grammar (its JSON form) of a constraint. JSON comes without optional whitespace: a
    small model would otherwise fill the output with newlines."""
    json_options: Any = {"whitespace_flexible": False}
    m = llguidance.LLMatcher
    if constraint.kind == "json_schema":
        return m.grammar_from_json_schema(constraint.spec, defaults=json_options)
    if constraint.kind == "json_object":
        return m.grammar_from_json_schema({"type": "object"}, defaults=json_options)
    if constraint.kind == "regex":
        return m.grammar_from_regex(constraint.spec)
    if constraint.kind == "choice":
        return m.grammar_from_lark("start: " + " | ".join(_lark_string(c) for c in constraint.choices))
    if constraint.kind == "grammar":
        return m.grammar_from_lark(constraint.spec)
    raise InvalidArgumentError("sampling.constraint", f"unknown constraint {constraint.kind!r}")


def _first_line(message: str, limit: int = 300) -> str:
    return " ".join(message.split())[:limit]


class RowConstraint:
    """One request's grammar state: masks its logits and follows the tokens it generates."""

    def __init__(self, matcher: Any, vocab_size: int, pool: concurrent.futures.Executor) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._pool = pool
        self._bitmask = llnp.allocate_token_bitmask(1, vocab_size)
        self._pending: concurrent.futures.Future[None] | None = None
        self._done = bool(matcher.is_stopped())
        self._prefetch()

    def _compute(self) -> None:
        llnp.fill_next_token_bitmask(self._matcher, self._bitmask, 0)

    def _prefetch(self) -> None:
        self._pending = self._pool.submit(self._compute)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """`logits` [vocab] with every token the grammar does not allow next at -inf (a new array)."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        else:
            self._compute()
        allowed = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")[: logits.shape[0]].view(bool)
        return np.where(allowed, logits, np.float32(-np.inf)).astype(np.float32, copy=False)

    def accept(self, token: int) -> None:
        """Advances the grammar by the token generated (or replayed); raises ConstraintError if it is not
        allowed. The next mask starts computing at once, during the next forward pass: from then on only
        the worker touches the matcher (it is not shareable while it computes), until `apply` waits for it."""
        if self._pending is not None:  # the mask of the state being left (unused when replaying)
            self._pending.result()
            self._pending = None
        if not self._matcher.consume_token(token) or self._matcher.is_error():
            # the token id only: llguidance's message quotes the output, which stays out of the logs
            raise ConstraintError(f"the grammar does not allow token {token} here")
        self._done = bool(self._matcher.is_stopped())
        if not self._done:
            self._prefetch()

    @property
    def done(self) -> bool:
        """The output is complete: the grammar allows nothing more (the request finishes with STOP). Read
        from the last `accept`, never from the matcher, which the worker may be computing with."""
        return self._done


class GrammarCompiler:
    """Compiles constraints for one tokenizer, caching the results; thread-safe."""

    def __init__(
        self,
        tokenizer_json: str,
        eos_token_ids: Sequence[int],
        vocab_size: int,
        timeout_s: float = COMPILE_TIMEOUT_S,
        cache_entries: int = CACHE_ENTRIES,
    ) -> None:
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_token_ids))
        self.vocab_size = vocab_size
        self.timeout_s = timeout_s
        self.cache_entries = cache_entries
        self._limits = parser_limits()
        self._lock = threading.Lock()
        self._compiled: collections.OrderedDict[Constraint, Any] = collections.OrderedDict()
        self._refused: collections.OrderedDict[Constraint, InvalidArgumentError] = collections.OrderedDict()
        # compilations run here; at most two at once, so hostile schemas cannot take every core
        self._compile_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="grammar-compile")
        # the next-token masks of every constrained row, computed while the engine runs its forward pass
        self._mask_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        self.compilations = 0
        """Constraints compiled (cache misses), for tests and metrics."""

    def _pristine(self, constraint: Constraint) -> Any:
        """A matcher at the grammar's start (cached), or InvalidArgumentError naming the constraint's field."""
        with self._lock:
            if constraint in self._compiled:
                self._compiled.move_to_end(constraint)
                return self._compiled[constraint]
            if constraint in self._refused:
                raise self._refused[constraint]
        try:
            matcher = self._build(constraint)
        except InvalidArgumentError as refusal:
            with self._lock:
                self._refused[constraint] = refusal
                while len(self._refused) > self.cache_entries:
                    self._refused.popitem(last=False)
            raise
        with self._lock:
            self._compiled[constraint] = matcher
            while len(self._compiled) > self.cache_entries:
                self._compiled.popitem(last=False)
        return matcher

    def _build(self, constraint: Constraint) -> Any:
        field = constraint.field
        self.compilations += 1
        try:
            grammar = grammar_of(constraint)
        except (ValueError, TypeError) as error:
            raise InvalidArgumentError(field, f"does not compile: {_first_line(str(error))}") from None
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=self._limits)
        if matcher.is_error():
            raise InvalidArgumentError(field, f"does not compile: {_first_line(matcher.get_error())}")
        # a grammar that allows no first token (a $ref to itself, an empty enum) can produce nothing
        probe = matcher.deep_copy()
        mask = llnp.allocate_token_bitmask(1, self.vocab_size)
        llnp.fill_next_token_bitmask(probe, mask, 0)
        if probe.is_error():
            raise InvalidArgumentError(field, f"does not compile: {_first_line(probe.get_error())}")
        if not mask.any():
            raise InvalidArgumentError(field, "allows no output at all")
        return matcher

    def compile(self, constraint: Constraint, resumed_token_ids: Sequence[int] = ()) -> RowConstraint:
        """A request's matcher, at the grammar's start (blocking; `compile_async` bounds it in time).
        `resumed_token_ids` are checked against the grammar (a copy of the matcher consumes them): the
        engine replays them through the request's own matcher, so a stream resumed after a failover
        continues in the same grammar state."""
        pristine = self._pristine(constraint)
        if resumed_token_ids:
            check = pristine.deep_copy()
            if not check.consume_tokens(list(resumed_token_ids)):
                raise InvalidArgumentError("resumed_token_ids", f"the {constraint.kind} does not allow these tokens")
        return RowConstraint(pristine.deep_copy(), self.vocab_size, self._mask_pool)

    async def compile_async(self, constraint: Constraint, resumed_token_ids: Sequence[int] = ()) -> RowConstraint:
        """`compile` on the compile threads, at most `timeout_s`: past it, INVALID_ARGUMENT naming the field
        (the compilation may still finish in the background; its result is cached then)."""
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self._compile_pool, self.compile, constraint, tuple(resumed_token_ids))
        # a compilation that outlives its caller still ends here: its refusal is retrieved, not logged
        work.add_done_callback(lambda done: done.cancelled() or done.exception())
        try:
            return await asyncio.wait_for(asyncio.shield(work), self.timeout_s)
        except TimeoutError:
            log.warning("a %s constraint took more than %.1f s to compile; refused", constraint.kind, self.timeout_s)
            raise InvalidArgumentError(
                constraint.field, f"took more than {self.timeout_s:g} s to compile; simplify it"
            ) from None

    def close(self) -> None:
        self._compile_pool.shutdown(wait=False, cancel_futures=True)
        self._mask_pool.shutdown(wait=False, cancel_futures=True)
