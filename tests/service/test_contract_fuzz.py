"""Issue 11: the internal APIs enforce the request contract when called directly.

The tokenizer and inference services run as real processes (`meshserve serve-tokenizer`,
`meshserve serve-inference` with the real model); hypothesis sends them requests over every field with
extreme values (tests/fuzzing.py), as anything that reaches their ports could. Invariants: every call ends
OK, INVALID_ARGUMENT or RESOURCE_EXHAUSTED as the contract says, with no internal address in its message;
an innocent greedy stream beside the inference fuzz keeps its tokens; afterwards the reference requests
answer exactly as before.

Reproducible: MESHSERVE_FUZZ_SEED picks the examples (printed), MESHSERVE_FUZZ_EXAMPLES how many.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from meshserve.inference.v1 import inference_service_pb2 as inference_pb
from meshserve.tokenizer.v1 import tokenizer_service_pb2 as tokenizer_pb
from tests.conftest import MODELS_ROOT, REPO, free_port, stop_process
from tests.fuzzing import (
    LONGEST_TOKEN_BYTES,
    Outcome,
    decode_expectation,
    decode_ids,
    decode_stream_ids,
    describe,
    encode_expectation,
    encode_requests,
    inference_expectation,
    inference_requests,
    outcome_of_error,
    problems,
)

SEED = int(os.environ.get("MESHSERVE_FUZZ_SEED", "1101"))
EXAMPLES = int(os.environ.get("MESHSERVE_FUZZ_EXAMPLES", "300"))
READ_CHUNKS = 3
MAX_CONTEXT, MAX_NEW_TOKENS = 512, 256
REFERENCE_PROMPT = [504, 3575, 282, 4649, 314]  # "Once upon a time, there"
REFERENCE_TEXT = "Streaming 😀 text, 世界!\n" + " " * 80 + "end"


def _settings(function):
    return seed(SEED)(
        settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )(function)
    )


def _serve(command: str, *args: str) -> Iterator[str]:
    """Runs `meshserve <command>` on a free port until the generator is closed; yields its target
    once its health check says SERVING."""
    port = free_port()
    log_path = REPO / ".run" / f"{command}-{port}.log"
    log_path.parent.mkdir(exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.cli.main",
                command,
                "--port",
                str(port),
                "--metrics-port",
                "0",
                "--models-root",
                str(MODELS_ROOT),
                *args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        target = f"127.0.0.1:{port}"
        try:
            with grpc.insecure_channel(target) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                deadline = time.monotonic() + 180
                while True:
                    assert process.poll() is None, log_path.read_text()[-3000:]
                    assert time.monotonic() < deadline, f"{command} did not become ready"
                    try:
                        if (
                            health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                            == health_pb2.HealthCheckResponse.SERVING
                        ):
                            break
                    except grpc.RpcError:
                        pass
                    time.sleep(0.2)
            yield target
            assert process.poll() is None, f"{command} exited:\n{log_path.read_text()[-3000:]}"
        finally:
            stop_process(process)


@pytest.fixture(scope="module")
def tokenizer_target(model_dir):
    yield from _serve("serve-tokenizer")


@pytest.fixture(scope="module")
def inference_target(model_dir):
    yield from _serve(
        "serve-inference",
        "--num-slots",
        "4",
        "--max-context",
        str(MAX_CONTEXT),
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),
        "--max-waiting",
        "4",
    )


def _unary(channel: grpc.Channel, method: str, wire: bytes, deserializer) -> Outcome:
    sent = time.monotonic()
    try:
        channel.unary_unary(method, request_serializer=None, response_deserializer=deserializer)(wire, timeout=60)
        return Outcome(grpc.StatusCode.OK, latency_s=time.monotonic() - sent)
    except grpc.RpcError as error:
        return outcome_of_error(error, time.monotonic() - sent)


def _decode_stream(channel: grpc.Channel, batches: list[list[int]]) -> Outcome:
    call = channel.stream_stream(
        "/meshserve.tokenizer.v1.TokenizerService/DecodeStream",
        request_serializer=tokenizer_pb.DecodeStreamRequest.SerializeToString,
        response_deserializer=tokenizer_pb.DecodeStreamResponse.FromString,
    )
    sent = time.monotonic()
    try:
        responses = list(call(iter([tokenizer_pb.DecodeStreamRequest(ids=ids) for ids in batches]), timeout=60))
        outcome = Outcome(grpc.StatusCode.OK, latency_s=time.monotonic() - sent)
        if len(responses) != len(batches):
            outcome.notes.append(f"{len(responses)} responses to {len(batches)} requests")
        return outcome
    except grpc.RpcError as error:
        return outcome_of_error(error, time.monotonic() - sent)


def _tokenizer_reference(channel: grpc.Channel) -> tuple[list[int], str, str]:
    encode = channel.unary_unary(
        "/meshserve.tokenizer.v1.TokenizerService/Encode",
        request_serializer=tokenizer_pb.EncodeRequest.SerializeToString,
        response_deserializer=tokenizer_pb.EncodeResponse.FromString,
    )
    decode = channel.unary_unary(
        "/meshserve.tokenizer.v1.TokenizerService/Decode",
        request_serializer=tokenizer_pb.DecodeRequest.SerializeToString,
        response_deserializer=tokenizer_pb.DecodeResponse.FromString,
    )
    ids = list(encode(tokenizer_pb.EncodeRequest(text=REFERENCE_TEXT), timeout=30).ids)
    chat = tokenizer_pb.ChatMessages(messages=[tokenizer_pb.ChatMessage(role="user", content=REFERENCE_TEXT)])
    chat_ids = list(encode(tokenizer_pb.EncodeRequest(chat=chat), timeout=30).ids)
    text = decode(tokenizer_pb.DecodeRequest(ids=chat_ids, skip_special_tokens=False), timeout=30).text
    streamed = channel.stream_stream(
        "/meshserve.tokenizer.v1.TokenizerService/DecodeStream",
        request_serializer=tokenizer_pb.DecodeStreamRequest.SerializeToString,
        response_deserializer=tokenizer_pb.DecodeStreamResponse.FromString,
    )
    pieces = [r.text for r in streamed(iter([tokenizer_pb.DecodeStreamRequest(ids=[t]) for t in ids]), timeout=30)]
    return ids + chat_ids, text, "".join(pieces)


def test_the_oracle_knows_the_longest_token(model_dir):
    """tests/fuzzing.py bounds a text's tokens below by its bytes / LONGEST_TOKEN_BYTES: true of this vocabulary."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir.tokenizer_path))
    longest = max(
        len(tokenizer.decode([i], skip_special_tokens=False).encode()) for i in range(tokenizer.get_vocab_size())
    )
    assert longest == LONGEST_TOKEN_BYTES


