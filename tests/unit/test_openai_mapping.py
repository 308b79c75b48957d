"""The OpenAI-compatible API's core without HTTP or gRPC: request bodies to Generate requests, the
router's answers to OpenAI's bodies and server-sent-event chunks, and statuses to OpenAI's errors."""

from __future__ import annotations

import json

import pytest

from meshserve.v1 import generation_service_pb2 as pb
from services.common.errors import DownstreamError, InvalidArgumentError, ResourceExhaustedError, UnavailableError
from services.openai import core
from services.openai.config import OpenAIConfig

MODEL = "SmolLM2-135M-Instruct"


def chat(**fields) -> core.Plan:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **fields}
    return core.plan_chat(core.parse_chat(json.dumps(body).encode()), MODEL, 16)


def completion(**fields) -> core.Plan:
    body = {"model": MODEL, "prompt": "Once upon a time", **fields}
    return core.plan_completion(core.parse_completion(json.dumps(body).encode()), MODEL, 16)


def refused(make, **fields) -> core.OpenAIError:
    with pytest.raises(core.OpenAIError) as raised:
        make(**fields)
    assert raised.value.status == 400
    return raised.value


# requests


def test_chat_fields_map_to_sampling_parameters():
    plan = chat(
        max_tokens=7,
        temperature=0.5,
        top_p=0.9,
        stop="\n",
        seed=3,
        presence_penalty=0.1,
        frequency_penalty=-0.2,
        top_k=40,
        min_p=0.05,
        repetition_penalty=1.1,
        min_tokens=2,
        user="u-1",
        logprobs=True,
        top_logprobs=4,
    )
    (request,) = plan.requests
    s = request.sampling
    assert (s.max_tokens, s.top_k, s.seed, s.min_tokens, s.logprobs) == (7, 40, 3, 2, 4)
    assert s.temperature == pytest.approx(0.5) and s.top_p == pytest.approx(0.9) and s.min_p == pytest.approx(0.05)
    assert s.presence_penalty == pytest.approx(0.1) and s.frequency_penalty == pytest.approx(-0.2)
    assert s.repetition_penalty == pytest.approx(1.1)
    assert list(s.stop) == ["\n"]
    assert [(m.role, m.content) for m in request.chat.messages] == [("user", "Hi")]
    assert request.model == MODEL and request.request_id == plan.id and plan.id.startswith("chatcmpl-")
    assert plan.logprobs == 4 and not plan.stream


def test_unset_fields_stay_unset_for_the_router_defaults():
    (request,) = chat().requests
    for name in ("max_tokens", "temperature", "top_p", "seed", "logprobs", "min_tokens", "top_k"):
        assert not request.sampling.HasField(name), name
    # /v1/completions defaults to 16 tokens, as OpenAI and vLLM do
    assert completion().requests[0].sampling.max_tokens == core.COMPLETIONS_DEFAULT_MAX_TOKENS


def test_max_completion_tokens_wins_over_max_tokens_and_is_named_in_errors():
    plan = chat(max_tokens=5, max_completion_tokens=9)
    assert plan.requests[0].sampling.max_tokens == 9 and plan.max_tokens_param == "max_completion_tokens"
    error = core.to_openai_error(InvalidArgumentError("sampling.max_tokens", "max_tokens must be in [1, 512]"), plan)
    assert (error.status, error.param) == (400, "max_completion_tokens")


def test_n_choices_are_separate_requests_with_consecutive_seeds():
    plan = chat(n=3, seed=10)
    assert [r.sampling.seed for r in plan.requests] == [10, 11, 12]
    assert [r.request_id for r in plan.requests] == [f"{plan.id}-{i}" for i in range(3)]
    assert all(r.chat == plan.requests[0].chat for r in plan.requests)
    unseeded = chat(n=2)
    assert not any(r.sampling.HasField("seed") for r in unseeded.requests)


@pytest.mark.parametrize("n", [0, 5, -1])
def test_n_outside_1_to_4_is_refused(n):
    assert refused(chat, n=n).param == "n"


