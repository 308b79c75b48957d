"""The OpenAI-compatible API with the official `openai` SDK, through Envoy, against the live mesh: chat
and completions, streamed and not, n choices, logprobs, usage, errors as the SDK's own exception types,
deadlines, and a client that goes away freeing its inference slot. A second Envoy of our own in front of
the same mesh adds JWT auth and a per-tenant rate limit (401 and 429 as production configures them)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import openai
import pytest

from services.gateway.config import TenantRateLimit
from services.gateway.credentials import mint_token
from tests.e2e.conftest import metric_value, secured_envoy

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
RATE_LIMIT = 2  # requests per tenant per minute at the secured Envoy; every test uses its own tenants
LONG = {"max_tokens": 400, "extra_body": {"min_tokens": 400}}  # runs for many seconds unless cancelled


@pytest.fixture(scope="module")
def client(mesh) -> openai.OpenAI:
    # no retries: every status the test provokes must reach it as is
    return openai.OpenAI(base_url=f"http://{mesh.target}/v1", api_key="unused", max_retries=0, timeout=120)


def running(mesh) -> float:
    return metric_value(mesh.metrics("inference"), "meshserve_num_requests_running")


def router_count(mesh, code: str) -> float:
    return metric_value(mesh.metrics("router"), "meshserve_requests_total", code=code)


def wait_until_idle(mesh, within_s: float) -> float:
    """Seconds until the inference replica runs nothing; fails after `within_s`."""
    started = time.monotonic()
    while running(mesh) != 0:
        assert time.monotonic() - started < within_s, "the inference slot was not freed"
        time.sleep(0.05)
    return time.monotonic() - started


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "meshserve"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_chat_greedy_answer_and_usage(client):
    response = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=32)
    (choice,) = response.choices
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and response.id.startswith("chatcmpl-")
    assert response.model == MODEL and response.object == "chat.completion"
    usage = response.usage
    assert usage.prompt_tokens > 5 and 1 <= usage.completion_tokens <= 32
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 0 <= usage.prompt_tokens_details.cached_tokens <= usage.prompt_tokens


# The router's result cache answers a repeated deterministic request with the stored answer, so each comparison
# below sets a different max_tokens on its two sides: both are generated, and the shorter greedy (or equally
# seeded) answer is a prefix of the longer one.


def test_chat_stream_is_the_same_answer_in_chunks_with_usage_last(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            temperature=0,
            max_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=31)
    assert chunks[0].choices[0].delta.role == "assistant"
    contents = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert len(contents) >= 3, "streamed as tokens come, not in one piece"
    streamed = "".join(contents)
    assert streamed and whole.choices[0].message.content.startswith(streamed)  # greedy: the same answer
    finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    assert finish in ("stop", "length") and all(c.usage is None for c in chunks[:-1])
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.prompt_tokens == whole.usage.prompt_tokens
    assert (
        usage.completion_tokens == 30
        if finish == "length"
        else usage.completion_tokens == whole.usage.completion_tokens
    )


def test_completions_streamed_and_not(client):
    whole = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8)
    (choice,) = whole.choices
    assert "Paris" in choice.text and choice.finish_reason == "length" and whole.usage.completion_tokens == 8
    streamed = list(
        client.completions.create(
            model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=7, stream=True
        )
    )
    text = "".join(c.choices[0].text for c in streamed)
    assert text and choice.text.startswith(text)
    assert streamed[-1].choices[0].finish_reason == "length"


def test_n_choices_are_parallel_seeded_generations(client):
    def ask(max_tokens: int = 12, **fields):
        return client.chat.completions.create(
            model=MODEL, messages=QUESTION, temperature=1.0, max_tokens=max_tokens, logprobs=True, **fields
        )

    pair = ask(n=2, seed=7)
    assert [c.index for c in pair.choices] == [0, 1]
    assert pair.usage.completion_tokens == sum(len(c.logprobs.content) for c in pair.choices)
    # choice i is seeded seed + i: the second choice is what a single request with seed 8 gets
    assert ask(13, seed=8).choices[0].message.content.startswith(pair.choices[1].message.content)


def test_chat_logprobs_name_the_tokens_and_their_alternatives(client):
    response = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=16, logprobs=True, top_logprobs=3
    )
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    # the end-of-sequence token that ended the answer is a generated token (counted in usage), not text
    tokens = "".join(item.token for item in content)
    assert response.choices[0].finish_reason == "stop" and tokens == response.choices[0].message.content + "<|im_end|>"
    for item in content:
        assert item.logprob <= 0 and bytes(item.bytes) == item.token.encode()
        alternatives = [a.logprob for a in item.top_logprobs]
        assert len(alternatives) == 3 and alternatives == sorted(alternatives, reverse=True)
        # greedy: the chosen token is the most likely one
        assert item.top_logprobs[0].token == item.token and item.top_logprobs[0].logprob == pytest.approx(item.logprob)


def test_completion_logprobs_in_the_legacy_format(client):
    response = client.completions.create(
        model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=6, logprobs=2
    )
    (choice,) = response.choices
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text and len(logprobs.tokens) == 6
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(6)]
    assert all(len(top) >= 1 and max(top.values()) <= 0 for top in logprobs.top_logprobs)


def test_a_request_is_one_trace_from_envoy_through_the_openai_service_to_inference(client, mesh):
    trace_id, parent = os.urandom(16), os.urandom(8)
    # sampled without a seed, so the router's result cache cannot answer it without inference
    client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0.7,
        max_tokens=4,
        extra_headers={"traceparent": f"00-{trace_id.hex()}-{parent.hex()}-01"},
    )
    deadline = time.monotonic() + 20
    while True:
        spans = mesh.receiver.spans_of_trace(trace_id)
        by_id = {span.span_id: (service, span) for service, span in spans}
        openai_spans = [
            span for service, span in spans if service == "meshserve-openai" and span.name.startswith("POST")
        ]
        if openai_spans and {"meshserve-envoy", "meshserve-router", "meshserve-inference"} <= {s for s, _ in spans}:
            break
        assert time.monotonic() < deadline, f"trace incomplete: {sorted({s for s, _ in spans})}"
        time.sleep(0.2)
    (server_span,) = openai_spans
    assert server_span.name == "POST /v1/chat/completions"
    assert by_id[server_span.parent_span_id][0] == "meshserve-envoy"  # Envoy's span, which continues the client's
    # the router's Generate span hangs off the openai service's gRPC call, a child of its request span
    (router_span,) = [
        span
        for service, span in spans
        if service == "meshserve-router" and span.name.endswith("GenerationService/Generate")
    ]
    service, call = by_id[router_span.parent_span_id]
    assert service == "meshserve-openai" and call.parent_span_id == server_span.span_id


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": -1}, "temperature"),  # the router's field violation sampling.temperature
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 100000}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),  # the tokenizer's
        ({"temperature": "warm"}, "temperature"),  # a wrong JSON type, refused by the service itself
        ({"n": 5}, "n"),
    ],
)
def test_bad_requests_are_bad_request_errors_naming_the_param(client, mesh, fields, param):
    request = {"model": MODEL, "messages": QUESTION, "max_tokens": 4, **fields}
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(**request)
    error = raised.value
    assert error.status_code == 400 and error.param == param and error.type == "invalid_request_error"
    assert error.body["message"]


def test_an_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=4)
    assert raised.value.code == "model_not_found" and raised.value.param == "model"


def test_a_deadline_that_passes_is_a_504_and_frees_the_slot(client, mesh):
    with pytest.raises(openai.InternalServerError) as raised:
        client.completions.create(
            model=MODEL, prompt="Once upon a time", extra_headers={"x-meshserve-timeout-s": "0.5"}, **LONG
        )
    assert raised.value.status_code == 504 and raised.value.code == "deadline_exceeded"
    wait_until_idle(mesh, within_s=5)


def test_a_client_that_leaves_mid_stream_frees_its_slot(client, mesh):
    wait_until_idle(mesh, within_s=30)
    cancelled = router_count(mesh, "CANCELLED")
    stream = client.completions.create(model=MODEL, prompt="Once upon a time", stream=True, **LONG)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert running(mesh) == 1
    stream.close()
    # 400 tokens take many seconds; a freed slot is back within a few decode steps
    assert wait_until_idle(mesh, within_s=5) < 5
    deadline = time.monotonic() + 5
    while router_count(mesh, "CANCELLED") < cancelled + 1:
        assert time.monotonic() < deadline, "the router never saw the call cancelled"
        time.sleep(0.05)


def test_a_client_that_leaves_before_a_whole_answer_frees_its_slot(mesh):
    wait_until_idle(mesh, within_s=30)
    body = json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "min_tokens": 400})
    connection = http.client.HTTPConnection("127.0.0.1", mesh.port, timeout=30)
    connection.request("POST", "/v1/completions", body=body, headers={"content-type": "application/json"})
    deadline = time.monotonic() + 10
    while running(mesh) != 1:
        assert time.monotonic() < deadline, "the generation never started"
        time.sleep(0.05)
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    assert wait_until_idle(mesh, within_s=5) < 5


# behind JWT auth and a per-tenant rate limit


@dataclass
class SecuredEndpoint:
    port: int
    credentials: object

    def client(self, tenant: str | None) -> openai.OpenAI:
        key = mint_token(self.credentials, tenant) if tenant else "not-a-jwt"
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def secured(mesh, tmp_path_factory) -> Iterator[SecuredEndpoint]:
    with secured_envoy(
        mesh,
        tmp_path_factory.mktemp("openai-secured"),
        rate_limit=TenantRateLimit(RATE_LIMIT, 60),
        max_request_bytes=64 * 1024,
        rest=True,
        openai=True,
    ) as envoy:
        yield SecuredEndpoint(envoy.port, envoy.credentials)


def test_no_valid_token_is_an_authentication_error(secured):
    with pytest.raises(openai.AuthenticationError) as raised:
        secured.client(None).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)
    assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"
    assert "Jwt" in raised.value.message
    with pytest.raises(openai.AuthenticationError):
        secured.client(None).models.list()


def test_the_tenant_rate_limit_is_a_rate_limit_error_with_retry_after(secured):
    client = secured.client("openai-busy")
    for _ in range(RATE_LIMIT):
        assert (
            client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=4)
            .choices[0]
            .text
        )
    with pytest.raises(openai.RateLimitError) as raised:
        client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4)
    error = raised.value
    assert error.status_code == 429 and error.code == "rate_limit_exceeded"
    assert f"rate_limit_per_tenant is {RATE_LIMIT} requests per 60 s" in error.message
    assert error.response.headers["retry-after"] == "60"
    # another tenant is served
    assert secured.client("openai-other").models.list().data[0].id == MODEL


def test_an_oversize_body_is_refused_at_envoy_in_openai_shape(secured):
    with pytest.raises(openai.APIStatusError) as raised:
        secured.client("openai-huge").completions.create(model=MODEL, prompt="x" * (64 * 1024 + 1), max_tokens=4)
    assert raised.value.status_code == 413 and raised.value.code == "request_too_large"


def test_rest_generate_still_transcodes_beside_the_openai_routes(secured):
    request = urllib.request.Request(
        f"http://127.0.0.1:{secured.port}/v1/generate",
        method="POST",
        data=json.dumps(
            {"prompt": "The capital of France is", "sampling": {"max_tokens": 4, "temperature": 0}}
        ).encode(),
        headers={
            "content-type": "application/json",
            "authorization": f"Bearer {mint_token(secured.credentials, 'openai-rest')}",
        },
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        lines = [json.loads(line) for line in response.read().decode().splitlines() if line.strip()]
    assert "Paris" in "".join(line["chunk"]["text"] for line in lines[:-1])
    assert lines[-1]["complete"]["completion_tokens"] == 4
