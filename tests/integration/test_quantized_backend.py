"""The ONNX Runtime backend's in-place KV cache (services/inference/backends/onnxruntime.py) on the
real model: rows in any slot order, slots that are not adjacent, padded chunks that continue a
cache, and padding past a row's capacity all give the logits of the same rows run one by one."""

from __future__ import annotations

import numpy as np
import pytest

from services.inference.backends.base import StepBatch
from services.inference.backends.onnxruntime import OnnxRuntimeBackend

PROMPTS = [[504, 3458, 282, 4649, 314], [33, 28, 216, 34, 28, 216, 35], [6126, 2056, 253, 655, 281]]
ATOL = 2e-3  # one row alone and in a batch may take different kernel paths


def _prefill(backend: OnnxRuntimeBackend, slot: int, ids: list[int], cached: int = 0) -> np.ndarray:
    n = len(ids)
    return backend.forward(
        StepBatch(np.array([slot]), np.array([ids]), np.array([cached]), np.array([n]), np.array([[n - 1]]))
    )[0, 0]


def _decode(backend: OnnxRuntimeBackend, slots: list[int], tokens: list[int], cached: list[int]) -> np.ndarray:
    rows = len(slots)
    batch = StepBatch(
        np.array(slots),
        np.array(tokens)[:, None],
        np.array(cached),
        np.ones(rows, np.int64),
        np.zeros((rows, 1), np.int64),
    )
    return backend.forward(batch)[:, 0]


@pytest.fixture(scope="module")
def solo(model_dir):
    """Each prompt prefilled and decoded for two steps in its own backend slot, one at a time."""
    backend = OnnxRuntimeBackend(model_dir, num_slots=1, max_context=64)
    out = []
    for ids in PROMPTS:
        first = _prefill(backend, 0, ids)
        steps = [first]
        token, cached = int(first.argmax()), len(ids)
        for _ in range(2):
            steps.append(_decode(backend, [0], [token], [cached])[0])
            token, cached = int(steps[-1].argmax()), cached + 1
        out.append(steps)
    return out


@pytest.mark.parametrize("slots", [[2, 0, 1], [5, 0, 3]], ids=["reordered", "scattered"])
def test_batched_rows_in_any_slots_match_solo(model_dir, solo, slots):
    backend = OnnxRuntimeBackend(model_dir, num_slots=6, max_context=64)
    for slot, ids in zip(slots, PROMPTS):
        _prefill(backend, slot, ids)
    tokens = [int(steps[0].argmax()) for steps in solo]
    cached = [len(ids) for ids in PROMPTS]
    for step in (1, 2):
        # the engine lists rows in its own order: reverse it to check the backend's row mapping
        order = [2, 0, 1]
        logits = _decode(backend, [slots[r] for r in order], [tokens[r] for r in order], [cached[r] for r in order])
        for i, r in enumerate(order):
            assert np.abs(logits[i] - solo[r][step]).max() < ATOL
            assert logits[i].argmax() == solo[r][step].argmax()
        tokens = [int(solo[r][step].argmax()) for r in range(3)]
        cached = [c + 1 for c in cached]


def test_a_padded_chunk_continuing_a_cache_matches_unpadded_rows(model_dir):
    a, b = PROMPTS[0] + PROMPTS[2], PROMPTS[1]
    reference = OnnxRuntimeBackend(model_dir, num_slots=1, max_context=64)
    expected = []
    for ids, split in ((a, 4), (b, 5)):
        _prefill(reference, 0, ids[:split])
        n = len(ids) - split
        got = reference.forward(
            StepBatch(np.array([0]), np.array([ids[split:]]), np.array([split]), np.array([n]), np.arange(n)[None])
        )
        expected.append(got[0])

    backend = OnnxRuntimeBackend(model_dir, num_slots=2, max_context=64)
    _prefill(backend, 1, a[:4])
    _prefill(backend, 0, b[:5])
    seq = len(a) - 4
    input_ids = np.zeros((2, seq), np.int64)
    input_ids[0] = a[4:]
    input_ids[1, : len(b) - 5] = b[5:]
    new = np.array([seq, len(b) - 5])
    indices = np.array([np.arange(seq), np.minimum(np.arange(seq), new[1] - 1)])
    got = backend.forward(StepBatch(np.array([1, 0]), input_ids, np.array([4, 5]), new, indices))
    assert np.abs(got[0] - expected[0]).max() < ATOL
    assert np.abs(got[1, : new[1]] - expected[1]).max() < ATOL


def test_padding_past_a_rows_capacity_runs_the_rows_apart(model_dir):
    backend = OnnxRuntimeBackend(model_dir, num_slots=2, max_context=16)
    reference = OnnxRuntimeBackend(model_dir, num_slots=1, max_context=16)
    long_ids = (PROMPTS[0] * 3)[:14]
    _prefill(backend, 0, long_ids)
    _prefill(reference, 0, long_ids)
    # row 0: 14 cached + 1 new, padded to the 4 new tokens of row 1: 14 + 4 > 16
    input_ids = np.array([[long_ids[0], 0, 0, 0], PROMPTS[1][:4]])
    got = backend.forward(
        StepBatch(np.array([0, 1]), input_ids, np.array([14, 0]), np.array([1, 4]), np.array([[0], [3]]))
    )
    assert np.abs(got[0, 0] - _decode(reference, [0], [long_ids[0]], [14])[0]).max() < ATOL
    assert np.abs(got[1, 0] - _prefill(reference, 0, PROMPTS[1][:4])).max() < ATOL
