"""The request contract (services/common/contract.py): every bound, and one reading of both protos."""

from __future__ import annotations

import math

import pytest

from meshserve.inference.v1 import inference_service_pb2 as inference_pb
from meshserve.v1 import generation_service_pb2 as pb
from services.common.contract import (
    MAX_CHAT_MESSAGES,
    MAX_PROMPT_BYTES,
    Constraint,
    EngineLimits,
    SamplingParams,
    request_id_or_new,
    sampling_from_proto,
    sampling_to_proto,
    validate_chat,
    validate_generation,
    validate_logit_bias,
    validate_prompt_text,
    validate_sampling,
    validate_stop_strings,
    validate_token_ids,
)
from services.common.errors import InvalidArgumentError

LIMITS = EngineLimits(vocab_size=1000, max_context=256, max_new_tokens=64)


def field_of(call) -> str:
    with pytest.raises(InvalidArgumentError) as caught:
        call()
    return caught.value.field


@pytest.mark.parametrize(
    "name, value",
    [
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", -0.1),
        ("temperature", 100.5),
        ("top_p", 0.0),
        ("top_p", math.nan),
        ("top_p", 1.01),
        ("top_k", -1),
        ("min_p", -math.inf),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 0.001),
        ("repetition_penalty", math.inf),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -math.nan),
        ("max_tokens", 0),
        ("max_tokens", 65),
        ("min_tokens", -1),
        ("min_tokens", 9),
        ("logprobs", 21),
        ("prompt_logprobs", -1),
    ],
)
def test_every_sampling_bound_names_its_field(name, value):
    params = SamplingParams(**{"max_tokens": 8, name: value})
    assert field_of(lambda: validate_sampling(params, 64)) == f"sampling.{name}"


def test_the_edges_of_every_bound_are_accepted():
    for params in (
        SamplingParams(
            max_tokens=64,
            temperature=100,
            top_p=1,
            min_p=1,
            repetition_penalty=100,
            presence_penalty=2,
            frequency_penalty=-2,
            min_tokens=64,
            logprobs=20,
            prompt_logprobs=0,
        ),
        SamplingParams(max_tokens=1, temperature=0, top_p=1e-6, repetition_penalty=0.01, top_k=2**31 - 1),
    ):
        validate_sampling(params, 64)


def test_both_protos_read_alike_unset_fields_take_the_defaults():
    public = pb.SamplingParameters(temperature=0.0, top_k=5, stop=["x"])
    internal = inference_pb.SamplingParameters(temperature=0.0, top_k=5)
    expected = SamplingParams(max_tokens=32, temperature=0.0, top_k=5)
    assert sampling_from_proto(public, 32) == sampling_from_proto(internal, 32) == expected
    assert sampling_from_proto(pb.SamplingParameters(), 32) == SamplingParams(max_tokens=32)


def test_what_the_router_writes_the_engine_reads_back_unchanged():
    params = SamplingParams(
        max_tokens=9,
        temperature=0.7,
        top_p=0.9,
        seed=2**64 - 1,
        top_k=3,
        min_p=0.05,
        repetition_penalty=1.5,
        presence_penalty=-0.5,
        frequency_penalty=0.25,
        min_tokens=2,
        logprobs=0,
        prompt_logprobs=4,
    )
    message = sampling_to_proto(params, inference_pb.SamplingParameters())
    read = sampling_from_proto(inference_pb.SamplingParameters.FromString(message.SerializeToString()))
    assert read == SamplingParams(
        **{**params.__dict__, **{k: pytest.approx(v) for k, v in params.__dict__.items() if isinstance(v, float)}}
    )


