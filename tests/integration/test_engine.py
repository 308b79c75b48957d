"""The engine on the real model without gRPC: batching equivalence, abort, capacity, validation."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable

import pytest

from services.common.contract import SamplingParams
from services.common.errors import InvalidArgumentError, ResourceExhaustedError
from services.common.finish import FinishReason
from services.inference.backends.onnxruntime import OnnxRuntimeBackend
from services.inference.engine import Engine, EngineConfig
from tests.integration.conftest import Collector


@pytest.fixture(scope="module")
def engine(model_dir):
    config = EngineConfig(num_slots=4, max_context=256, max_new_tokens=64, max_waiting=2)
    engine = Engine(OnnxRuntimeBackend(model_dir, config.num_slots, config.max_context), config)
    engine.start()
    yield engine
    engine.stop()


def run_all(engine: Engine, prompts: dict[str, list[int]], params: SamplingParams) -> Collector:
    collector = Collector()
    collector.expected = len(prompts)
    for request_id, ids in prompts.items():
        engine.submit(request_id, ids, params, frozenset({2}), collector(request_id))
    assert collector.done.wait(120)
    return collector


def test_a_mixed_length_batch_gives_each_request_its_solo_greedy_tokens(engine, tokenizer):
    texts = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time in a land far, far away, there lived a"]
    prompts = {str(i): tokenizer.encode_text(t) for i, t in enumerate(texts)}
    assert len({len(p) for p in prompts.values()}) == 3
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    together = run_all(engine, prompts, greedy)
    steps_before = engine.steps
    for request_id, ids in prompts.items():
        solo = run_all(engine, {request_id: ids}, greedy)
        assert solo.tokens[request_id] == together.tokens[request_id]
    assert engine.steps > steps_before


def test_stop_token_ends_with_stop_and_max_tokens_with_length(engine, tokenizer):
    chat = tokenizer.encode_chat(
        [__import__("services.tokenizer.core", fromlist=["ChatMessage"]).ChatMessage("user", "Say hi.")]
    )
    result = run_all(engine, {"a": chat}, SamplingParams(max_tokens=64, temperature=0.0))
    assert result.finish["a"] == FinishReason.STOP and result.tokens["a"][-1] == 2
    result = run_all(
        engine, {"b": tokenizer.encode_text("Once upon a time")}, SamplingParams(max_tokens=5, temperature=0.0)
    )
    assert result.finish["b"] == FinishReason.LENGTH and len(result.tokens["b"]) == 5


def test_abort_frees_the_slot(engine, tokenizer):
    started = threading.Event()
    finished = threading.Event()

    def on_output(output) -> None:
        started.set()
        if output.finish_reason:
            assert output.finish_reason == FinishReason.ABORT
            finished.set()

    prompt = tokenizer.encode_text("Tell me a story")
    engine.submit("long", prompt, SamplingParams(max_tokens=64, temperature=0.0), frozenset(), on_output)
    assert started.wait(30)
    # KV positions in use, not slots: at least the prompt's, far from the whole slot (1 of 4 would be 0.25)
    assert engine.num_running == 1
    assert len(prompt) / (4 * 256) <= engine.kv_cache_usage <= (len(prompt) + 64) / (4 * 256) < 0.25
    engine.abort("long")
    assert finished.wait(10)
    assert engine.num_running == 0 and engine.kv_cache_usage == 0.0


def test_requests_beyond_slots_and_queue_are_refused(engine, tokenizer):
    try:
        ids = tokenizer.encode_text("Hello")
        params = SamplingParams(max_tokens=64, temperature=0.0)
        # 4 slots + 2 waiting places; the engine thread may not have picked them up yet, which counts the same
        for i in range(6):
            engine.submit(f"fill{i}", ids, params, frozenset(), lambda o: None)
        with pytest.raises(ResourceExhaustedError) as caught:
            engine.submit("one-too-many", ids, params, frozenset(), lambda o: None)
        assert caught.value.retry_after_s > 0
    finally:
        for i in range(6):
            engine.abort(f"fill{i}")


@pytest.mark.parametrize(
    "prompt, params, field",
    [
        ([], SamplingParams(max_tokens=4), "prompt_token_ids"),
        ([1, 999999], SamplingParams(max_tokens=4), "prompt_token_ids"),
        ([1], SamplingParams(max_tokens=0), "sampling.max_tokens"),
        ([1], SamplingParams(max_tokens=65), "sampling.max_tokens"),
        ([1] * 250, SamplingParams(max_tokens=10), "sampling.max_tokens"),
        ([1], SamplingParams(max_tokens=4, temperature=-1), "sampling.temperature"),
        ([1], SamplingParams(max_tokens=4, top_p=0), "sampling.top_p"),
        ([1], SamplingParams(max_tokens=4, top_k=-1), "sampling.top_k"),
        ([1], SamplingParams(max_tokens=4, min_p=1.5), "sampling.min_p"),
        ([1], SamplingParams(max_tokens=4, repetition_penalty=0), "sampling.repetition_penalty"),
        ([1], SamplingParams(max_tokens=4, presence_penalty=3), "sampling.presence_penalty"),
        ([1], SamplingParams(max_tokens=4, frequency_penalty=-3), "sampling.frequency_penalty"),
        ([1], SamplingParams(max_tokens=4, min_tokens=5), "sampling.min_tokens"),
        ([1], SamplingParams(max_tokens=4, logprobs=21), "sampling.logprobs"),
        ([1], SamplingParams(max_tokens=4, prompt_logprobs=-1), "sampling.prompt_logprobs"),
    ],
)
def test_invalid_requests_name_their_field(engine, prompt, params, field):
    with pytest.raises(InvalidArgumentError) as caught:
        engine.submit("bad", prompt, params, frozenset(), lambda o: None)
    assert caught.value.field == field


@pytest.fixture(scope="module")
def chunked_engine(model_dir):
    config = EngineConfig(
        num_slots=2, max_context=256, max_new_tokens=64, max_prefill_tokens=16, enable_prefix_caching=False
    )
    engine = Engine(OnnxRuntimeBackend(model_dir, config.num_slots, config.max_context), config)
    engine.start()
    yield engine
    engine.stop()


LONG_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based inks and a wooden press adapted from wine making. Within decades, printing "
    "shops spread across Europe, books became cheaper, and literacy rose in cities and towns alike."
)


def test_chunked_prefill_gives_the_same_tokens_and_prompt_logprobs(engine, chunked_engine, tokenizer):
    ids = tokenizer.encode_text(LONG_TEXT)
    assert len(ids) > 40  # several 16-token chunks
    params = SamplingParams(max_tokens=8, temperature=0.0, prompt_logprobs=2, logprobs=3)
    outputs = {}
    for name, eng in (("whole", engine), ("chunked", chunked_engine)):
        got = []
        done = threading.Event()

        def on_output(output, got=got, done=done):
            got.append(output)
            if output.finish_reason:
                done.set()

        eng.submit(name, ids, params, frozenset(), on_output)
        assert done.wait(60)
        outputs[name] = got
    tokens = {k: [t for o in v for t in o.token_ids] for k, v in outputs.items()}
    assert tokens["whole"] == tokens["chunked"]
    prompt_lp = {k: v[0].prompt_logprobs for k, v in outputs.items()}
    assert len(prompt_lp["whole"]) == len(ids) - 1
    assert [p.token_id for p in prompt_lp["chunked"]] == ids[1:]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(prompt_lp["whole"], prompt_lp["chunked"])) < 1e-3
    # greedy picks the most likely token: its logprob is the top alternative's
    for output in outputs["whole"]:
        (lp,) = output.logprobs
        assert lp.logprob <= 0 and lp.top[0] == (lp.token_id, pytest.approx(lp.logprob))
        assert len(lp.top) == 3 and lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]


def test_a_long_prompt_does_not_stall_a_running_stream(chunked_engine, tokenizer):
    stream_times: list[float] = []
    first_of_long = threading.Event()
    stream_done = threading.Event()

    def on_stream(output):
        stream_times.extend([time.monotonic()] * len(output.token_ids))
        if output.finish_reason:
            stream_done.set()

    def on_long(output):
        first_of_long.set()

    chunked_engine.submit(
        "stream",
        tokenizer.encode_text("Once upon a time"),
        SamplingParams(max_tokens=60, temperature=0.0),
        frozenset(),
        on_stream,
    )
    while not stream_times:
        time.sleep(0.005)
    submitted = time.monotonic()
    long_ids = tokenizer.encode_text(LONG_TEXT * 2)[:150]
    chunked_engine.submit("long", long_ids, SamplingParams(max_tokens=2, temperature=0.0), frozenset(), on_long)
    assert first_of_long.wait(60)
    long_first = time.monotonic()
    during = [t for t in stream_times if submitted < t <= long_first]
    chunks = -(-len(long_ids) // 16)
    # prefill chunks alternate with decode steps: the stream got a token between consecutive chunks
    assert len(during) >= chunks - 1
    assert stream_done.wait(60)


def test_penalties_and_min_tokens(engine, tokenizer):
    ids = tokenizer.encode_text("1, 1, 1, 1, 1, 1,")
    plain = run_all(engine, {"p": ids}, SamplingParams(max_tokens=16, temperature=0.0))
    penalized = run_all(
        engine, {"q": ids}, SamplingParams(max_tokens=16, temperature=0.0, frequency_penalty=2.0, presence_penalty=2.0)
    )
    assert len(set(plain.tokens["p"])) < len(set(penalized.tokens["q"]))
    assert max(penalized.tokens["q"].count(t) for t in set(penalized.tokens["q"])) <= 2
    chat = tokenizer.encode_chat(
        [__import__("services.tokenizer.core", fromlist=["ChatMessage"]).ChatMessage("user", "Say hi.")]
    )
    short = run_all(engine, {"s": chat}, SamplingParams(max_tokens=64, temperature=0.0))
    assert short.finish["s"] == FinishReason.STOP
    forced = run_all(
        engine, {"m": chat}, SamplingParams(max_tokens=64, temperature=0.0, min_tokens=len(short.tokens["s"]) + 5)
    )
    assert len(forced.tokens["m"]) >= len(short.tokens["s"]) + 5


def test_a_repeated_prefix_is_not_recomputed_and_gives_the_same_tokens(model_dir, tokenizer):
    from services.tokenizer.core import ChatMessage

    def engine_with(caching: bool) -> Engine:
        config = EngineConfig(num_slots=2, max_context=256, max_new_tokens=64, enable_prefix_caching=caching)
        engine = Engine(OnnxRuntimeBackend(model_dir, config.num_slots, config.max_context), config)
        engine.start()
        return engine

    system = ChatMessage("system", "You are a terse assistant who answers geography questions in one sentence.")
    first = tokenizer.encode_chat([system, ChatMessage("user", "What is the capital of Italy?")])
    second = tokenizer.encode_chat([system, ChatMessage("user", "What is the capital of Spain?")])
    shared = len(os.path.commonprefix([first, second]))
    assert shared >= 20
    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    cached, uncached = engine_with(True), engine_with(False)
    try:
        results = {}
        for name, engine in (("cached", cached), ("uncached", uncached)):
            run_all(engine, {"a": first}, greedy)
            results[name] = run_all(engine, {"b": second}, greedy).tokens["b"]
        assert results["cached"] == results["uncached"]
        assert cached.prefix_cache_hits == shared and cached.prefix_cache_queries == len(first) + len(second)
        assert uncached.prefix_cache_hits == 0
    finally:
        cached.stop()
        uncached.stop()


def test_a_prefix_another_running_request_computed_is_copied_and_gives_the_same_tokens(model_dir, tokenizer):
    """A shared system prompt is prefilled once per engine, not once per slot: a request that arrives
    while another with the same system prompt runs copies those keys and values from the running
    request's slot, and generates what it generates without any cache."""
    from services.tokenizer.core import ChatMessage

    system = ChatMessage("system", "You are a terse assistant who answers geography questions in one sentence.")
    first = tokenizer.encode_chat([system, ChatMessage("user", "What is the capital of Italy?")])
    second = tokenizer.encode_chat([system, ChatMessage("user", "What is the capital of Spain?")])
    shared = len(os.path.commonprefix([first, second]))
    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    config = EngineConfig(num_slots=2, max_context=256, max_new_tokens=64)
    results = {}
    for caching in (True, False):
        engine = Engine(
            OnnxRuntimeBackend(model_dir, config.num_slots, config.max_context),
            dataclasses.replace(config, enable_prefix_caching=caching),
        )
        engine.start()
        try:
            collector = Collector()
            collector.expected = 2
            engine.submit(
                "a",
                first,
                SamplingParams(max_tokens=40, min_tokens=40, temperature=0.0),
                frozenset({2}),
                collector("a"),
            )
            deadline = time.monotonic() + 60
            while not collector.tokens.get("a"):  # a is past its prefill and still running
                assert time.monotonic() < deadline
                time.sleep(0.005)
            engine.submit("b", second, greedy, frozenset({2}), collector("b"))
            assert collector.done.wait(120)
            results[caching] = (collector.tokens["b"], engine.prefix_copies, engine.prefix_cache_hits)
        finally:
            engine.stop()
    tokens, copies, hits = results[True]
    assert tokens == results[False][0]
    # b's own slot held nothing; had a finished first, b would have taken a's freed slot and copied nothing
    assert copies == 1 and hits == shared
    assert results[False][1:] == (0, 0)


