"""xgrammar vs. llguidance on this model's tokenizer: schema coverage, compile time, per-token mask cost.

    python bench/grammar_backends.py [--models-root models] [--repeats 20] [--json]

For every test constraint (JSON schemas of the features clients send, a regex, a choice, a Lark grammar)
each library compiles it (cold: no cache, `--repeats` times, p50 and p99), then walks the tokens of a
valid answer: per token, the next-token bitmask is computed and the token accepted, timed together
(mean and p99 per token). Coverage counts the constraints a library compiled and whose valid answer it
accepted to the end; a hostile set (recursive $ref, a 2,000-value enum, 64 levels of nesting, a bad
regex) shows how each fails. Applying a bitmask to numpy logits costs the same for both and is timed once.
docs/structured-outputs.md keeps the numbers and the choice they led to.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from services.modelstore.layout import find_model

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
# what pydantic writes for a model with a nested model, a list, an enum, an optional field
PYDANTIC = {
    "$defs": {
        "Address": {
            "properties": {"city": {"title": "City", "type": "string"}, "zip": {"title": "Zip", "type": "string"}},
            "required": ["city", "zip"],
            "title": "Address",
            "type": "object",
            "additionalProperties": False,
        },
        "Colour": {"enum": ["red", "green", "blue"], "title": "Colour", "type": "string"},
    },
    "properties": {
        "name": {"title": "Name", "type": "string"},
        "tags": {"items": {"type": "string"}, "title": "Tags", "type": "array"},
        "address": {"$ref": "#/$defs/Address"},
        "colour": {"$ref": "#/$defs/Colour"},
        "nickname": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None, "title": "Nickname"},
    },
    "required": ["name", "tags", "address", "colour", "nickname"],
    "title": "User",
    "type": "object",
    "additionalProperties": False,
}
TREE = {
    "$defs": {
        "Node": {
            "type": "object",
            "properties": {
                "value": {"type": "integer"},
                "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
            },
            "required": ["value", "children"],
            "additionalProperties": False,
        }
    },
    "$ref": "#/$defs/Node",
}
BOUNDS = {
    "type": "object",
    "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
        "score": {"type": "number", "minimum": 0, "maximum": 10},
        "items": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
        "kind": {"const": "fixed"},
        "when": {"type": "string", "format": "date"},
    },
    "required": ["code", "score", "items", "kind", "when"],
    "additionalProperties": False,
}
ONE_OF = {
    "oneOf": [
        {
            "type": "object",
            "properties": {"cat": {"type": "string"}},
            "required": ["cat"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {"dog": {"type": "integer"}},
            "required": ["dog"],
            "additionalProperties": False,
        },
    ]
}
ALL_OF = {
    "allOf": [
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
        {"type": "object", "properties": {"b": {"type": "boolean"}}, "required": ["b"]},
    ],
    "unevaluatedProperties": False,
}
LARK = r"""
start: expr
expr: term (("+" | "-") term)*
term: NUMBER | "(" expr ")"
NUMBER: /[0-9]+/
"""


def _deep(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"], "additionalProperties": False}
    return schema


# (name, kind, constraint, a valid answer)
CASES: list[tuple[str, str, Any, str]] = [
    ("json_schema/object", "json", PERSON, '{"name":"Ada Lovelace","age":36}'),
    (
        "json_schema/pydantic",
        "json",
        PYDANTIC,
        '{"name":"Bob","tags":["a","bc"],"address":{"city":"Paris","zip":"75001"},"colour":"green","nickname":null}',
    ),
    ("json_schema/recursive_tree", "json", TREE, '{"value":1,"children":[{"value":2,"children":[]}]}'),
    (
        "json_schema/bounds_pattern_format",
        "json",
        BOUNDS,
        '{"code":"ABC-12","score":7.5,"items":[1,2],"kind":"fixed","when":"2026-12-07"}',
    ),
    ("json_schema/oneOf", "json", ONE_OF, '{"dog":3}'),
    ("json_schema/allOf", "json", ALL_OF, '{"a":1,"b":true}'),
    ("json_schema/enum_500", "json", {"enum": [f"value_{i}" for i in range(500)]}, '"value_321"'),
    ("json_schema/nested_12", "json", _deep(12), '{"a":' * 12 + "7" + "}" * 12),
    ("json_object", "json", {"type": "object"}, '{"answer":"yes","n":[1,2,3]}'),
    ("regex/phone", "regex", r"\(\d{3}\) \d{3}-\d{4}", "(555) 123-4567"),
    ("choice", "choice", ["positive", "negative", "neutral"], "negative"),
    ("grammar/lark_arith", "lark", LARK, "(1+23)-4"),
]
HOSTILE: list[tuple[str, str, Any]] = [
    ("recursive $ref without base case", "json", {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}),
    ("enum of 2,000 values", "json", {"enum": [f"v{i}" for i in range(2000)]}),
    ("64 levels of nesting", "json", _deep(64)),
    ("invalid regex", "regex", "a(b"),
    ("invalid lark", "lark", "start: foo"),
]


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer_json: str, eos: list[int]) -> None:
        import llguidance
        import llguidance.numpy as llnp

        self.llg, self.llnp = llguidance, llnp
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, eos_token=eos)
        self.vocab = self.tokenizer.vocab_size

    def grammar(self, kind: str, constraint: Any) -> str:
        m = self.llg.LLMatcher
        if kind == "json":
            return m.grammar_from_json_schema(constraint, defaults={"whitespace_flexible": False})
        if kind == "regex":
            return m.grammar_from_regex(constraint)
        if kind == "choice":
            return m.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in constraint))
        return m.grammar_from_lark(constraint)

    def compile(self, kind: str, constraint: Any) -> Any:
        grammar = self.grammar(kind, constraint)
        error = self.llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(error)
        return grammar

    def matcher(self, compiled: Any) -> Any:
        return self.llg.LLMatcher(self.tokenizer, compiled, log_level=0)

    def bitmask(self) -> np.ndarray:
        return self.llnp.allocate_token_bitmask(1, self.vocab)

    def step(self, matcher: Any, mask: np.ndarray, token: int) -> bool:
        self.llnp.fill_next_token_bitmask(matcher, mask, 0)
        return bool(matcher.consume_token(token)) and not matcher.is_error()


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer_json: str, eos: list[int]) -> None:
        import xgrammar
        from transformers import PreTrainedTokenizerFast

        self.xgr = xgrammar
        hf = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(tokenizer_json))
        self.vocab = hf.backend_tokenizer.get_vocab_size()
        info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=self.vocab, stop_token_ids=eos)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, kind: str, constraint: Any) -> Any:
        c = self.compiler
        if kind == "json":
            return c.compile_json_schema(
                json.dumps(constraint), any_whitespace=False, separators=(",", ":"), strict_mode=True
            )
        if kind == "regex":
            return c.compile_regex(constraint)
        if kind == "choice":
            return c.compile_grammar("root ::= " + " | ".join(json.dumps(x) for x in constraint))
        # xgrammar takes EBNF (GBNF), not Lark: the same arithmetic grammar in its syntax
        if constraint == LARK:
            return c.compile_grammar('root ::= expr\nexpr ::= term (("+" | "-") term)*\nterm ::= [0-9]+ | "(" expr ")"')
        return c.compile_grammar(constraint)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def bitmask(self) -> np.ndarray:
        return self.xgr.allocate_token_bitmask(1, self.vocab).numpy()

    def step(self, matcher: Any, mask: Any, token: int) -> bool:
        matcher.fill_next_token_bitmask(self._torch_mask)
        return bool(matcher.accept_token(token))

    def prepare(self) -> None:
        self._torch_mask = self.xgr.allocate_token_bitmask(1, self.vocab)


def run_library(lib: Any, encode: Callable[[str], list[int]], repeats: int) -> dict[str, Any]:
    if hasattr(lib, "prepare"):
        lib.prepare()
    cases = {}
    step_times: list[float] = []
    for name, kind, constraint, answer in CASES:
        entry: dict[str, Any] = {}
        try:
            compile_s = []
            for _ in range(repeats):
                started = time.perf_counter()
                compiled = lib.compile(kind, constraint)
                matcher = lib.matcher(compiled)
                compile_s.append(time.perf_counter() - started)
            entry["compile_ms_p50"] = statistics.median(compile_s) * 1000
            entry["compile_ms_p99"] = _percentile(compile_s, 99) * 1000
            mask = lib.bitmask()
            tokens = encode(answer)
            times, accepted = [], True
            for token in tokens:
                started = time.perf_counter()
                ok = lib.step(matcher, mask, token)
                times.append(time.perf_counter() - started)
                if not ok:
                    accepted = False
                    break
            entry["accepted"] = accepted
            entry["tokens"] = len(tokens)
            entry["mask_us_mean"] = statistics.fmean(times) * 1e6
            step_times += times
        except Exception as error:  # a constraint the library cannot compile: part of coverage
            entry["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
        cases[name] = entry
    hostile = {}
    for name, kind, constraint in HOSTILE:
        started = time.perf_counter()
        try:
            compiled = lib.compile(kind, constraint)
            matcher = lib.matcher(compiled)
            mask = lib.bitmask()
            result = "compiled"
            if lib.name == "llguidance":
                lib.llnp.fill_next_token_bitmask(matcher, mask, 0)
                if matcher.is_error():
                    result = "error at first mask: " + matcher.get_error().splitlines()[0][:80]
                elif not mask.any():
                    result = "compiled; first mask allows nothing"
        except Exception as error:
            result = f"refused: {str(error).splitlines()[0][:80]}"
        hostile[name] = {"result": result, "ms": (time.perf_counter() - started) * 1000}
    covered = sum(1 for c in cases.values() if c.get("accepted"))
    return {
        "cases": cases,
        "hostile": hostile,
        "coverage": f"{covered}/{len(CASES)}",
        "mask_us_per_token_mean": statistics.fmean(step_times) * 1e6 if step_times else float("nan"),
        "mask_us_per_token_p99": _percentile(step_times, 99) * 1e6,
    }


def apply_cost_us(vocab: int, rounds: int = 200) -> float:
    """Applying a bitmask to one row of float32 logits in numpy (what the engine does per constrained row)."""
    rng = np.random.default_rng(0)
    mask = rng.integers(-(1 << 31), 1 << 31, size=(vocab + 31) // 32, dtype=np.int64).astype(np.int32)
    logits = rng.standard_normal(vocab).astype(np.float32)
    started = time.perf_counter()
    for _ in range(rounds):
        allowed = np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab].view(bool)
        np.where(allowed, logits, -np.inf)
    return (time.perf_counter() - started) / rounds * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-root", type=Path, default=Path("models"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    model = find_model(args.models_root)
    tokenizer_json = model.tokenizer_path.read_text()
    tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    report: dict[str, Any] = {"apply_mask_us": apply_cost_us(tokenizer.get_vocab_size())}
    for cls in (LLGuidance, XGrammar):
        started = time.perf_counter()
        lib = cls(tokenizer_json, model.eos_token_ids)
        setup_s = time.perf_counter() - started
        report[cls.name] = {"setup_s": setup_s, **run_library(lib, encode, args.repeats)}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"applying a bitmask to a row of logits (numpy): {report['apply_mask_us']:.0f} us")
    for name in ("llguidance", "xgrammar"):
        r = report[name]
        print(
            f"\n== {name}: tokenizer setup {r['setup_s']:.2f} s, coverage {r['coverage']}, "
            f"mask+accept per token mean {r['mask_us_per_token_mean']:.0f} us, p99 {r['mask_us_per_token_p99']:.0f} us"
        )
        for case, c in r["cases"].items():
            if "error" in c:
                print(f"  {case:36s} ERROR {c['error']}")
            else:
                print(
                    f"  {case:36s} compile p50 {c['compile_ms_p50']:8.2f} ms p99 {c['compile_ms_p99']:8.2f} ms  "
                    f"{c['tokens']:3d} tokens {c['mask_us_mean']:7.0f} us/token  accepted={c['accepted']}"
                )
        for case, h in r["hostile"].items():
            print(f"  hostile: {case:34s} {h['ms']:8.1f} ms  {h['result']}")


if __name__ == "__main__":
    main()
