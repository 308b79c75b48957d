"""Which execution backend serves (`--backend auto|onnxruntime|tensorrt`), and constructing it.

`auto` takes TensorRT only when the `tensorrt` package (TensorRT 10) imports and PyTorch sees a
CUDA GPU (the TensorRT backend keeps its KV cache in torch CUDA tensors); otherwise ONNX Runtime
on CPU, which runs everywhere. Asking for `tensorrt` where it cannot run is an error that says
what to install. The probes (probes.py) are plain functions passed as parameters, so tests can
simulate any machine without touching imports.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from services.inference.backends.probes import (
    BackendUnavailableError,
    ProbeResult,
    probe_cuda,
    probe_tensorrt,
    unavailable_message,
)

if TYPE_CHECKING:
    from services.inference.backends.base import DecoderBackend
    from services.modelstore.layout import ModelDirectory


BACKEND_CHOICES = ("auto", "onnxruntime", "tensorrt")


def select_backend(
    requested: str,
    *,
    tensorrt_probe: Callable[[], ProbeResult] = probe_tensorrt,
    cuda_probe: Callable[[], ProbeResult] = probe_cuda,
) -> tuple[str, str]:
    """Returns (backend name, reason to log) for `--backend auto|onnxruntime|tensorrt`.

    Raises BackendUnavailableError when `tensorrt` is requested and cannot run here, ValueError for
    an unknown name. ONNX Runtime never probes anything.
    """
    if requested not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {requested!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    if requested == "onnxruntime":
        return "onnxruntime", "requested with --backend onnxruntime"
    found: list[str] = []
    # TensorRT first: where it is missing (most machines) the slower torch import is skipped
    for probe_fn in (tensorrt_probe, cuda_probe):
        probe = probe_fn()
        if not probe.available:
            if requested == "tensorrt":
                raise BackendUnavailableError(unavailable_message(probe))
            return "onnxruntime", f"auto: {probe.detail}, so ONNX Runtime on CPU serves"
        found.append(probe.detail)
    how = "requested with --backend tensorrt" if requested == "tensorrt" else "auto"
    return "tensorrt", f"{how}: {' on '.join(found)}"


def _backend_class(name: str) -> type[DecoderBackend]:
    if name == "onnxruntime":
        from services.inference.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend
    if name == "tensorrt":
        from services.inference.backends.tensorrt import TensorRTBackend

        return TensorRTBackend
    if name == "auto":
        raise ValueError("resolve 'auto' with select_backend() before create_backend()")
    raise ValueError(f"unknown backend {name!r}; choose onnxruntime or tensorrt")


def create_backend(
    name: str, model: ModelDirectory, num_slots: int, max_context: int, **options: Any
) -> DecoderBackend:
    """Constructs the named backend ("onnxruntime" or "tensorrt"); `options` are its own keyword
    arguments (ONNX Runtime: intra_op_threads; TensorRT: max_prefill, precision, cache_dir,
    device, workspace_bytes)."""
    cls = _backend_class(name)
    accepted = [
        p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "model", "num_slots", "max_context")
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"the {name} backend does not take {unknown}; it takes {accepted}")
    return cls(model, num_slots, max_context, **options)