# -- resuming an interrupted generation (router failover) -----------------------------------


def _collect(engine: Engine, request_id: str, prompt: list[int], params: SamplingParams, resumed=()) -> list[int]:
    collector = Collector()
    collector.expected = 1
    engine.submit(request_id, prompt, params, frozenset({2}), collector(request_id), resumed_token_ids=resumed)
    assert collector.done.wait(120)
    return collector.tokens[request_id]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=48, temperature=0.0),
        SamplingParams(max_tokens=48, temperature=0.9, top_p=0.95, seed=11),
    ],
    ids=["greedy", "seeded"],
)
def test_a_resumed_request_continues_exactly_where_the_interrupted_one_was(engine, tokenizer, params):
    """What a replica that takes over a failed stream computes: the prompt plus the tokens the
    client already has, resumed, give exactly the rest of the undisturbed run. The prompt is then
    in the cache (a prefix hit) and another stream shares the batch, as on a busy replica."""
    from services.tokenizer.core import ChatMessage

    prompt = tokenizer.encode_chat([ChatMessage("user", "Tell me about the planets of the solar system.")])
    full = _collect(engine, "full", prompt, params)
    assert len(full) == 48
    other = tokenizer.encode_chat([ChatMessage("user", "Explain how a bicycle works.")])
    for cut in (1, 7, 30):
        collector = Collector()
        collector.expected = 2
        engine.submit("busy", other, SamplingParams(max_tokens=40, temperature=0.0), frozenset({2}), collector("busy"))
        engine.submit("resumed", prompt, params, frozenset({2}), collector("resumed"), resumed_token_ids=full[:cut])
        assert collector.done.wait(120)
        assert collector.tokens["resumed"] == full[cut:], f"diverged after resuming {cut} tokens"


