"""Innocent greedy streams: well-formed requests whose answers must not change whatever else the mesh is sent.

Greedy decoding is deterministic and the engine's rows do not depend on each other, so a stream's text
run beside anything (poison, fuzz, load) must equal its text run undisturbed.
"""

from __future__ import annotations

import threading
import time

import grpc

from meshserve.v1 import generation_service_pb2 as pb
from meshserve.v1 import generation_service_pb2_grpc as pb_grpc

# each answers with 200 tokens or more when greedy, so max_tokens, not the model, ends the stream
PROMPTS = [
    "Write a long story about a dragon who learns to bake bread.",
    "Explain in detail how a steam engine works, step by step.",
    "Describe the history of the Roman Empire from its founding to its fall.",
    "Write a detailed guide to planting a vegetable garden.",
]


def greedy_request(prompt: str, max_tokens: int = 180, min_tokens: int = 0) -> pb.GenerateRequest:
    """no_cache: each run is generated, not replayed from the router's result cache (greedy answers
    are cached), so it shares the engine's batches with whatever else runs."""
    return pb.GenerateRequest(
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=prompt)]),
        sampling=pb.SamplingParameters(max_tokens=max_tokens, temperature=0.0, min_tokens=min_tokens),
        no_cache=True,
    )


class GreedyStream(threading.Thread):
    """One stream in a thread: its tokens, text and chunk arrival times, how it completed or its error."""

    def __init__(self, target: str, request: pb.GenerateRequest, timeout_s: float = 300) -> None:
        super().__init__(daemon=True)
        self.target, self.request, self.timeout_s = target, request, timeout_s
        self.tokens: list[int] = []
        self.text = ""
        self.chunk_times: list[float] = []
        self.complete: pb.GenerateComplete | None = None
        self.error: grpc.RpcError | None = None
        self.ended_at: float | None = None

    def run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            try:
                for response in pb_grpc.GenerationServiceStub(channel).Generate(self.request, timeout=self.timeout_s):
                    if response.HasField("chunk"):
                        self.chunk_times.append(time.monotonic())
                        self.tokens += response.chunk.token_ids
                        self.text += response.chunk.text
                    else:
                        self.complete = response.complete
            except grpc.RpcError as error:
                self.error = error
        self.ended_at = time.monotonic()

    @property
    def running(self) -> bool:
        return self.ended_at is None

    def outcome(self) -> str:
        if self.error is not None:
            return f"{self.error.code().name} after {len(self.tokens)} tokens: {self.error.details()}"
        return f"OK, {len(self.tokens)} tokens"


def run_together(target: str, requests: list[pb.GenerateRequest]) -> list[GreedyStream]:
    streams = [GreedyStream(target, r) for r in requests]
    for s in streams:
        s.start()
    for s in streams:
        s.join()
    return streams


class ContinuousInnocents:
    """Each prompt's greedy stream run again and again in its own thread until `stop()`: every run is
    compared with the prompt's undisturbed text. `stop()` lets the runs in progress finish."""

    def __init__(self, target: str, undisturbed: dict[str, str], max_tokens: int) -> None:
        self.target, self.undisturbed, self.max_tokens = target, undisturbed, max_tokens
        self.runs = 0
        self.failures: list[str] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, args=(p,), daemon=True) for p in undisturbed]

    def _loop(self, prompt: str) -> None:
        while not self._stopping.is_set():
            stream = GreedyStream(self.target, greedy_request(prompt, self.max_tokens))
            stream.run()
            with self._lock:
                self.runs += 1
                if stream.error is not None:
                    self.failures.append(f"{prompt[:30]!r}: {stream.outcome()}")
                elif stream.text != self.undisturbed[prompt]:
                    self.failures.append(
                        f"{prompt[:30]!r}: text differs from its undisturbed run ({len(stream.tokens)} tokens)"
                    )

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self, timeout_s: float = 300) -> None:
        self._stopping.set()
        for t in self._threads:
            t.join(timeout_s)
            assert not t.is_alive(), "an innocent stream did not end"
