"""The w8a8 precision on the real model (int8 x int8 GEMMs over rows quantized one token at a time,
services/modelstore/quantize.py): a row's logits do not depend on the rows batched with it, decoding
or prefilling, and a backend without meshserve's operator library says what to run."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from services.inference.backends import ort_ops
from services.inference.backends.base import StepBatch
from services.inference.backends.onnxruntime import OnnxRuntimeBackend

PROMPTS = [[504, 3458, 282, 4649, 314], [33, 28, 216, 34, 28, 216, 35, 9, 11], [6126, 2056, 253]]


@pytest.fixture(scope="module")
def w8a8_dir():
    from services.modelstore.prepare import prepare_model
    from tests.conftest import MODELS_ROOT

    return prepare_model(MODELS_ROOT, "w8a8")


def _rows(prompts: list[list[int]], slots: list[int]) -> StepBatch:
    seq = max(map(len, prompts))
    ids = np.zeros((len(prompts), seq), np.int64)
    for r, p in enumerate(prompts):
        ids[r, : len(p)] = p
    lengths = np.array([len(p) for p in prompts])
    return StepBatch(np.array(slots), ids, np.zeros(len(prompts), np.int64), lengths, (lengths - 1)[:, None])


def test_rows_batched_with_others_get_their_solo_logits(w8a8_dir):
    solo_backend = OnnxRuntimeBackend(w8a8_dir, num_slots=1, max_context=64)
    solo = []
    for p in PROMPTS:
        first = solo_backend.forward(_rows([p], [0]))[0, 0]
        token = int(first.argmax())
        step = StepBatch(
            np.array([0]), np.array([[token]]), np.array([len(p)]), np.ones(1, np.int64), np.zeros((1, 1), np.int64)
        )
        solo.append((first, token, solo_backend.forward(step)[0, 0]))

    batched = OnnxRuntimeBackend(w8a8_dir, num_slots=4, max_context=64)
    firsts = batched.forward(_rows(PROMPTS, [2, 0, 1]))[:, 0]  # one padded prefill of three rows
    step = StepBatch(
        np.array([2, 0, 1]),
        np.array([[t] for _, t, _ in solo]),
        np.array([len(p) for p in PROMPTS]),
        np.ones(3, np.int64),
        np.zeros((3, 1), np.int64),
    )
    seconds = batched.forward(step)[:, 0]
    for r, (first, token, second) in enumerate(solo):
        assert int(firsts[r].argmax()) == token
        np.testing.assert_allclose(firsts[r], first, atol=2e-3)
        np.testing.assert_allclose(seconds[r], second, atol=2e-3)
        assert int(seconds[r].argmax()) == int(second.argmax())


def test_a_missing_operator_library_names_the_command_that_builds_it(w8a8_dir, monkeypatch, tmp_path):
    monkeypatch.setattr(ort_ops, "LIBRARY", tmp_path / "libmeshserve_ort_ops.so")
    with pytest.raises(ort_ops.OpsLibraryMissing, match="make install"):
        OnnxRuntimeBackend(w8a8_dir, num_slots=1, max_context=16)


def test_serve_inference_refuses_it_in_one_sentence_before_it_listens(w8a8_dir, monkeypatch, tmp_path):
    from services.cli.main import build_parser
    from services.inference import main as inference_main
    from tests.conftest import MODELS_ROOT

    monkeypatch.setattr(ort_ops, "LIBRARY", tmp_path / "libmeshserve_ort_ops.so")
    monkeypatch.setattr(inference_main, "ServiceProcess", None)  # fails the test if a server is made first
    args = build_parser().parse_args(
        ["serve-inference", "--precision", "w8a8", "--backend", "onnxruntime", "--models-root", str(MODELS_ROOT)]
    )
    with pytest.raises(SystemExit, match=r"^meshserve serve-inference: .*make install"):
        asyncio.run(inference_main.serve(args))