def test_fuzzed_tokenizer_requests_end_ok_or_invalid_and_change_nothing(tokenizer_target):
    codes: Counter[str] = Counter()
    failures: list[str] = []
    with grpc.insecure_channel(tokenizer_target) as channel:
        before = _tokenizer_reference(channel)
        assert before[2] == REFERENCE_TEXT

        requests = st.one_of(
            encode_requests().map(lambda wire: ("Encode", wire)),
            st.tuples(decode_ids, st.booleans()).map(
                lambda d: ("Decode", tokenizer_pb.DecodeRequest(ids=d[0], skip_special_tokens=d[1]).SerializeToString())
            ),
            st.lists(decode_stream_ids, min_size=1, max_size=3).map(lambda batches: ("DecodeStream", batches)),
        )

        @_settings
        @given(requests)
        def fuzz(method_and_request) -> None:
            method, request = method_and_request
            if method == "Encode":
                outcome = _unary(
                    channel,
                    "/meshserve.tokenizer.v1.TokenizerService/Encode",
                    request,
                    tokenizer_pb.EncodeResponse.FromString,
                )
                expect, shown = encode_expectation(request), describe(request, tokenizer_pb.EncodeRequest)
            elif method == "Decode":
                outcome = _unary(
                    channel,
                    "/meshserve.tokenizer.v1.TokenizerService/Decode",
                    request,
                    tokenizer_pb.DecodeResponse.FromString,
                )
                expect = decode_expectation(list(tokenizer_pb.DecodeRequest.FromString(request).ids))
                shown = describe(request, tokenizer_pb.DecodeRequest)
            else:
                outcome = _decode_stream(channel, request)
                expect = decode_expectation([t for ids in request for t in ids])
                shown = f"DecodeStream of {[len(ids) for ids in request]} ids: {[ids[:4] for ids in request]}"
            codes[f"{method} {outcome.code.name}"] += 1
            found = problems(expect, outcome)
            if found:
                failures.append(f"{method} {shown}\n    -> " + "\n    -> ".join(found))

        fuzz()
        after = _tokenizer_reference(channel)
    print(f"\ntokenizer fuzz: seed {SEED}, {sum(codes.values())} calls: {dict(codes)}")
    assert not failures, f"{len(failures)} calls broke the contract (seed {SEED}):\n" + "\n".join(failures[:15])
    assert after == before


