"""Issue 11: a request may fail itself, never its neighbours.

The poison requests of the issue, sent through Envoy while four innocent greedy streams run on the
same inference replica: each must be refused with INVALID_ARGUMENT naming its field, and the four
streams must finish with the text they have undisturbed. Before the request contract and the engine's
fault isolation, the first poison ended every running stream with UNAVAILABLE "engine step failed".
"""

from __future__ import annotations

import math
import time

import grpc

from meshserve.v1 import generation_service_pb2 as pb
from meshserve.v1 import generation_service_pb2_grpc as pb_grpc
from tests.conftest import wait_until
from tests.e2e.innocents import PROMPTS, GreedyStream, greedy_request, run_together
from tests.fuzzing import HOST_PORT, outcome_of_error

MAX_TOKENS = 180

POISONS = [
    (
        "out-of-vocabulary stop id with min_tokens",
        pb.GenerateRequest(
            prompt="Hello", sampling=pb.SamplingParameters(stop_token_ids=[4_000_000_000], min_tokens=2)
        ),
        "sampling.stop_token_ids",
    ),
    (
        "temperature=inf with min_tokens",
        pb.GenerateRequest(prompt="Hello", sampling=pb.SamplingParameters(temperature=math.inf, min_tokens=2)),
        "sampling.temperature",
    ),
    (
        "temperature=inf",
        pb.GenerateRequest(prompt="Hello", sampling=pb.SamplingParameters(temperature=math.inf)),
        "sampling.temperature",
    ),
    ("a 100 kB request_id", pb.GenerateRequest(prompt="Hello", request_id="r" * 100_000), "request_id"),
    (
        "a 20,000-message chat",
        pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")] * 20_000)),
        "chat.messages",
    ),
]


def test_poison_requests_fail_alone_while_four_greedy_streams_run(mesh):
    pids = mesh.pids()
    undisturbed = run_together(mesh.target, [greedy_request(p, MAX_TOKENS) for p in PROMPTS])
    for s in undisturbed:  # the streams are long enough to be running while every poison is answered
        assert s.error is None and len(s.tokens) == MAX_TOKENS, s.outcome()

    streams = [GreedyStream(mesh.target, greedy_request(p, MAX_TOKENS)) for p in PROMPTS]
    for s in streams:
        s.start()
    wait_until(lambda: all(len(s.tokens) >= 10 for s in streams), 120, "every stream is 10 tokens in")
    answers = []
    with grpc.insecure_channel(mesh.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        for name, request, field in POISONS:
            sent = time.monotonic()
            try:
                responses = list(stub.Generate(request, timeout=60))
                answers.append((name, field, f"OK: accepted, {len(responses)} responses", None))
            except grpc.RpcError as error:
                answers.append((name, field, None, outcome_of_error(error, time.monotonic() - sent)))
    last_answer = time.monotonic()
    for s in streams:
        s.join(300)

    report, problems = [], []
    for name, field, accepted, outcome in answers:
        if outcome is None:
            problems.append(f"poison {name!r} was {accepted}")
            report.append(f"  {name}: {accepted}")
            continue
        report.append(
            f"  {name}: {outcome.code.name} field={outcome.field!r} in {outcome.latency_s * 1000:.0f} ms "
            f"({outcome.details[:100]!r})"
        )
        if outcome.code != grpc.StatusCode.INVALID_ARGUMENT or outcome.field != field:
            problems.append(
                f"poison {name!r} ended {outcome.code.name} naming {outcome.field!r}; expected "
                f"INVALID_ARGUMENT naming {field!r}"
            )
        if HOST_PORT.search(outcome.details):
            problems.append(f"poison {name!r}: the message names an internal address: {outcome.details!r}")
    for before, after in zip(undisturbed, streams):
        report.append(f"  innocent {after.request.chat.messages[0].content[:30]!r}: {after.outcome()}")
        if after.error is not None:
            problems.append(f"innocent stream {after.outcome()}")
        elif after.text != before.text or after.tokens != before.tokens:
            problems.append(f"innocent stream text differs from its undisturbed run after {len(after.tokens)} tokens")
        elif after.ended_at < last_answer:
            problems.append("an innocent stream finished before the poisons were answered: it proves nothing")
    if mesh.pids() != pids:
        problems.append(f"processes restarted: {pids} -> {mesh.pids()}")
    print("\n".join(["poison requests beside four greedy streams:", *report]))
    assert not problems, "\n".join(problems)
