"""tests/integration: single components (the engine, the tokenizer core, backends, Envoy's config) over
the real prepared model or a real binary (Envoy's validator, buf), without starting the mesh."""

from __future__ import annotations

import threading

import pytest

from services.common.finish import FinishReason
from services.tokenizer.core import TokenizerCore


class Collector:
    """Gathers the engine's outputs per request id; `done` is set once `expected` requests have finished."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.finish: dict[str, FinishReason] = {}
        self.done = threading.Event()
        self.expected = 0

    def __call__(self, request_id: str):
        def on_output(output) -> None:
            self.tokens.setdefault(request_id, []).extend(output.token_ids)
            if output.finish_reason:
                self.finish[request_id] = output.finish_reason
                if len(self.finish) >= self.expected:
                    self.done.set()

        return on_output


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return TokenizerCore(model_dir)