def test_resumed_tokens_must_leave_something_to_generate(engine):
    with pytest.raises(InvalidArgumentError) as caught:
        engine.submit(
            "bad", [1, 2, 3], SamplingParams(max_tokens=4), frozenset(), lambda o: None, resumed_token_ids=[5] * 4
        )
    assert caught.value.field == "resumed_token_ids"
    with pytest.raises(InvalidArgumentError) as caught:
        engine.submit(
            "bad", [1, 2, 3], SamplingParams(max_tokens=4), frozenset(), lambda o: None, resumed_token_ids=[10**6]
        )
    assert caught.value.field == "resumed_token_ids"


class RecordingBackend:
    """Stands in for the model to observe the scheduler: the new tokens of every row of every step."""

    def __init__(self, model_dir, num_slots: int, max_context: int, mixed_steps: bool = False) -> None:
        self.config, self.num_slots, self.max_context = model_dir.config, num_slots, max_context
        self.mixed_steps = mixed_steps
        self.steps: list[list[int]] = []
        self.after_step: Callable[[int], object] = lambda steps: None

    def forward(self, batch):
        import numpy as np

        self.steps.append(batch.new_lengths.tolist())
        self.after_step(len(self.steps))
        logits = np.zeros((batch.rows, batch.logits_indices.shape[1], self.config.vocab_size), np.float32)
        logits[..., 7] = 1.0  # greedy picks token 7
        return logits

    def close(self) -> None:
        pass


