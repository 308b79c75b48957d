"""Structured outputs and tools in the OpenAI API's core: request fields to the constraint and the tools'
prompt, outputs to tool_calls (whole and streamed), and errors naming the OpenAI field."""

from __future__ import annotations

import json

import pytest

from meshserve.v1 import generation_service_pb2 as pb
from services.common.errors import InvalidArgumentError
from services.openai import core, tools
from tests.unit.test_openai_mapping import MODEL, chat, completion, refused

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def test_response_format_json_schema_becomes_the_constraint():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    plan = chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}})
    assert json.loads(plan.requests[0].sampling.json_schema) == schema
    assert plan.constraint_param == "response_format.json_schema.schema"
    assert chat(response_format={"type": "json_object"}).requests[0].sampling.json_object
    assert chat(response_format={"type": "text"}).requests[0].sampling.WhichOneof("constraint") is None


@pytest.mark.parametrize(
    "extra, kind",
    [({"regex": "[0-9]+"}, "regex"), ({"choice": ["a", "b"]}, "choice"), ({"grammar": 'start: "a"'}, "grammar")],
)
def test_structured_outputs_carries_regex_choice_and_grammar_on_both_endpoints(extra, kind):
    for plan in (chat(structured_outputs=extra), completion(structured_outputs=extra)):
        assert plan.requests[0].sampling.WhichOneof("constraint") == kind
        assert plan.constraint_param == f"structured_outputs.{kind}"


def test_logit_bias_keys_are_token_ids():
    assert dict(chat(logit_bias={"5": -100, "7": 2.5}).requests[0].sampling.logit_bias) == {5: -100.0, 7: 2.5}
    assert refused(chat, logit_bias={"hello": 1}).param == "logit_bias"


def test_tools_go_into_a_system_turn_and_constrain_the_output_to_calls():
    plan = chat(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    messages = plan.requests[0].chat.messages
    assert messages[0].role == "system" and "get_weather" in messages[0].content and "get_time" in messages[0].content
    schema = json.loads(plan.requests[0].sampling.json_schema)
    calls = schema["properties"]["tool_calls"]
    assert calls["maxItems"] == 1 and len(calls["items"]["anyOf"]) == 2
    parallel = chat(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=True)
    assert json.loads(parallel.requests[0].sampling.json_schema)["properties"]["tool_calls"]["maxItems"] == 8
    assert (
        json.loads(chat(tools=[WEATHER], tool_choice="required").requests[0].sampling.json_schema)["properties"][
            "tool_calls"
        ]["maxItems"]
        == 1
    )  # unset: one call (see services/openai/tools.py)
    assert plan.tools == tools.ToolMode("required", ("get_weather", "get_time"))


def test_a_named_tool_choice_offers_that_tool_alone_and_auto_allows_text():
    named = chat(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    schema = json.loads(named.requests[0].sampling.json_schema)
    assert schema["properties"]["tool_calls"]["items"]["properties"]["name"] == {"const": "get_time"}
    auto = chat(tools=[WEATHER])
    assert auto.tools is not None and auto.tools.choice == "auto"
    assert auto.requests[0].sampling.grammar.startswith("start: TEXT | call")
    none = chat(tools=[WEATHER], tool_choice="none")
    assert none.tools is None and none.requests[0].sampling.WhichOneof("constraint") is None
    assert all("get_weather" not in m.content for m in none.requests[0].chat.messages)


def test_tool_results_and_earlier_calls_are_in_the_conversation():
    plan = chat(
        tools=[WEATHER],
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
        ],
    )
    messages = plan.requests[0].chat.messages
    assert [m.role for m in messages] == ["system", "user", "assistant", "tool"]
    assert json.loads(messages[2].content) == {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
    assert messages[3].content == "18 C, sunny"


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_unservable_structured_fields_are_400_naming_the_field(fields, param):
    assert refused(chat, **fields).param == param


def test_a_constraint_the_engine_refuses_names_the_openai_field():
    plan = chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/x"}}})
    error = core.to_openai_error(InvalidArgumentError("sampling.json_schema", "does not compile"), plan)
    assert (error.status, error.param) == (400, "response_format.json_schema.schema")
    regex = chat(structured_outputs={"regex": "a("})
    assert (
        core.to_openai_error(InvalidArgumentError("sampling.regex", "bad"), regex).param == "structured_outputs.regex"
    )


def _answer(text_pieces: list[str], finish=pb.FINISH_REASON_STOP) -> list[pb.GenerateResponse]:
    out = [pb.GenerateResponse(chunk=pb.GenerateChunk(text=t)) for t in text_pieces]
    out.append(
        pb.GenerateResponse(complete=pb.GenerateComplete(finish_reason=finish, completion_tokens=len(text_pieces)))
    )
    return out


ENVELOPE = ['{"tool_calls":[{"name":"get_weather",', '"arguments":{"city":"Paris"}}', "]}"]


def test_a_call_envelope_is_returned_as_tool_calls():
    builder = core.ResponseBuilder(chat(tools=[WEATHER], tool_choice="required"))
    for response in _answer(ENVELOPE):
        builder.add(0, response)
    choice = builder.body({})["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert call["id"].startswith("call_") and call["type"] == "function"


def test_tool_calls_stream_as_delta_tool_calls():
    builder = core.ResponseBuilder(chat(tools=[WEATHER], stream=True))
    chunks = [c for r in _answer(ENVELOPE) for c in builder.chunks(0, r, {})]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert not any(d.get("content") for d in deltas)  # nothing of the envelope as text
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""} and calls[0]["id"].startswith("call_")
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"city": "Paris"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_with_tool_choice_auto_a_text_answer_streams_as_content_at_once():
    builder = core.ResponseBuilder(chat(tools=[WEATHER], stream=True))
    first = list(builder.chunks(0, pb.GenerateResponse(chunk=pb.GenerateChunk(text="It is")), {}))
    assert first[-1]["choices"][0]["delta"] == {"content": "It is"}
    rest = [c for r in _answer([" sunny."]) for c in builder.chunks(0, r, {})]
    assert rest[-1]["choices"][0]["finish_reason"] == "stop"


def test_an_envelope_cut_by_max_tokens_is_text_with_finish_length():
    builder = core.ResponseBuilder(chat(tools=[WEATHER], tool_choice="required", stream=True))
    chunks = [c for r in _answer(ENVELOPE[:1], pb.FINISH_REASON_LENGTH) for c in builder.chunks(0, r, {})]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == ENVELOPE[0]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_the_model_name_is_unchanged():
    assert chat(tools=[WEATHER]).model == MODEL
