"""Backend selection (`--backend auto|onnxruntime|tensorrt`) and construction, with the TensorRT and
CUDA probes injected so any machine can be simulated."""

from __future__ import annotations

import importlib.util

import pytest

from services.inference.backends.probes import (
    BackendUnavailableError,
    ProbeResult,
    probe_cuda,
    probe_tensorrt,
    unavailable_message,
)
from services.inference.backends.selection import select_backend

TRT_OK = ProbeResult(True, "TensorRT 10.9.0.34")
GPU_OK = ProbeResult(True, "NVIDIA L4 (compute capability 8.9)")
TRT_MISSING = ProbeResult(
    False, "TensorRT is not installed", "install the `tensorrt` Python package (TensorRT 10) and an NVIDIA driver"
)
NO_GPU = ProbeResult(
    False, "no CUDA GPU is visible to PyTorch", "check the NVIDIA driver (`nvidia-smi`) and CUDA_VISIBLE_DEVICES"
)


def _fixed(result: ProbeResult):
    return lambda: result


def _must_not_run():
    raise AssertionError("this probe should not have been called")


def test_auto_picks_tensorrt_when_it_imports_and_a_gpu_is_present():
    name, reason = select_backend("auto", tensorrt_probe=_fixed(TRT_OK), cuda_probe=_fixed(GPU_OK))
    assert name == "tensorrt"
    assert reason == "auto: TensorRT 10.9.0.34 on NVIDIA L4 (compute capability 8.9)"


def test_auto_falls_back_to_onnxruntime_without_tensorrt_and_skips_the_gpu_probe():
    name, reason = select_backend("auto", tensorrt_probe=_fixed(TRT_MISSING), cuda_probe=_must_not_run)
    assert name == "onnxruntime"
    assert reason == "auto: TensorRT is not installed, so ONNX Runtime on CPU serves"


def test_auto_falls_back_to_onnxruntime_without_a_gpu():
    name, reason = select_backend("auto", tensorrt_probe=_fixed(TRT_OK), cuda_probe=_fixed(NO_GPU))
    assert name == "onnxruntime"
    assert "no CUDA GPU is visible" in reason


def test_onnxruntime_is_chosen_without_probing():
    assert select_backend("onnxruntime", tensorrt_probe=_must_not_run, cuda_probe=_must_not_run) == (
        "onnxruntime",
        "requested with --backend onnxruntime",
    )


def test_requested_tensorrt_runs_where_both_probes_pass():
    name, reason = select_backend("tensorrt", tensorrt_probe=_fixed(TRT_OK), cuda_probe=_fixed(GPU_OK))
    assert name == "tensorrt" and reason.startswith("requested with --backend tensorrt: TensorRT 10")


def _one_sentence(message: str) -> None:
    assert message.endswith(".") and ". " not in message and "\n" not in message


def test_requested_tensorrt_without_tensorrt_says_what_to_install():
    with pytest.raises(BackendUnavailableError) as err:
        select_backend("tensorrt", tensorrt_probe=_fixed(TRT_MISSING), cuda_probe=_must_not_run)
    message = str(err.value)
    _one_sentence(message)
    assert message == (
        "TensorRT is not installed: install the `tensorrt` Python package (TensorRT 10) and an NVIDIA driver, "
        "or use --backend onnxruntime."
    )


def test_requested_tensorrt_without_a_gpu_names_the_driver():
    with pytest.raises(BackendUnavailableError) as err:
        select_backend("tensorrt", tensorrt_probe=_fixed(TRT_OK), cuda_probe=_fixed(NO_GPU))
    _one_sentence(str(err.value))
    assert "nvidia-smi" in str(err.value) and str(err.value).endswith("or use --backend onnxruntime.")


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="choose one of auto, onnxruntime, tensorrt"):
        select_backend("openvino", tensorrt_probe=_must_not_run, cuda_probe=_must_not_run)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_real_tensorrt_probe_reports_the_missing_package():
    probe = probe_tensorrt()
    assert not probe.available
    assert probe.detail == "TensorRT is not installed"
    message = unavailable_message(probe)
    _one_sentence(message)
    assert "pip install 'tensorrt-cu12>=10,<11'" in message


def test_real_cuda_probe_is_consistent_with_torch():
    torch = pytest.importorskip("torch")
    probe = probe_cuda()
    assert probe.available == torch.cuda.is_available()
    if not probe.available:
        assert probe.remedy and ("CPU-only" in probe.detail or "no CUDA GPU" in probe.detail)