def test_prompt_positions_are_never_computed_by_a_one_token_step(model_dir):
    """A prefill row with a single new token would take the decode kernels: chunks and prefix
    hits always leave >= 2 prompt tokens per prefill row, and only prompt positions are reused
    (see Engine's docstring)."""
    backend = RecordingBackend(model_dir, 2, 256)
    engine = Engine(backend, EngineConfig(num_slots=2, max_context=256, max_new_tokens=16, max_prefill_tokens=8))
    engine.start()
    try:
        prompt = list(range(100, 117))  # 17 tokens: chunks of 8 + 8 would leave 1
        steps = {}
        for name, ids in (("first", prompt), ("again", prompt), ("extended", prompt + [7, 7, 50])):
            backend.steps.clear()
            assert _collect(engine, name, ids, SamplingParams(max_tokens=2, temperature=0.0)) == [7, 7]
            steps[name] = list(backend.steps)
    finally:
        engine.stop()
    assert steps["first"] == [[8], [7], [2], [1]]  # 8 + 7 + 2, never 8 + 8 + 1
    assert steps["again"] == [[2], [1]]  # all 17 cached, yet the last two are prefilled again
    # "again" wrote the prompt and its first output 7 to the slot, but only the prompt is reused
    assert steps["extended"] == [[3], [1]]
    assert engine.prefix_cache_hits == 15 + 17


