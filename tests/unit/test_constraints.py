"""The grammar side of constrained decoding (services/inference/constraints.py) over a tiny byte-level
tokenizer built here: masks, acceptance, completion, the compile cache, hostile constraints and the
compile timeout."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from services.common.contract import Constraint
from services.common.errors import InvalidArgumentError
from services.inference.constraints import ConstraintError, GrammarCompiler

EOS = 256


def _byte_tokenizer_json() -> str:
    """One token per byte (GPT-2's byte-to-unicode alphabet) and an end-of-sequence token."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: _byte_of(c))
    vocab = {c: i for i, c in enumerate(byte_chars)}
    vocab["<eos>"] = EOS
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<eos>"])
    return tokenizer.to_str()


def _byte_of(char: str) -> int:
    # GPT-2's mapping: printable bytes map to themselves, the rest to 256 + n
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    code = ord(char)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


@pytest.fixture(scope="module")
def grammars():
    compiler = GrammarCompiler(_byte_tokenizer_json(), [EOS], 257)
    yield compiler
    compiler.close()


def _tokens(text: str) -> list[int]:
    return list(text.encode())


def _greedy_walk(row, preferred: str, limit: int = 200) -> str:
    """Feeds `preferred` byte by byte where the grammar allows it, else the lowest allowed token."""
    out = bytearray()
    for i in range(limit):
        if row.done:
            break
        logits = np.zeros(257, np.float32)
        if i < len(preferred.encode()):
            logits[preferred.encode()[i]] = 10.0
        masked = row.apply(logits)
        token = int(np.argmax(masked))
        row.accept(token)
        if token == EOS:
            break
        out.append(token)
    return out.decode()


def test_a_schema_mask_allows_only_what_the_schema_does(grammars):
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    row = grammars.compile(Constraint("json_schema", json.dumps(schema)))
    masked = row.apply(np.zeros(257, np.float32))
    assert np.isfinite(masked).sum() == 1 and np.isfinite(masked[ord("{")])
    text = _greedy_walk(row, '{"n":12}')
    assert json.loads(text) == {"n": 12} and row.done


def test_a_disallowed_token_is_refused(grammars):
    row = grammars.compile(Constraint("regex", "[0-9]+"))
    with pytest.raises(ConstraintError):
        row.accept(ord("a"))


@pytest.mark.parametrize(
    "constraint, wanted, expected",
    [
        (Constraint("choice", choices=("alpha", "beta", 'say "hi"')), 'say "hi"', 'say "hi"'),
        (Constraint("regex", "[a-c]{3}"), "abz", "aba"),  # z is masked: the lowest allowed instead
        (Constraint("grammar", 'start: "(" NUM ")"\nNUM: /[0-9]+/'), "(42)", "(42)"),
        (Constraint("json_object"), '{"k":[1,true]}', '{"k":[1,true]}'),
    ],
)
def test_each_kind_of_constraint_is_followed_to_its_end(grammars, constraint, wanted, expected):
    row = grammars.compile(constraint)
    assert _greedy_walk(row, wanted).startswith(expected)


def test_compiled_grammars_and_refusals_are_cached(grammars):
    before = grammars.compilations
    regex = Constraint("regex", "[x-z]{2,9}")
    grammars.compile(regex)
    grammars.compile(regex)
    assert grammars.compilations == before + 1
    bad = Constraint("regex", "a(b")
    for _ in range(2):
        with pytest.raises(InvalidArgumentError):
            grammars.compile(bad)
    assert grammars.compilations == before + 2


def test_two_requests_of_one_grammar_keep_their_own_state(grammars):
    constraint = Constraint("choice", choices=("left", "right"))
    first, second = grammars.compile(constraint), grammars.compile(constraint)
    first.accept(ord("l"))
    masked = second.apply(np.zeros(257, np.float32))
    assert np.isfinite(masked[ord("r")]) and np.isfinite(masked[ord("l")])


@pytest.mark.parametrize(
    "constraint, field",
    [
        (
            Constraint("json_schema", json.dumps({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"})),
            "sampling.json_schema",
        ),
        (Constraint("json_schema", json.dumps({"$ref": "#/$defs/missing"})), "sampling.json_schema"),
        (
            Constraint("json_schema", json.dumps({"type": "object", "unevaluatedProperties": False})),
            "sampling.json_schema",
        ),
        (Constraint("json_schema", json.dumps({"enum": []})), "sampling.json_schema"),
        (Constraint("regex", "a(b"), "sampling.regex"),
        (Constraint("regex", "[z-a]"), "sampling.regex"),
        (Constraint("grammar", "start: undefined_rule"), "sampling.grammar"),
        (Constraint("grammar", "this is not lark"), "sampling.grammar"),
    ],
)
def test_hostile_or_broken_constraints_are_refused_naming_their_field(grammars, constraint, field):
    with pytest.raises(InvalidArgumentError) as caught:
        grammars.compile(constraint)
    assert caught.value.field == field


def test_a_huge_enum_compiles_in_bounded_time(grammars):
    started = time.monotonic()
    grammars.compile(Constraint("json_schema", json.dumps({"enum": [f"value-{i}" for i in range(5000)]})))
    assert time.monotonic() - started < grammars.timeout_s


def test_resumed_tokens_the_grammar_does_not_allow_are_refused(grammars):
    with pytest.raises(InvalidArgumentError) as caught:
        grammars.compile(Constraint("regex", "[0-9]+"), _tokens("12a"))
    assert caught.value.field == "resumed_token_ids"
    row = grammars.compile(Constraint("regex", "[0-9]+"), _tokens("12"))
    for token in _tokens("12"):  # what the engine replays
        row.accept(token)
    assert not np.isfinite(row.apply(np.zeros(257, np.float32))[ord("a")])


async def test_a_compilation_past_the_timeout_is_invalid_argument(grammars, monkeypatch):
    slow = GrammarCompiler(_byte_tokenizer_json(), [EOS], 257, timeout_s=0.2)
    real_build = slow._build

    def build(constraint):
        time.sleep(1.0)
        return real_build(constraint)

    monkeypatch.setattr(slow, "_build", build)
    started = time.monotonic()
    with pytest.raises(InvalidArgumentError) as caught:
        await slow.compile_async(Constraint("regex", "[0-9]+"))
    assert caught.value.field == "sampling.regex" and "took more than" in caught.value.description
    assert time.monotonic() - started < 0.9
    slow.close()


class _BusyMatcher:
    """A matcher that, like llguidance's, may not be used while it computes a mask (which takes a while here)."""

    def __init__(self) -> None:
        self.computing = False

    def _check(self) -> None:
        if self.computing:
            raise RuntimeError("Already mutably borrowed")

    def unsafe_compute_mask_ptr(self, pointer: int, size: int) -> None:
        self._check()
        self.computing = True
        time.sleep(0.2)
        self.computing = False

    def consume_token(self, token: int) -> bool:
        self._check()
        return True

    def is_error(self) -> bool:
        self._check()
        return False

    def is_stopped(self) -> bool:
        self._check()
        return False


def test_the_engine_thread_never_touches_a_matcher_while_its_next_mask_is_computed():
    import concurrent.futures

    from services.inference.constraints import RowConstraint

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        row = RowConstraint(_BusyMatcher(), 257, pool)
        row.apply(np.zeros(257, np.float32))
        row.accept(1)  # starts the next mask on the worker
        time.sleep(0.05)
        assert not row.done  # read while the worker computes: must not touch the matcher
        row.apply(np.zeros(257, np.float32))
