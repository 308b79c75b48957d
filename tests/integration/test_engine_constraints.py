"""Grammar-constrained rows in the engine on the real model: the output follows the constraint, a
constrained row leaves its free neighbours' greedy tokens alone, and a resumed constrained request
continues in the same grammar state."""

from __future__ import annotations

import json
import re

import pytest

from services.common.contract import Constraint, SamplingParams
from services.common.finish import FinishReason
from services.inference.backends.onnxruntime import OnnxRuntimeBackend
from services.inference.constraints import GrammarCompiler
from services.inference.engine import Engine, EngineConfig
from services.tokenizer.core import ChatMessage
from tests.integration.conftest import Collector

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(model_dir):
    config = EngineConfig(num_slots=4, max_context=384, max_new_tokens=96, max_waiting=4)
    engine = Engine(OnnxRuntimeBackend(model_dir, config.num_slots, config.max_context), config)
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def grammars(model_dir):
    compiler = GrammarCompiler(
        model_dir.tokenizer_path.read_text(), model_dir.eos_token_ids, model_dir.config.vocab_size
    )
    yield compiler
    compiler.close()


def _submit(engine, grammars, collector, request_id, prompt, params, resumed=()):
    constraint = grammars.compile(params.constraint, resumed) if params.constraint is not None else None
    engine.submit(
        request_id,
        prompt,
        params,
        frozenset({2}),
        collector(request_id),
        resumed_token_ids=resumed,
        constraint=constraint,
    )


def _run(engine, grammars, requests: dict[str, tuple[list[int], SamplingParams]], resumed=None) -> Collector:
    collector = Collector()
    collector.expected = len(requests)
    for request_id, (prompt, params) in requests.items():
        _submit(engine, grammars, collector, request_id, prompt, params, (resumed or {}).get(request_id, ()))
    assert collector.done.wait(180)
    return collector


def _chat(tokenizer, text: str) -> list[int]:
    return tokenizer.encode_chat([ChatMessage("user", text)])


def _text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode([t for t in ids if t != 2])


@pytest.mark.parametrize(
    ("constraint", "check"),
    [
        (Constraint("json_schema", json.dumps(PERSON)), lambda text: set(json.loads(text)) == {"name", "age"}),
        (Constraint("json_object"), lambda text: isinstance(json.loads(text), dict)),
        (Constraint("regex", r"[0-9]{3}-[0-9]{4}"), lambda text: re.fullmatch(r"[0-9]{3}-[0-9]{4}", text)),
        (Constraint("choice", choices=("yes", "no", "it depends")), lambda text: text in ("yes", "no", "it depends")),
        (
            Constraint("grammar", 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]{1,3}/'),
            lambda text: re.fullmatch(r"\([0-9]{1,3}(\+[0-9]{1,3})*\)", text),
        ),
    ],
    ids=["json_schema", "json_object", "regex", "choice", "grammar"],
)
def test_a_constrained_row_follows_its_constraint_and_stops(engine, grammars, tokenizer, constraint, check):
    params = SamplingParams(max_tokens=80, temperature=0.0, constraint=constraint)
    prompt = _chat(tokenizer, 'Answer with exactly {"ok": true} and nothing else, or a phone number like 555-1234.')
    run = _run(engine, grammars, {"c": (prompt, params)})
    text = _text(tokenizer, run.tokens["c"])
    assert run.finish["c"] is FinishReason.STOP, text
    assert check(text), text


def test_a_sampled_constrained_row_follows_its_schema_too(engine, grammars, tokenizer):
    params = SamplingParams(
        max_tokens=80, temperature=1.0, seed=5, constraint=Constraint("json_schema", json.dumps(PERSON))
    )
    run = _run(engine, grammars, {"c": (_chat(tokenizer, "Invent a person."), params)})
    value = json.loads(_text(tokenizer, run.tokens["c"]))
    assert isinstance(value["name"], str) and isinstance(value["age"], int)


