"""Quality measures of a prepared model run by a `DecoderBackend`: perplexity and greedy decoding.

Used by the quality tests (tests/reference/test_quantized.py) and the benchmarks (bench/) to compare
precisions on the same text.
"""

from __future__ import annotations

import numpy as np

from services.inference.backends.base import DecoderBackend, StepBatch
from services.inference.sampling import log_softmax


def token_log_probs(backend: DecoderBackend, token_ids: list[int], slot: int = 0, chunk: int = 512) -> np.ndarray:
    """log p(token[i] | tokens[:i]) for i >= 1: the text is prefilled in chunks of `chunk` tokens
    (each continuing from the cached ones) with logits at every position."""
    out: list[np.ndarray] = []
    ids = np.asarray(token_ids, np.int64)
    for start in range(0, len(ids) - 1, chunk):
        piece = ids[start : start + chunk]
        n = len(piece)
        batch = StepBatch.one_row(piece, slot, cached=start, all_logits=True)
        targets = ids[start + 1 : start + n + 1]
        log_probs = log_softmax(backend.forward(batch)[0][: len(targets)])
        out.append(log_probs[np.arange(len(targets)), targets])
    return np.concatenate(out)


def perplexity(backend: DecoderBackend, token_ids: list[int], slot: int = 0, chunk: int = 512) -> float:
    """exp of the mean negative log-likelihood of every token after the first."""
    return float(np.exp(-token_log_probs(backend, token_ids, slot, chunk).mean()))


def greedy(
    backend: DecoderBackend,
    prompt_ids: list[int],
    max_tokens: int,
    stop_ids: frozenset[int] = frozenset(),
    slot: int = 0,
) -> list[int]:
    """Greedy decoding of one prompt in one slot."""
    n = len(prompt_ids)
    logits = backend.forward(StepBatch.one_row(prompt_ids, slot))
    out: list[int] = []
    cached = n
    while len(out) < max_tokens:
        token = int(logits[0, 0].argmax())
        out.append(token)
        if token in stop_ids:
            break
        logits = backend.forward(StepBatch.one_row([token], slot, cached))
        cached += 1
    return out
