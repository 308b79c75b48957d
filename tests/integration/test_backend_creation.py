"""Creating a backend over the prepared model (the choice of backend itself: tests/unit/test_backend_selection.py)."""

from __future__ import annotations

import importlib.util

import pytest

from services.inference.backends.probes import (
    BackendUnavailableError,
    ProbeResult,
)
from services.inference.backends.selection import create_backend

TRT_OK = ProbeResult(True, "TensorRT 10.9.0.34")
GPU_OK = ProbeResult(True, "NVIDIA L4 (compute capability 8.9)")
TRT_MISSING = ProbeResult(
    False, "TensorRT is not installed", "install the `tensorrt` Python package (TensorRT 10) and an NVIDIA driver"
)
NO_GPU = ProbeResult(
    False, "no CUDA GPU is visible to PyTorch", "check the NVIDIA driver (`nvidia-smi`) and CUDA_VISIBLE_DEVICES"
)


def test_create_backend_builds_onnxruntime(model_dir):
    backend = create_backend("onnxruntime", model_dir, num_slots=2, max_context=32, intra_op_threads=1)
    assert backend.name == "onnxruntime"
    assert (backend.num_slots, backend.max_context) == (2, 32)


def test_create_backend_refuses_options_of_another_backend(model_dir):
    with pytest.raises(TypeError, match=r"does not take \['max_prefill'\]; it takes \['intra_op_threads'\]"):
        create_backend("onnxruntime", model_dir, 2, 32, max_prefill=64)


def test_create_backend_needs_a_resolved_name(model_dir):
    with pytest.raises(ValueError, match="select_backend"):
        create_backend("auto", model_dir, 2, 32)
    with pytest.raises(ValueError, match="unknown backend"):
        create_backend("tvm", model_dir, 2, 32)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_create_backend_tensorrt_without_tensorrt_raises_the_clear_error(model_dir):
    with pytest.raises(
        BackendUnavailableError, match=r"^TensorRT is not installed: .* or use --backend onnxruntime\.$"
    ):
        create_backend("tensorrt", model_dir, 2, 32, max_prefill=16)
