"""The real TensorRT backend on a real GPU: engine build, agreement with ONNX Runtime, engine cache.

Runs only where the `tensorrt` package (TensorRT 10) imports and PyTorch sees a CUDA GPU; everywhere
else (CI included) every test here is skipped with the reason. See docs/tensorrt.md.
"""

from __future__ import annotations

import numpy as np
import pytest

from services.inference.backends.base import StepBatch
from services.inference.backends.probes import probe_cuda, probe_tensorrt, unavailable_message

_TRT = probe_tensorrt()
_CUDA = probe_cuda() if _TRT.available else None
_MISSING = _TRT if not _TRT.available else _CUDA if not _CUDA.available else None  # type: ignore[union-attr]
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=unavailable_message(_MISSING) if _MISSING else "")

NUM_SLOTS, MAX_CONTEXT, MAX_PREFILL = 2, 128, 32
PROMPT = [1, 504, 3458, 314, 260, 3187, 282, 4194, 30, 378, 314, 2]  # fixed ids: no tokenizer in the loop
GREEDY_STEPS = 16


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("trt-cache")


@pytest.fixture(scope="module")
def ort(model_dir):
    from services.inference.backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(model_dir, NUM_SLOTS, MAX_CONTEXT)


def _trt(model_dir, engine_dir, precision):
    from services.inference.backends.tensorrt import TensorRTBackend

    return TensorRTBackend(
        model_dir, NUM_SLOTS, MAX_CONTEXT, max_prefill=MAX_PREFILL, precision=precision, cache_dir=engine_dir
    )


@pytest.fixture(scope="module")
def trt_fp32(model_dir, engine_dir):
    backend = _trt(model_dir, engine_dir, "fp32")
    yield backend
    backend.close()


def _step(slot: int, tokens: list[int], cached: int) -> StepBatch:
    n = len(tokens)
    return StepBatch(
        slots=np.array([slot]),
        input_ids=np.array([tokens], np.int64),
        cached_lengths=np.array([cached]),
        new_lengths=np.array([n]),
        logits_indices=np.array([[n - 1]]),
    )


def _greedy(backend, prompt: list[int], steps: int, slot: int = 0) -> tuple[list[int], list[np.ndarray]]:
    logits = backend.forward(_step(slot, prompt, 0))[0, 0]
    tokens, all_logits, cached = [int(logits.argmax())], [logits], len(prompt)
    for _ in range(steps - 1):
        logits = backend.forward(_step(slot, tokens[-1:], cached))[0, 0]
        all_logits.append(logits)
        tokens.append(int(logits.argmax()))
        cached += 1
    return tokens, all_logits


def test_fp32_engine_is_built_and_cached(trt_fp32):
    assert trt_fp32.built
    assert trt_fp32.precision == "fp32"
    assert trt_fp32.engine_path.exists() and trt_fp32.engine_path.with_suffix(".json").exists()
    assert trt_fp32.kv_cache.storage.is_cuda


def test_fp32_greedy_tokens_equal_onnxruntime(trt_fp32, ort):
    expected, expected_logits = _greedy(ort, PROMPT, GREEDY_STEPS)
    got, got_logits = _greedy(trt_fp32, PROMPT, GREEDY_STEPS)
    assert got == expected
    assert isinstance(got_logits[0], np.ndarray) and got_logits[0].dtype == np.float32
    np.testing.assert_allclose(got_logits[0], expected_logits[0], atol=2e-2)


def test_two_rows_in_one_batch_match_single_rows(trt_fp32, ort):
    short = PROMPT[:5]
    ids = np.zeros((2, len(PROMPT)), np.int64)
    ids[0], ids[1, : len(short)] = PROMPT, short
    batch = StepBatch(
        slots=np.array([1, 0]),
        input_ids=ids,
        cached_lengths=np.array([0, 0]),
        new_lengths=np.array([len(PROMPT), len(short)]),
        logits_indices=np.array([[len(PROMPT) - 1], [len(short) - 1]]),
    )
    np.testing.assert_allclose(trt_fp32.forward(batch), ort.forward(batch), atol=2e-2)


def test_prompt_longer_than_max_prefill_runs_in_chunks(trt_fp32, ort):
    prompt = (PROMPT * 4)[: MAX_PREFILL + 9]
    expected, _ = _greedy(ort, prompt, 4)
    got, _ = _greedy(trt_fp32, prompt, 4)
    assert got == expected


def test_second_construction_reuses_the_cached_engine(trt_fp32, model_dir, engine_dir):
    again = _trt(model_dir, engine_dir, "fp32")
    try:
        assert not again.built
        assert again.engine_path == trt_fp32.engine_path
        assert _greedy(again, PROMPT, 4)[0] == _greedy(trt_fp32, PROMPT, 4)[0]
    finally:
        again.close()


def test_reduced_precision_engine_agrees_with_onnxruntime(model_dir, engine_dir, ort):
    backend = _trt(model_dir, engine_dir, "auto")
    try:
        assert backend.precision in ("bf16", "fp16")
        assert backend.engine_path.name.startswith(f"decoder-{backend.precision}-")
        expected, _ = _greedy(ort, PROMPT, GREEDY_STEPS)
        # teacher-forced on ONNX Runtime's tokens so one near-tie cannot derail the rest
        got = [backend.forward(_step(0, PROMPT, 0))[0, 0]]
        for i, token in enumerate(expected[:-1]):
            got.append(backend.forward(_step(0, [token], len(PROMPT) + i))[0, 0])
        assert int(got[0].argmax()) == expected[0]
        in_top3 = [token in np.argsort(logits)[-3:] for token, logits in zip(expected, got)]
        assert sum(in_top3) >= GREEDY_STEPS - 1, in_top3
    finally:
        backend.close()