def _steps_of_a_long_prompt_beside_decoding_streams(mixed_steps: bool, model_dir) -> list[list[int]]:
    """The steps while a 40-token prompt joins 3 decoding streams, under a budget of 8 tokens a step."""
    backend = RecordingBackend(model_dir, 4, 256, mixed_steps=mixed_steps)
    config = EngineConfig(
        num_slots=4, max_context=256, max_new_tokens=64, max_num_batched_tokens=8, min_prefill_tokens=4
    )
    engine = Engine(backend, config)
    collector = Collector()
    collector.expected = 4
    greedy = SamplingParams(max_tokens=20, temperature=0.0)
    for i in range(3):
        engine.submit(f"stream-{i}", [100 + i, 101, 102], greedy, frozenset(), collector(f"stream-{i}"))
    long_prompt = list(range(200, 240))

    def after_step(steps: int) -> None:
        if steps == 3:  # the streams are decoding: the long prompt arrives, between two steps
            engine.submit("long", long_prompt, SamplingParams(max_tokens=1), frozenset(), collector("long"))

    backend.after_step = after_step
    engine.start()
    try:
        assert collector.done.wait(60)
    finally:
        engine.stop()
    return backend.steps


def test_prefill_chunks_join_decode_rows_in_one_step_within_the_token_budget(model_dir):
    steps = _steps_of_a_long_prompt_beside_decoding_streams(True, model_dir)
    mixed = [s for s in steps if len(s) > 3 and s[:3] == [1, 1, 1]]
    # the 40 prompt tokens go 5 a step (8 minus 3 decode rows) beside the three streams, which never wait
    assert [s[3] for s in mixed] == [5] * 8
    assert all(sum(s) <= 8 for s in steps if 1 in s)
    decode_steps = [s for s in steps if s.count(1) == 3]
    assert len(decode_steps) == 20 - 1  # a step for every token after the first (the prefill samples it)


def test_a_backend_without_exact_mixed_steps_alternates_prefill_and_decode(model_dir):
    steps = _steps_of_a_long_prompt_beside_decoding_streams(False, model_dir)
    assert all(s == [1, 1, 1] or 1 not in s or s == [1] for s in steps), steps
    long_chunks = [s for s in steps[3:] if s[0] > 1]  # after the streams' own prefill
    assert sum(s[0] for s in long_chunks) == 40 and all(len(s) == 1 for s in long_chunks)


