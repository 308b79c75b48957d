"""Issue 23: structured outputs and tool calling on every API, through Envoy against the live mesh: the
official `openai` SDK (`.parse()` with a Pydantic model, json_object, tools streamed and not, tool results,
the Responses API), the public gRPC and REST APIs, the result cache keyed on the constraint, and hostile
constraints refused with a 400 / INVALID_ARGUMENT naming the field while a neighbour's stream goes on."""

from __future__ import annotations

import json
import re
import threading
import urllib.request

import grpc
import openai
import pytest
from pydantic import BaseModel

from meshserve.v1 import generation_service_pb2 as pb
from meshserve.v1 import generation_service_pb2_grpc as pb_grpc

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


class Person(BaseModel):
    name: str
    age: int
    city: str


class GetWeather(BaseModel):
    city: str


@pytest.fixture(scope="module")
def client(mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{mesh.target}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def stub(mesh):
    with grpc.insecure_channel(mesh.target) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


def test_chat_completions_parse_with_a_pydantic_model(client):
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Invent a person: their name, age and city."}],
        response_format=Person,
        max_tokens=80,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, Person)
    assert Person.model_validate_json(choice.message.content) == choice.message.parsed


def test_json_object_answers_one_json_object(client):
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": 'Reply with the JSON {"ok": true}.'}],
        response_format={"type": "json_object"},
        max_tokens=60,
        temperature=0,
    )
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(completion.choices[0].message.content), dict)


def test_a_required_tool_call_streams_as_delta_tool_calls(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ASK_WEATHER,
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=60,
        temperature=0,
        stream=True,
    )
    names, arguments, finish, content = [], "", None, ""
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            if call.function.name:
                names.append(call.function.name)
            arguments += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and names == ["get_weather"] and not content
    assert set(json.loads(arguments)) == {"city"}


def test_a_named_tool_is_called_with_arguments_valid_against_its_parameters(client):
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=ASK_WEATHER,
        tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice={"type": "function", "function": {"name": "GetWeather"}},
        max_tokens=60,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "GetWeather" and isinstance(call.function.parsed_arguments, GetWeather)
    assert call.id.startswith("call_")


def test_a_tool_result_goes_back_into_the_conversation(client):
    first = client.chat.completions.create(
        model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required", max_tokens=60, temperature=0
    )
    call = first.choices[0].message.tool_calls[0]
    answer = client.chat.completions.create(
        model=MODEL,
        messages=[
            *ASK_WEATHER,
            first.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"},
        ],
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=40,
        temperature=0,
    )
    assert answer.choices[0].message.content and answer.choices[0].message.tool_calls is None


def test_tool_choice_auto_answers_text_or_a_call(client):
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        tools=[WEATHER],
        max_tokens=30,
        temperature=0,
    )
    choice = completion.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        json.loads(choice.message.tool_calls[0].function.arguments)
    else:
        assert choice.message.content and not choice.message.content.startswith("{")


def test_regex_and_choice_through_structured_outputs(client):
    regex = client.completions.create(
        model=MODEL,
        prompt="My phone number is",
        max_tokens=20,
        temperature=0,
        extra_body={"structured_outputs": {"regex": r" [0-9]{3}-[0-9]{4}"}},
    )
    assert re.fullmatch(r" [0-9]{3}-[0-9]{4}", regex.choices[0].text)
    choice = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Is the sky blue? Answer yes or no."}],
        max_tokens=5,
        temperature=0,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
    )
    assert choice.choices[0].message.content in ("yes", "no")


def test_the_responses_api_answers_and_streams_events(client):
    response = client.responses.create(model=MODEL, input="Name a colour.", max_output_tokens=20, temperature=0)
    assert response.status in ("completed", "incomplete") and response.output_text
    assert response.usage.output_tokens > 0
    events = list(
        client.responses.create(model=MODEL, input="Name a colour.", max_output_tokens=20, temperature=0, stream=True)
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] in (
        "response.completed",
        "response.incomplete",
    )
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == response.output_text == events[-1].response.output_text