def test_a_constrained_row_does_not_change_its_free_neighbours_greedy_tokens(engine, grammars, tokenizer):
    free = SamplingParams(max_tokens=40, temperature=0.0)
    prompts = {
        "free-a": _chat(tokenizer, "Tell me about the planets of the solar system."),
        "free-b": tokenizer.encode_text("Once upon a time in a land far, far away, there lived a"),
    }
    alone = _run(engine, grammars, {k: (p, free) for k, p in prompts.items()})
    constrained = SamplingParams(
        max_tokens=60, temperature=0.0, constraint=Constraint("json_schema", json.dumps(PERSON))
    )
    beside = _run(
        engine,
        grammars,
        {**{k: (p, free) for k, p in prompts.items()}, "json": (_chat(tokenizer, "A person, as JSON."), constrained)},
    )
    for request_id in prompts:
        assert beside.tokens[request_id] == alone.tokens[request_id], request_id
    json.loads(_text(tokenizer, beside.tokens["json"]))  # and the neighbour got its JSON


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "seeded"])
def test_a_resumed_constrained_request_continues_in_the_same_grammar_state(engine, grammars, tokenizer, temperature):
    params = SamplingParams(
        max_tokens=80, temperature=temperature, seed=3, constraint=Constraint("json_schema", json.dumps(PERSON))
    )
    prompt = _chat(tokenizer, "Describe a person called Grace in JSON.")
    full = _run(engine, grammars, {"full": (prompt, params)}).tokens["full"]
    assert len(full) > 6
    for cut in (1, len(full) // 2):
        resumed = _run(engine, grammars, {"r": (prompt, params)}, resumed={"r": full[:cut]})
        assert resumed.tokens["r"] == full[cut:], f"diverged after resuming {cut} tokens"


def test_logit_bias_moves_the_greedy_choice(engine, grammars, tokenizer):
    prompt = tokenizer.encode_text("The capital of France is")
    plain = _run(engine, grammars, {"p": (prompt, SamplingParams(max_tokens=1, temperature=0.0))}).tokens["p"]
    banned = SamplingParams(max_tokens=1, temperature=0.0, logit_bias=((plain[0], -100.0),))
    biased = _run(engine, grammars, {"b": (prompt, banned)}).tokens["b"]
    assert biased != plain
    forced = tokenizer.encode_text(" banana")[0]
    pushed = SamplingParams(max_tokens=1, temperature=0.0, logit_bias=((forced, 100.0),))
    assert _run(engine, grammars, {"f": (prompt, pushed)}).tokens["f"] == [forced]


@pytest.fixture(scope="module")
def speculative_engine(model_dir):
    config = EngineConfig(
        num_slots=4, max_context=384, max_new_tokens=96, max_waiting=4, num_speculative_tokens=4, speculative_max_rows=4
    )
    engine = Engine(OnnxRuntimeBackend(model_dir, config.num_slots, config.max_context), config)
    engine.start()
    yield engine
    engine.stop()


def test_speculative_drafts_keep_a_constrained_row_in_its_grammar(engine, speculative_engine, grammars, tokenizer):
    """Drafts are verified position by position through `_sample`, so the matcher accepts exactly the kept
    tokens: with speculation the constrained answer is the one without, and so is a resumed one."""
    params = SamplingParams(max_tokens=80, temperature=0.0, constraint=Constraint("json_schema", json.dumps(PERSON)))
    prompt = _chat(tokenizer, 'Repeat this JSON exactly: {"name":"Ada Lovelace","age":36}')
    plain = _run(engine, grammars, {"c": (prompt, params)}).tokens["c"]
    accepted_before = speculative_engine.speculative_accepted
    drafted = _run(speculative_engine, grammars, {"c": (prompt, params)}).tokens["c"]
    assert speculative_engine.speculative_accepted > accepted_before  # drafts were taken
    assert drafted == plain
    json.loads(_text(tokenizer, drafted))
    resumed = _run(speculative_engine, grammars, {"r": (prompt, params)}, resumed={"r": plain[:3]}).tokens["r"]
    assert resumed == plain[3:]