def test_completion_prompts_as_text_token_ids_and_batches():
    assert completion(prompt="abc").requests[0].prompt == "abc"
    assert list(completion(prompt=[1, 2, 3]).requests[0].token_ids.ids) == [1, 2, 3]
    batch = completion(prompt=["a", "b"], n=2)
    assert [r.prompt for r in batch.requests] == ["a", "a", "b", "b"]
    ids = completion(prompt=[[5], [6, 7]])
    assert [list(r.token_ids.ids) for r in ids.requests] == [[5], [6, 7]]
    assert refused(completion, prompt=[]).param == "prompt"
    assert refused(completion, prompt=["a"] * 5, n=4).param == "n"  # 20 generations > max_choices 16


def test_developer_role_and_text_parts():
    plan = chat(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ]
    )
    assert [(m.role, m.content) for m in plan.requests[0].chat.messages] == [("system", "Be brief."), ("user", "a\nb")]
    error = refused(chat, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    assert error.param == "messages[0].content[0].type"


def test_the_model_goes_to_the_router_as_sent_and_responses_name_the_served_model():
    plan = chat(model="gpt-4o")
    assert plan.requests[0].model == "gpt-4o" and plan.model == MODEL
    assert completion(model="").requests[0].model == ""


def test_vllm_top_k_minus_one_means_disabled():
    assert chat(top_k=-1).requests[0].sampling.top_k == 0


def test_logprobs_switches():
    assert chat(logprobs=True).requests[0].sampling.logprobs == 0  # chosen tokens only
    assert chat(logprobs=False).logprobs is None
    assert refused(chat, top_logprobs=2).param == "top_logprobs"
    assert completion(logprobs=3).requests[0].sampling.logprobs == 3


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"temperature": "hot"}, "temperature", "invalid_type"),
        ({"max_tokens": 1.5}, "max_tokens", "invalid_type"),
        ({"stream": "yes"}, "stream", "invalid_type"),
        ({"stop": ["a", 3]}, "stop[1]", "invalid_type"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
        ({"messages": [{"content": "x"}]}, "messages[0].role", "missing_required_parameter"),
        ({"logprobs": 1}, "logprobs", "invalid_type"),
        ({"seed": True}, "seed", "invalid_type"),
        ({"max_tokens": 1 << 40}, "max_tokens", "invalid_value"),
        ({"seed": 1 << 63}, "seed", "invalid_value"),
        ({"seed": -(1 << 63) - 1}, "seed", "invalid_value"),
    ],
)
def test_wrong_types_are_refused_naming_the_field(fields, param, code):
    error = refused(chat, **fields)
    assert (error.param, error.code, error.type) == (param, code, "invalid_request_error")
    assert param.split("[")[0] in error.message


def test_unknown_fields_are_ignored_and_bodies_that_are_not_objects_refused():
    assert chat(logit_bias={"1": 5}, tools=[], some_future_field={"x": 1}).requests
    for body in (b"[]", b"{not json", b'"text"'):
        with pytest.raises(core.OpenAIError) as raised:
            core.parse_chat(body)
        assert raised.value.status == 400 and raised.value.param is None
    assert refused(completion, prompt=[1, -1]).param == "prompt[1]"


def test_stream_options_include_usage():
    assert chat(stream=True, stream_options={"include_usage": True}).include_usage
    assert not chat(stream=True).include_usage
    assert not chat(stream_options={"include_usage": True}).include_usage  # only streams carry a usage chunk


# errors


def test_field_violations_name_the_openai_param():
    plan, completions = chat(), completion()
    cases = [
        ("sampling.temperature", plan, "temperature"),
        ("sampling.top_p", plan, "top_p"),
        ("sampling.stop", plan, "stop"),
        ("chat.messages", plan, "messages"),
        ("chat.messages[2].role", plan, "messages[2].role"),
        ("chat", plan, "messages"),
        ("input", plan, "messages"),
        ("sampling.logprobs", plan, "top_logprobs"),
        ("sampling.logprobs", completions, "logprobs"),
        ("prompt", completions, "prompt"),
        ("token_ids.ids", completions, "prompt"),
        ("ids[3]", completions, "prompt"),
        ("sampling.max_tokens", completions, "max_tokens"),
    ]
    for field, context, param in cases:
        assert core.openai_param(field, context) == param, field