class _Innocent(threading.Thread):
    """A greedy request run again and again beside the fuzz, each run compared with its undisturbed tokens."""

    def __init__(self, target: str, request: inference_pb.GenerateRequest, expected: list[int]) -> None:
        super().__init__(daemon=True)
        self.target, self.request, self.expected = target, request, expected
        self.stopping = threading.Event()
        self.runs = 0
        self.failures: list[str] = []

    def run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            generate = channel.unary_stream(
                "/meshserve.inference.v1.InferenceService/Generate",
                request_serializer=inference_pb.GenerateRequest.SerializeToString,
                response_deserializer=inference_pb.GenerateResponse.FromString,
            )
            while not self.stopping.is_set():
                self.runs += 1
                try:
                    tokens = [t for r in generate(self.request, timeout=120) for t in r.token_ids]
                except grpc.RpcError as error:
                    self.failures.append(f"run {self.runs}: {error.code().name}: {error.details()}")
                    time.sleep(0.2)
                    continue
                if tokens != self.expected:
                    self.failures.append(f"run {self.runs}: tokens differ from the undisturbed run")


def _greedy(max_tokens: int) -> inference_pb.GenerateRequest:
    return inference_pb.GenerateRequest(
        request_id="reference",
        prompt_token_ids=REFERENCE_PROMPT,
        stop_token_ids=[2],
        sampling=inference_pb.SamplingParameters(max_tokens=max_tokens, temperature=0.0, top_p=1.0),
    )


def test_fuzzed_inference_requests_end_ok_invalid_or_exhausted_and_hurt_no_one(inference_target):
    codes: Counter[str] = Counter()
    failures: list[str] = []
    with grpc.insecure_channel(inference_target) as channel:
        raw = channel.unary_stream(
            "/meshserve.inference.v1.InferenceService/Generate",
            request_serializer=None,
            response_deserializer=inference_pb.GenerateResponse.FromString,
        )

        def reference(max_tokens: int = 32) -> list[int]:
            return [t for r in raw(_greedy(max_tokens).SerializeToString(), timeout=120) for t in r.token_ids]

        before = reference()
        assert len(before) == 32
        innocent = _Innocent(inference_target, _greedy(64), reference(64))

        @_settings
        @given(inference_requests())
        def fuzz(wire: bytes) -> None:
            sent = time.monotonic()
            call = raw(wire, timeout=120)
            outcome: Outcome | None = None
            try:
                for n, _ in enumerate(call, 1):
                    outcome = outcome or Outcome(grpc.StatusCode.OK, accepted=True)
                    if n >= READ_CHUNKS:
                        call.cancel()
                        break
            except grpc.RpcError as error:
                if outcome is None:
                    outcome = outcome_of_error(error, time.monotonic() - sent)
                elif error.code() != grpc.StatusCode.CANCELLED:
                    outcome.late_error, outcome.details = error.code(), error.details() or ""
            outcome = outcome or Outcome(grpc.StatusCode.OK)
            codes[outcome.code.name + (" (accepted)" if outcome.accepted else "")] += 1
            found = problems(inference_expectation(wire, MAX_CONTEXT, MAX_NEW_TOKENS), outcome)
            if found:
                failures.append(f"{describe(wire, inference_pb.GenerateRequest)}\n    -> " + "\n    -> ".join(found))

        innocent.start()
        try:
            fuzz()
        finally:
            innocent.stopping.set()
            innocent.join(120)
        after = reference()
    print(
        f"\ninference fuzz: seed {SEED}, {sum(codes.values())} requests: {dict(codes)}; {innocent.runs} innocent runs"
    )
    broken = []
    if failures:
        broken.append(f"{len(failures)} requests broke the contract (seed {SEED}):\n" + "\n".join(failures[:15]))
    if innocent.failures:
        broken.append("the innocent stream was hurt:\n" + "\n".join(innocent.failures[:10]))
    if after != before:
        broken.append("the reference request's tokens changed")
    assert not broken, "\n".join(broken)
    assert innocent.runs >= 1