def test_the_responses_api_takes_a_json_schema_and_function_tools(client):
    parsed = client.responses.parse(
        model=MODEL, input="Invent a person.", text_format=Person, max_output_tokens=80, temperature=0
    )
    assert isinstance(parsed.output_parsed, Person)
    tool = {"type": "function", **WEATHER["function"]}
    called = client.responses.create(
        model=MODEL, input="What is the weather in Rome?", tools=[tool], tool_choice="required", max_output_tokens=60
    )
    (item,) = called.output
    assert item.type == "function_call" and item.name == "get_weather" and "city" in json.loads(item.arguments)


def _deep_schema(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


@pytest.mark.parametrize(
    "fields, param",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": _deep_schema(40)}}},
            "response_format.json_schema.schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"enum": [f"value-{i}" for i in range(20000)]}},
                }
            },
            "response_format.json_schema.schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
                    },
                }
            },
            "response_format.json_schema.schema",
        ),
        ({"extra_body": {"structured_outputs": {"regex": "a(b"}}}, "structured_outputs.regex"),
        ({"extra_body": {"structured_outputs": {"grammar": "start: nowhere"}}}, "structured_outputs.grammar"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ],
    ids=[
        "deep_nesting",
        "huge_enum",
        "recursive_ref",
        "invalid_regex",
        "invalid_grammar",
        "logit_bias_size",
        "logit_bias_id",
    ],
)
def test_hostile_constraints_are_400_naming_the_field_and_a_neighbour_stream_goes_on(client, fields, param):
    neighbour: dict = {}

    def stream() -> None:
        try:
            chunks = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Describe the ocean."}],
                max_tokens=40,
                temperature=0,
                stream=True,
            )
            neighbour["finish"] = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        except Exception as error:  # the assertion below names it
            neighbour["error"] = error

    thread = threading.Thread(target=stream)
    thread.start()
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=10, **fields)
    assert refused.value.body["param"] == param, refused.value.body
    thread.join(120)
    assert neighbour.get("finish") == "length", neighbour


def test_the_grpc_api_takes_a_constraint_and_the_result_cache_keys_on_it(stub):
    def ask(choices: list[str]) -> pb.GenerateComplete:
        request = pb.GenerateRequest(
            chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Pick a fruit for issue 23.")]),
            sampling=pb.SamplingParameters(max_tokens=8, temperature=0.0, choice=pb.ChoiceConstraint(choices=choices)),
        )
        responses = list(stub.Generate(request, timeout=60))
        text = "".join(r.chunk.text for r in responses if r.HasField("chunk"))
        assert text in choices
        return responses[-1].complete

    assert not ask(["apple", "pear"]).cached
    assert not ask(["plum", "fig"]).cached  # the same prompt, another constraint: not the cached answer
    assert ask(["apple", "pear"]).cached


def test_grpc_refuses_a_bad_constraint_with_invalid_argument_naming_the_field(stub):
    request = pb.GenerateRequest(prompt="Hello", sampling=pb.SamplingParameters(max_tokens=4, regex="(unclosed"))
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.Generate(request, timeout=60))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.regex" in refused.value.details()


def test_rest_takes_a_constraint_through_the_transcoder(mesh):
    body = {
        "prompt": "The year the Eiffel Tower opened:",
        "sampling": {"max_tokens": 8, "temperature": 0, "regex": " [0-9]{4}"},
    }
    request = urllib.request.Request(
        f"http://{mesh.target}/v1/generate",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        raw = answer.read().decode()
    # newline-delimited or a JSON array of GenerateResponse, depending on the transcoder's streaming mode
    try:
        messages = json.loads(raw)
    except ValueError:
        messages = [json.loads(line) for line in raw.splitlines() if line.strip()]
    text = "".join(m.get("chunk", {}).get("text", "") for m in messages)
    assert re.fullmatch(r" [0-9]{4}", text), text