# -- fault isolation: a request may fail itself, never its neighbours -------------------------


class PoisonedBackend:
    """The real backend, except that any step containing the token id POISON fails, as a kernel
    fault on one row's input would."""

    POISON = 12345

    def __init__(self, inner) -> None:
        self.inner = inner
        self.config, self.num_slots, self.max_context = inner.config, inner.num_slots, inner.max_context
        self.mixed_steps = inner.mixed_steps
        self.failed_steps = 0

    def forward(self, batch):
        if (batch.input_ids == self.POISON).any():
            self.failed_steps += 1
            raise RuntimeError("kernel fault")
        return self.inner.forward(batch)

    def copy_prefix(self, src_slot: int, dst_slot: int, length: int) -> None:
        self.inner.copy_prefix(src_slot, dst_slot, length)

    def close(self) -> None:
        self.inner.close()


def _innocent_prompts(tokenizer) -> dict[str, list[int]]:
    texts = ["The capital of France is", "Once upon a time in a land far away", "1, 2, 3, 4,"]
    return {f"innocent-{i}": tokenizer.encode_text(t) for i, t in enumerate(texts)}


def test_a_failing_row_fails_alone_and_the_rest_of_its_step_goes_on(model_dir, tokenizer, engine):
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    alone = {name: _collect(engine, name, ids, greedy) for name, ids in _innocent_prompts(tokenizer).items()}
    config = EngineConfig(num_slots=4, max_context=256, max_new_tokens=64, max_waiting=2)
    backend = PoisonedBackend(OnnxRuntimeBackend(model_dir, config.num_slots, config.max_context))
    poisoned = Engine(backend, config)
    collector = Collector()
    collector.expected = 4
    for name, ids in _innocent_prompts(tokenizer).items():
        poisoned.submit(name, ids, greedy, frozenset({2}), collector(name))
    poisoned.submit("poison", [1, 2, PoisonedBackend.POISON, 4], greedy, frozenset({2}), collector("poison"))
    poisoned.start()  # after every submission: all four are prefilled in one step, which fails at first
    try:
        assert collector.done.wait(120)
    finally:
        poisoned.stop()
    assert backend.failed_steps >= 2  # the batch, then the culprit's row alone
    assert collector.finish["poison"] is FinishReason.ERROR
    for name, tokens in alone.items():
        assert collector.finish[name] is not FinishReason.ERROR
        assert collector.tokens[name] == tokens, f"{name} changed when a neighbour failed"


def test_a_request_whose_sampling_raises_fails_alone(engine, tokenizer, monkeypatch):
    """The poison requests of issue 11 with the contract switched off (as if a check were missing):
    an out-of-vocabulary stop id and an infinite temperature raise in sampling, for that row only."""
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    alone = {name: _collect(engine, name, ids, greedy) for name, ids in list(_innocent_prompts(tokenizer).items())[:2]}
    monkeypatch.setattr(engine, "validate", lambda *args, **kwargs: None)
    collector = Collector()
    collector.expected = 4
    for name, ids in list(_innocent_prompts(tokenizer).items())[:2]:
        engine.submit(name, ids, greedy, frozenset({2}), collector(name))
    ids = tokenizer.encode_text("Hello there")
    engine.submit("bad-stop", ids, SamplingParams(max_tokens=8, min_tokens=2), [4_000_000_000], collector("bad-stop"))
    engine.submit(
        "bad-temperature",
        ids,
        SamplingParams(max_tokens=8, min_tokens=2, temperature=float("inf")),
        frozenset({2}),
        collector("bad-temperature"),
    )
    assert collector.done.wait(120)
    assert collector.finish["bad-stop"] is FinishReason.ERROR
    assert collector.finish["bad-temperature"] is FinishReason.ERROR
    for name, tokens in alone.items():
        assert collector.tokens[name] == tokens


