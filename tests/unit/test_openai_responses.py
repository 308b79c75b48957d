"""The Responses API's mapping without HTTP or gRPC: Responses requests to chat requests, chat answers to
Response objects, chat chunks to Responses events."""

from __future__ import annotations

import json

import pytest

from meshserve.v1 import generation_service_pb2 as pb
from services.openai import core, responses
from tests.unit.test_openai_mapping import MODEL


def to_chat(**fields) -> core.Plan:
    request = core._parse(
        responses.ResponsesRequest, json.dumps({"model": MODEL, **fields}).encode(), responses.RESPONSES_FIELDS
    )
    return core.plan_chat(responses.to_chat(request), MODEL, 1)


def test_input_instructions_and_limits_become_a_chat():
    plan = to_chat(input="Hi", instructions="Be brief.", max_output_tokens=9, temperature=0)
    messages = plan.requests[0].chat.messages
    assert [(m.role, m.content) for m in messages] == [("system", "Be brief."), ("user", "Hi")]
    assert plan.requests[0].sampling.max_tokens == 9 and plan.max_tokens_param == "max_completion_tokens"


def test_function_calls_and_their_outputs_go_back_into_the_conversation():
    plan = to_chat(
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city":"Oslo"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "cold"},
        ],
        tools=[{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
    )
    messages = plan.requests[0].chat.messages
    assert [m.role for m in messages] == ["system", "user", "assistant", "tool"]
    assert json.loads(messages[2].content)["tool_calls"][0]["arguments"] == {"city": "Oslo"}
    assert plan.tools is not None and plan.tools.names == ("get_weather",)


def test_text_format_json_schema_is_the_constraint():
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    plan = to_chat(input="x", text={"format": {"type": "json_schema", "name": "X", "schema": schema, "strict": True}})
    assert json.loads(plan.requests[0].sampling.json_schema) == schema


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": [{"type": "image_generation_call"}]}, "input[0].type"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input[0].content[0].type"),
    ],
)
def test_what_is_not_served_is_refused_naming_the_field(fields, param):
    with pytest.raises(responses.ResponsesError) as refused:
        to_chat(**fields)
    assert refused.value.param == param


def test_chat_params_map_back_to_responses_params():
    assert responses.responses_param("max_completion_tokens") == "max_output_tokens"
    assert responses.responses_param("messages[2].role") == "input[2].role"
    assert responses.responses_param("response_format.json_schema.schema") == "text.format.schema"


def _chat_answer(plan: core.Plan, pieces: list[str]) -> list[pb.GenerateResponse]:
    out = [pb.GenerateResponse(chunk=pb.GenerateChunk(text=t)) for t in pieces]
    out.append(
        pb.GenerateResponse(complete=pb.GenerateComplete(finish_reason=pb.FINISH_REASON_STOP, completion_tokens=2))
    )
    return out


def test_a_text_answer_streams_as_numbered_events_and_completes():
    request = responses.ResponsesRequest(model=MODEL, input="Hi", stream=True)
    plan = core.plan_chat(responses.to_chat(request), MODEL, 1)
    builder = core.ResponseBuilder(plan)
    translator = responses.EventTranslator(request, "resp_1", MODEL)
    events = translator.start()
    for response in _chat_answer(plan, ["Hel", "lo"]):
        for chunk in builder.chunks(0, response, {}):
            events += translator.chunk(chunk)
    events += translator.finish(builder.usage())
    kinds = [e["type"] for e in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["output"][0]["content"][0]["text"] == "Hello"
    assert final["usage"]["output_tokens"] == 2


def test_a_tool_call_becomes_a_function_call_item():
    tools = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    request = responses.ResponsesRequest.model_validate(
        {"model": MODEL, "input": "x", "tools": tools, "tool_choice": "required"}
    )
    plan = core.plan_chat(responses.to_chat(request), MODEL, 1)
    builder = core.ResponseBuilder(plan)
    for response in _chat_answer(plan, ['{"tool_calls":[{"name":"f","arguments":{"a":1}}]}']):
        builder.add(0, response)
    answer = responses.from_chat_body(request, builder.body({}))
    (item,) = answer["output"]
    assert item["type"] == "function_call" and item["name"] == "f" and json.loads(item["arguments"]) == {"a": 1}
    assert answer["status"] == "completed" and answer["id"].startswith("resp_")