def test_statuses_map_to_openai_errors():
    plan = chat()
    bad = core.to_openai_error(InvalidArgumentError("sampling.temperature", "temperature must be >= 0, got -1.0"), plan)
    assert bad.body() == {
        "error": {
            "message": "Invalid 'temperature': temperature must be >= 0, got -1.0",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": "invalid_value",
        }
    }
    model = core.to_openai_error(InvalidArgumentError("model", "unknown model 'x'"), plan)
    assert (model.status, model.code, model.param) == (404, "model_not_found", "model")
    busy = core.to_openai_error(ResourceExhaustedError("queue full", retry_after_s=1.5), plan)
    assert busy.status == 429 and busy.headers() == {"retry-after": "2", "retry-after-ms": "1500"}
    down = core.to_openai_error(UnavailableError("draining", retry_after_s=0.2), plan)
    assert down.status == 503 and down.headers()["retry-after"] == "1"
    assert core.to_openai_error(UnavailableError("no replicas"), plan).headers() == {}
    assert core.to_openai_error(DownstreamError("DEADLINE_EXCEEDED", "deadline"), plan).status == 504
    assert core.to_openai_error(DownstreamError("INTERNAL", "reset"), plan).status == 500
    assert core.to_openai_error(ValueError("a bug"), plan).body()["error"]["type"] == "server_error"


# responses


def chunk(
    text: str, ids: list[int], logprobs: list[tuple[int, float, list[tuple[int, float]]]] = ()
) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        chunk=pb.GenerateChunk(
            text=text,
            token_ids=ids,
            logprobs=[
                pb.TokenLogprob(
                    token_id=t,
                    logprob=lp,
                    alternatives=[pb.TokenAlternative(token_id=a, logprob=alp) for a, alp in alts],
                )
                for t, lp, alts in logprobs
            ],
        )
    )


def complete(prompt: int, completion_tokens: int, cached: int = 0, reason=pb.FINISH_REASON_STOP) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        complete=pb.GenerateComplete(
            finish_reason=reason, prompt_tokens=prompt, completion_tokens=completion_tokens, cached_prompt_tokens=cached
        )
    )


TEXTS = {1: "Par", 2: "is", 3: "Lon", 4: "!"}


def test_a_chat_body_with_logprobs_and_usage():
    plan = chat(logprobs=True, top_logprobs=1)
    builder = core.ResponseBuilder(plan)
    builder.add(0, chunk("Par", [1], [(1, -0.1, [(1, -0.1), (3, -2.5)])]))
    builder.add(0, chunk("is", [2], [(2, float("-inf"), [])]))
    builder.add(0, complete(30, 2, cached=16))
    body = builder.body(TEXTS)
    assert body["object"] == "chat.completion" and body["id"] == plan.id and body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Paris"} and choice["finish_reason"] == "stop"
    first, second = choice["logprobs"]["content"]
    assert first == {
        "token": "Par",
        "logprob": pytest.approx(-0.1),
        "bytes": list(b"Par"),
        "top_logprobs": [{"token": "Par", "logprob": pytest.approx(-0.1), "bytes": list(b"Par")}],
    }
    assert second["logprob"] == -9999.0  # JSON has no -inf
    assert body["usage"] == {
        "prompt_tokens": 30,
        "completion_tokens": 2,
        "total_tokens": 32,
        "prompt_tokens_details": {"cached_tokens": 16},
    }
    json.dumps(body)  # serializable as is


def test_usage_counts_each_prompt_once_and_every_choice():
    plan = completion(prompt=["a", "b"], n=2)
    builder = core.ResponseBuilder(plan)
    for index, (prompt, generated) in enumerate([(3, 5), (3, 6), (4, 7), (4, 8)]):
        builder.add(index, chunk("x", [1]))
        builder.add(index, complete(prompt, generated, reason=pb.FINISH_REASON_LENGTH))
    body = builder.body({})
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["finish_reason"] == "length" and c["logprobs"] is None for c in body["choices"])
    assert body["usage"]["prompt_tokens"] == 7 and body["usage"]["completion_tokens"] == 26