def test_the_contract_refuses_the_poison_requests_before_they_are_queued(engine):
    with pytest.raises(InvalidArgumentError) as caught:
        engine.submit("x", [1, 2, 3], SamplingParams(max_tokens=8, min_tokens=2), [4_000_000_000], lambda o: None)
    assert caught.value.field == "stop_token_ids"
    with pytest.raises(InvalidArgumentError) as caught:
        engine.submit("x", [1, 2, 3], SamplingParams(max_tokens=8, temperature=float("inf")), [2], lambda o: None)
    assert caught.value.field == "sampling.temperature"
    with pytest.raises(InvalidArgumentError) as caught:
        engine.submit("x", [1, 2, 3], SamplingParams(max_tokens=8), list(range(73)), lambda o: None)
    assert caught.value.field == "stop_token_ids"


# -- speculative decoding (prompt lookup): the same text, in fewer steps -------------------------

REPETITIVE = "List the numbers again, exactly as before: 1 2 3 4 5 6 7 8 9 10 11 12. Again: 1 2 3 4 5 6 7 8"


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=40, temperature=0.0),
        SamplingParams(max_tokens=40, temperature=0.0, repetition_penalty=1.3, logprobs=2),
        SamplingParams(max_tokens=40, temperature=0.8, seed=5),
    ],
    ids=["greedy", "greedy-penalised-logprobs", "seeded"],
)
def test_drafted_tokens_change_nothing_but_the_number_of_steps(model_dir, tokenizer, params):
    prompts = {"repetitive": tokenizer.encode_text(REPETITIVE), "story": tokenizer.encode_text("Once upon a time")}
    plain_config = EngineConfig(num_slots=4, max_context=256, max_new_tokens=64, num_speculative_tokens=0)
    plain_engine = Engine(OnnxRuntimeBackend(model_dir, 4, 256), plain_config)
    plain_engine.start()
    try:
        plain = {name: _collect(plain_engine, name, ids, params) for name, ids in prompts.items()}
    finally:
        plain_engine.stop()
    assert plain_engine.speculative_accepted == 0
    config = EngineConfig(num_slots=4, max_context=256, max_new_tokens=64, num_speculative_tokens=4)
    drafting = Engine(OnnxRuntimeBackend(model_dir, config.num_slots, config.max_context), config)
    drafting.start()
    try:
        steps_before = drafting.steps
        drafted = {name: _collect(drafting, name, ids, params) for name, ids in prompts.items()}
        steps = drafting.steps - steps_before
    finally:
        drafting.stop()
    assert drafted == plain
    if params.greedy and not params.needs_history:  # (a repetition penalty keeps it from repeating)
        assert drafting.speculative_accepted > 0  # the repetitive prompt's continuation is in its prompt
        assert steps < sum(len(t) for t in plain.values()) + 2 * len(prompts)  # fewer steps than tokens
    assert drafting.speculative_accepted + drafting.speculative_rejected > 0


def test_drafts_stop_at_max_tokens_and_at_a_stop_token(model_dir, tokenizer):
    config = EngineConfig(num_slots=2, max_context=256, max_new_tokens=64, num_speculative_tokens=6)
    drafting = Engine(OnnxRuntimeBackend(model_dir, config.num_slots, config.max_context), config)
    drafting.start()
    try:
        ids = tokenizer.encode_text(REPETITIVE)
        for max_tokens in (1, 2, 5):
            tokens = _collect(drafting, f"n{max_tokens}", ids, SamplingParams(max_tokens=max_tokens, temperature=0.0))
            assert len(tokens) == max_tokens
        greedy = _collect(drafting, "all", ids, SamplingParams(max_tokens=30, temperature=0.0))
        stop = greedy[5]  # a token the answer reaches: with it as a stop token, the answer ends there
        collector = Collector()
        collector.expected = 1
        params = SamplingParams(max_tokens=30, temperature=0.0)
        drafting.submit("stop", ids, params, frozenset({stop}), collector("stop"))
        assert collector.done.wait(60)
    finally:
        drafting.stop()
    assert collector.tokens["stop"] == greedy[: greedy.index(stop) + 1]
    assert collector.finish["stop"] is FinishReason.STOP
