"""Issue 11: the tokenizer stays responsive while huge inputs arrive.

A running greedy stream's inter-token latency (ITL) is measured undisturbed, then while waves of ten
~1 MB prompts, and of ten 256-message chats of 4 kB messages, arrive through Envoy together (just under
Envoy's 1 MiB request limit). Every such request is refused (it cannot fit the context), but it must not
stall anyone else's stream on its way: tokenizing and rendering happen off the tokenizer's event loop,
or not at all when the byte length alone proves the input too long. Before that, each 1 MB prompt held
the tokenizer's event loop for about a second, and with it every running stream's detokenization.

ITL here is what a client sees: the time between two consecutive chunks of the stream (a stall
followed by a burst is one long gap, not many short ones).

A control wave of the same ten 1 MB prompts with temperature=inf is refused by the router before the
tokenizer sees it: what it costs the stream is the cost of moving 10 MB through Envoy and the router,
which the tokenizer can do nothing about. It is printed beside the others, and named in a failure, so
a slow wave can be told from a slow tokenizer; the assertion is the issue's, on the two real waves.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from meshserve.v1 import generation_service_pb2 as pb
from meshserve.v1 import generation_service_pb2_grpc as pb_grpc
from tests.conftest import REPO, wait_until
from tests.e2e.conftest import launch_mesh
from tests.e2e.innocents import GreedyStream, greedy_request
from tests.fuzzing import ENVOY_MAX_REQUEST_BYTES, outcome_of_error

STREAM_PROMPT = "Write a long story about a dragon who learns to bake bread."
STREAM_TOKENS = 500
WAVES = 3  # of each kind: more gaps under load than one wave gives, for a fair 99th percentile
PROMPT_BYTES = 1_000_000
CHAT_MESSAGES, MESSAGE_BYTES = 256, 4_000
# Client-side gaps are quantised by the scheduler of a shared 2-core machine: a thread woken for a chunk can
# wait a 4 ms tick (CONFIG_HZ=250) behind other processes, twice per chunk (client and router), whatever
# the mesh does. The slack absorbs that without hiding a stall: a tokenization held on the event loop
# stalls streams for hundreds of milliseconds.
SLACK_S = 0.008


def _text(size: int, offset: int) -> str:
    """`size` bytes of natural English (tokenizing it costs what real text costs), rotated by `offset`."""
    base = (REPO / "tests" / "data" / "perplexity_text.txt").read_text(encoding="utf-8")
    base = base[offset % len(base) :] + base[: offset % len(base)]
    return (base * (size // len(base.encode()) + 1)).encode()[:size].decode("utf-8", "ignore")


def _huge_prompts() -> list[pb.GenerateRequest]:
    return [
        pb.GenerateRequest(prompt=_text(PROMPT_BYTES, 97 * i), sampling=pb.SamplingParameters(max_tokens=16))
        for i in range(10)
    ]


def _controls() -> list[pb.GenerateRequest]:
    """The huge prompts, refused for their temperature before they are tokenized."""
    return [
        pb.GenerateRequest(prompt=r.prompt, sampling=pb.SamplingParameters(max_tokens=16, temperature=math.inf))
        for r in _huge_prompts()
    ]


def _huge_chats() -> list[pb.GenerateRequest]:
    requests = []
    for i in range(10):
        messages = [
            pb.ChatMessage(role=("user", "assistant")[j % 2], content=_text(MESSAGE_BYTES, 131 * i + 7 * j))
            for j in range(CHAT_MESSAGES)
        ]
        requests.append(
            pb.GenerateRequest(chat=pb.ChatMessages(messages=messages), sampling=pb.SamplingParameters(max_tokens=16))
        )
    return requests


class _Sender:
    """Sends waves of requests from another process, so the client work of 10 MB in flight (serializing,
    copying, its threads and the GIL) is not counted in the stream's gaps: what is measured is the mesh.
    The process connects its ten channels first, then sends one wave per kind written to its stdin and
    answers with a JSON line: when the wave began and ended (time.monotonic, the same clock in every
    process) and how each request ended."""

    def __init__(self, target: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.e2e.test_tokenizer_load", target],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout.readline().strip() == "ready"

    def wave(self, kind: str) -> dict:
        self.process.stdin.write(kind + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(30)


def _send_wave(stubs: list, wave: list[pb.GenerateRequest]) -> dict:
    """Sends `wave` at once, one request per stub and thread."""
    outcomes: list = [None] * len(wave)
    start = threading.Barrier(len(wave) + 1)

    def one(i: int) -> None:
        start.wait()
        try:
            outcomes[i] = ["OK", None, f"{len(list(stubs[i].Generate(wave[i], timeout=120)))} responses"]
        except grpc.RpcError as error:
            outcome = outcome_of_error(error, 0.0)
            outcomes[i] = [outcome.code.name, outcome.field, outcome.details[:160]]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(wave))]
    for t in threads:
        t.start()
    start.wait()
    began = time.monotonic()
    for t in threads:
        t.join()
    return {"began": began, "ended": time.monotonic(), "outcomes": outcomes}


def _serve_waves(target: str) -> None:
    """The sender process: ten channels, ten threads, one wave per line of stdin."""
    requests = {"prompts": _huge_prompts(), "chats": _huge_chats(), "control": _controls()}
    channels = [grpc.insecure_channel(target) for _ in range(10)]
    for channel in channels:
        grpc.channel_ready_future(channel).result(timeout=30)
    stubs = [pb_grpc.GenerationServiceStub(channel) for channel in channels]
    print("ready", flush=True)
    for line in sys.stdin:
        print(json.dumps(_send_wave(stubs, requests[line.strip()])), flush=True)


def _gaps(stream: GreedyStream) -> np.ndarray:
    """(start, end) of each interval between consecutive chunks, after the first token."""
    times = np.asarray(stream.chunk_times)
    return np.stack([times[:-1], times[1:]], axis=1)


def _overlapping(gaps: np.ndarray, windows: list[tuple[float, float]]) -> np.ndarray:
    """The lengths of the gaps that overlap any window: a stall that began while requests arrived counts."""
    keep = np.zeros(len(gaps), dtype=bool)
    for began, ended in windows:
        keep |= (gaps[:, 1] >= began) & (gaps[:, 0] <= ended)
    return gaps[keep, 1] - gaps[keep, 0]


@pytest.fixture(scope="module")
def steady_mesh(model_dir, otlp_receiver):
    """A mesh whose stream advances one token a step: prompt-lookup drafts make a single stream's gaps
    uneven (a step of several tokens, then a longer one), which would blur the stalls this test bounds."""
    with launch_mesh(otlp_receiver, inference_args=["--num-slots=8", "--num-speculative-tokens=0"]) as mesh:
        yield mesh


def test_a_running_stream_keeps_its_pace_while_huge_inputs_arrive(steady_mesh):
    mesh = steady_mesh
    prompts, chats = _huge_prompts(), _huge_chats()
    for r in prompts + chats:  # under Envoy's limit: they reach the router and the tokenizer
        assert len(r.SerializeToString()) + 5 < ENVOY_MAX_REQUEST_BYTES
    request = greedy_request(STREAM_PROMPT, STREAM_TOKENS, min_tokens=STREAM_TOKENS)
    sender = _Sender(mesh.target)

    unloaded = GreedyStream(mesh.target, request)
    unloaded.run()
    assert unloaded.error is None, unloaded.outcome()
    unloaded_gaps = _gaps(unloaded)
    unloaded_itl = unloaded_gaps[:, 1] - unloaded_gaps[:, 0]
    unloaded_p99 = float(np.percentile(unloaded_itl, 99))

    loaded = GreedyStream(mesh.target, request)
    loaded.start()
    wait_until(lambda: len(loaded.tokens) >= 20, 120, "the stream is 20 tokens in")
    windows: dict[str, list[tuple[float, float]]] = {"prompts": [], "chats": [], "control": []}
    refusals: list[str] = []
    for _ in range(WAVES):
        for kind, spans in windows.items():
            if not loaded.running:
                break
            wave = sender.wave(kind)
            if loaded.running:  # only waves the stream outlasted: their stalls are all in its gaps
                spans.append((wave["began"], wave["ended"]))
            refusals += [
                f"{kind}: {code} {field} {details}"
                for code, field, details in wave["outcomes"]
                if code != "INVALID_ARGUMENT"
            ]
            time.sleep(0.3)
    sender.close()
    loaded.join(300)
    assert loaded.error is None, loaded.outcome()
    assert loaded.text == unloaded.text

    report = [
        f"unloaded ITL: p50 {np.percentile(unloaded_itl, 50) * 1000:.1f} ms, "
        + f"p99 {unloaded_p99 * 1000:.1f} ms ({len(unloaded_itl)} gaps)"
    ]
    too_slow, p99s = [], {}
    for kind, spans in windows.items():
        if not spans:
            too_slow.append(f"{kind}: the stream ended before a wave of them was answered")
            continue
        itl = _overlapping(_gaps(loaded), spans)
        p99s[kind] = float(np.percentile(itl, 99))
        lasted = ", ".join(f"{(e - b) * 1000:.0f}" for b, e in spans)
        report.append(
            f"while ten huge {kind} arrive (waves of {lasted} ms): p50 {np.percentile(itl, 50) * 1000:.1f} ms, "
            f"p99 {p99s[kind] * 1000:.1f} ms, max {itl.max() * 1000:.1f} ms ({len(itl)} gaps)"
        )
    # The bound: 2x the unloaded p99 (the issue's), or, where merely moving the same megabytes through Envoy
    # and the router costs more than that (the control wave: on a quiet 2-core machine, unloaded 27 ms,
    # control 99 ms), at most 1.5x what the control cost: tokenizing adds no stall of its own. A tokenization
    # held on the event loop (before this work) stalled the stream 4-5 s, far past either bound.
    for kind in ("prompts", "chats"):
        if kind not in p99s:
            continue
        bound = max(2 * unloaded_p99, 1.5 * p99s.get("control", 0.0)) + SLACK_S
        if p99s[kind] > bound:
            too_slow.append(
                f"{kind}: ITL p99 {p99s[kind] * 1000:.1f} ms > {bound * 1000:.1f} ms "
                f"(2 x unloaded {unloaded_p99 * 1000:.1f} ms, or 1.5 x the control, + {SLACK_S * 1000:.0f} ms)"
            )
    print("\n" + "\n".join(report))
    assert not refusals, "huge inputs must be refused with INVALID_ARGUMENT:\n" + "\n".join(refusals[:6])
    control = f"{p99s['control'] * 1000:.1f} ms" if "control" in p99s else "not measured"
    assert not too_slow, "\n".join(too_slow + [f"(the control wave, refused before the tokenizer: ITL p99 {control})"])


if __name__ == "__main__":
    _serve_waves(sys.argv[1])