@pytest.mark.parametrize(
    "request_id, ok",
    [
        ("", True),
        ("abc-DEF_1.2:3", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("a b", False),
        ("é", False),
        ("a\nb", False),
        ("{}", False),
    ],
)
def test_request_ids_are_short_and_safe_to_log(request_id, ok):
    if ok:
        assert request_id_or_new(request_id) == request_id or not request_id
    else:
        assert field_of(lambda: request_id_or_new(request_id)) == "request_id"


def test_an_empty_request_id_draws_a_new_one():
    first, second = request_id_or_new(""), request_id_or_new("")
    assert first != second and len(first) == 32


def test_token_ids_stay_inside_the_vocabulary_and_their_count():
    validate_token_ids([0, 999], 1000, "f")
    assert field_of(lambda: validate_token_ids([1000], 1000, "sampling.stop_token_ids")) == "sampling.stop_token_ids"
    assert field_of(lambda: validate_token_ids([4_000_000_000], 1000, "f")) == "f"
    assert field_of(lambda: validate_token_ids([1] * 65, 1000, "f", limit=64)) == "f"


def test_stop_strings_prompts_and_chats_have_bounds():
    assert field_of(lambda: validate_stop_strings(["a"] * 9)) == "sampling.stop"
    assert field_of(lambda: validate_stop_strings([""])) == "sampling.stop"
    assert field_of(lambda: validate_stop_strings(["é" * 33])) == "sampling.stop"  # 66 bytes
    assert field_of(lambda: validate_prompt_text(" \n", "prompt")) == "prompt"
    assert field_of(lambda: validate_prompt_text("é" * (MAX_PROMPT_BYTES // 2 + 1), "prompt")) == "prompt"
    validate_prompt_text("x" * MAX_PROMPT_BYTES, "prompt")
    assert field_of(lambda: validate_chat([])) == "chat.messages"
    assert field_of(lambda: validate_chat([("user", "hi")] * (MAX_CHAT_MESSAGES + 1))) == "chat.messages"
    assert field_of(lambda: validate_chat([("user", "hi"), ("robot", "x")])) == "chat.messages[1].role"
    assert field_of(lambda: validate_chat([("user", "x" * (MAX_PROMPT_BYTES // 2 + 1))] * 2)) == "chat.messages"


def test_the_engine_boundary_rechecks_the_same_contract():
    ok = SamplingParams(max_tokens=8)
    validate_generation(LIMITS, [1, 2], ok, [2], [], 3)
    assert field_of(lambda: validate_generation(LIMITS, [], ok)) == "prompt_token_ids"
    assert field_of(lambda: validate_generation(LIMITS, [1, 1000], ok)) == "prompt_token_ids"
    assert field_of(lambda: validate_generation(LIMITS, [1], ok, [4_000_000_000])) == "stop_token_ids"
    assert field_of(lambda: validate_generation(LIMITS, [1], ok, [], [7] * 8)) == "resumed_token_ids"
    assert field_of(lambda: validate_generation(LIMITS, [1], ok, [], [], 4)) == "priority"
    assert field_of(lambda: validate_generation(LIMITS, [1] * 250, ok)) == "sampling.max_tokens"
    assert (
        field_of(lambda: validate_generation(LIMITS, [1], SamplingParams(temperature=math.nan, max_tokens=8)))
        == "sampling.temperature"
    )


# -- constraints and logit_bias ----------------------------------------------------------------


def _nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


@pytest.mark.parametrize(
    "constraint, field",
    [
        (Constraint("json_schema", "not json"), "sampling.json_schema"),
        (Constraint("json_schema", "[1, 2]"), "sampling.json_schema"),
        (Constraint("json_schema", ""), "sampling.json_schema"),
        (Constraint("json_schema", _nested(33)), "sampling.json_schema"),
        (Constraint("json_schema", "[" * 100_000 + "]" * 100_000), "sampling.json_schema"),
        (Constraint("json_schema", '{"enum": ["' + "x" * (64 << 10) + '"]}'), "sampling.json_schema"),
        (Constraint("regex", "a" * ((64 << 10) + 1)), "sampling.regex"),
        (Constraint("grammar", "   "), "sampling.grammar"),
        (Constraint("choice", choices=()), "sampling.choice.choices"),
        (Constraint("choice", choices=tuple(str(i) for i in range(257))), "sampling.choice.choices"),
        (Constraint("choice", choices=("ok", "")), "sampling.choice.choices[1]"),
        (Constraint("choice", choices=("x" * 257,)), "sampling.choice.choices[0]"),
    ],
)
def test_constraints_out_of_bounds_name_their_field(constraint, field):
    assert field_of(lambda: validate_sampling(SamplingParams(max_tokens=8, constraint=constraint), 64)) == field


def test_constraints_inside_the_bounds_are_accepted():
    for constraint in (
        Constraint("json_schema", _nested(31)),
        Constraint("json_object"),
        Constraint("regex", "[a-z]+"),
        Constraint("choice", choices=tuple(str(i) for i in range(256))),
        Constraint("grammar", 'start: "a"'),
    ):
        validate_sampling(SamplingParams(max_tokens=8, constraint=constraint), 64)


def test_logit_bias_is_bounded_in_entries_ids_and_values():
    validate_logit_bias([(0, -100.0), (999, 100.0)], 1000)
    for bias in ([(1000, 1.0)], [(1, 100.5)], [(1, math.nan)], [(i, 1.0) for i in range(301)]):
        assert field_of(lambda bias=bias: validate_logit_bias(bias, 1000)) == "sampling.logit_bias"


@pytest.mark.parametrize(
    "constraint",
    [
        Constraint("json_schema", '{"type": "object"}'),
        Constraint("json_object"),
        Constraint("regex", "[0-9]+"),
        Constraint("choice", choices=("yes", "no")),
        Constraint("grammar", 'start: "a"'),
    ],
)
def test_a_constraint_and_logit_bias_travel_router_to_engine_unchanged(constraint):
    params = SamplingParams(max_tokens=9, constraint=constraint, logit_bias=((3, -1.5), (7, 2.0)))
    public = sampling_to_proto(params, pb.SamplingParameters())
    assert sampling_from_proto(pb.SamplingParameters.FromString(public.SerializeToString()), 9) == params
    internal = sampling_to_proto(sampling_from_proto(public, 9), inference_pb.SamplingParameters())
    assert sampling_from_proto(inference_pb.SamplingParameters.FromString(internal.SerializeToString()), 9) == params


def test_json_object_false_is_no_constraint():
    assert sampling_from_proto(pb.SamplingParameters(json_object=False)).constraint is None