def test_completion_logprobs_in_the_legacy_format():
    plan = completion(logprobs=2)
    builder = core.ResponseBuilder(plan)
    builder.add(0, chunk("Paris", [1, 2], [(1, -0.5, [(1, -0.5), (3, -1.0)]), (2, -0.25, [(2, -0.25), (4, -3.0)])]))
    builder.add(0, complete(5, 2))
    logprobs = builder.body(TEXTS)["choices"][0]["logprobs"]
    assert logprobs == {
        "tokens": ["Par", "is"],
        "token_logprobs": [-0.5, -0.25],
        "top_logprobs": [{"Par": -0.5, "Lon": -1.0}, {"is": -0.25, "!": -3.0}],
        "text_offset": [0, 3],
    }
    # without the tokenizer's texts, tokens are named by id as vLLM's --return-tokens-as-token-ids does
    assert builder.body({})["choices"][0]["logprobs"]["tokens"] == ["token_id:1", "token_id:2"]


def test_chat_stream_chunks_role_first_then_deltas_then_finish_and_usage():
    plan = chat(stream=True, stream_options={"include_usage": True}, n=2)
    builder = core.ResponseBuilder(plan)
    events = []
    for index, response in [
        (1, chunk("Lon", [3])),
        (0, chunk("Par", [1])),
        (0, chunk("", [9])),
        (0, chunk("is", [2])),
        (0, complete(10, 3)),
        (1, complete(10, 1, reason=pb.FINISH_REASON_LENGTH)),
    ]:
        events += builder.chunks(index, response, {})
    events += builder.final_chunks()
    assert all(e["id"] == plan.id and e["object"] == "chat.completion.chunk" for e in events)
    deltas = [
        (e["choices"][0]["index"], e["choices"][0]["delta"], e["choices"][0]["finish_reason"]) for e in events[:-1]
    ]
    assert deltas == [
        (1, {"role": "assistant", "content": ""}, None),
        (1, {"content": "Lon"}, None),
        (0, {"role": "assistant", "content": ""}, None),
        (0, {"content": "Par"}, None),
        (0, {"content": "is"}, None),  # the empty chunk (a character still incomplete) is not sent
        (0, {}, "stop"),
        (1, {}, "length"),
    ]
    assert all(e["usage"] is None for e in events[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4
    assert events[-1]["usage"]["prompt_tokens"] == 10


def test_completion_stream_offsets_continue_across_chunks_and_sse_framing():
    plan = completion(stream=True, logprobs=0)
    builder = core.ResponseBuilder(plan)
    first = builder.chunks(0, chunk("Par", [1], [(1, -0.5, [])]), TEXTS)
    second = builder.chunks(0, chunk("is", [2], [(2, -0.1, [])]), TEXTS)
    last = builder.chunks(0, complete(4, 2), TEXTS)
    assert first[0]["choices"][0]["logprobs"]["text_offset"] == [0]
    assert second[0]["choices"][0]["logprobs"]["text_offset"] == [3]
    assert last[0]["choices"][0] == {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}
    assert "usage" not in first[0] and builder.final_chunks() == []
    assert core.sse({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert core.SSE_DONE == b"data: [DONE]\n\n"


# the deadline a request asks for


def test_deadline_headers():
    assert core.request_timeout({"x-meshserve-timeout-s": "2.5"}, stream=True) == 2.5
    assert core.request_timeout({"x-stainless-read-timeout": "600"}, stream=False) == 600.0
    assert core.request_timeout({"x-stainless-read-timeout": "600"}, stream=True) is None  # per event, not a deadline
    assert core.request_timeout({"x-stainless-read-timeout": "soon"}, stream=False) is None
    with pytest.raises(core.OpenAIError) as raised:
        core.request_timeout({"x-meshserve-timeout-s": "-1"}, stream=False)
    assert raised.value.status == 400


def test_config_targets():
    assert OpenAIConfig(("127.0.0.1:1", "127.0.0.1:2")).router_channel_target == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert OpenAIConfig(("dns:///router:50051",)).router_channel_target == "dns:///router:50051"
    with pytest.raises(ValueError, match="IP:port"):
        OpenAIConfig(("router-a:1", "router-b:1"))
