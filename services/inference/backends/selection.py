"""Which execution backend serves (`--backend auto|onnxruntime|tensorrt`), and constructing it.

`auto` takes TensorRT only when the `tensorrt` package (TensorRT 10) imports and PyTorch sees a
CUDA GPU (the TensorRT backend keeps its KV cache in torch CUDA tensors); otherwise ONNX Runtime
on CPU, which runs everywhere. Asking for `tensorrt` where it cannot run is an error that says
what to install. The probes are plain functions passed as parameters, so tests can simulate any
machine without touching imports.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from services.inference.backends.base import DecoderBackend
    from services.modelstore.layout import ModelDirectory

log = logging.getLogger(__name__)

BACKEND_CHOICES = ("auto", "onnxruntime", "tensorrt")
TENSORRT_MAJOR = 10


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on this machine; the message says what to install."""


@dataclass(frozen=True)
class ProbeResult:
    """Whether one requirement of the TensorRT backend is met.

    `detail` is what was found (a version, a GPU) or what is missing; `remedy` says how to fix it.
    """

    available: bool
    detail: str
    remedy: str = ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def probe_tensorrt() -> ProbeResult:
    """Imports `tensorrt` and checks that it is TensorRT 10."""
    try:
        trt = importlib.import_module("tensorrt")
    except ModuleNotFoundError:
        return ProbeResult(
            False,
            "TensorRT is not installed",
            "install the `tensorrt` Python package for TensorRT 10 (`pip install 'tensorrt-cu12>=10,<11'`) and an NVIDIA driver",
        )
    except Exception as exc:  # a broken install raises OSError/ImportError from its native libraries
        return ProbeResult(
            False,
            f"TensorRT is installed but does not import ({_first_line(exc)})",
            "reinstall the `tensorrt` package that matches your CUDA version (`pip install 'tensorrt-cu12>=10,<11'` for CUDA 12)",
        )
    version = str(getattr(trt, "__version__", "unknown"))
    major = version.split(".", 1)[0]
    if not major.isdigit() or int(major) != TENSORRT_MAJOR:
        return ProbeResult(
            False,
            f"TensorRT {version} is installed but this backend is written for TensorRT {TENSORRT_MAJOR}",
            "install TensorRT 10 (`pip install 'tensorrt-cu12>=10,<11'`)",
        )
    return ProbeResult(True, f"TensorRT {version}")


def probe_cuda() -> ProbeResult:
    """Asks PyTorch (which holds the TensorRT backend's device memory) for a CUDA GPU."""
    try:
        torch = importlib.import_module("torch")
    except ModuleNotFoundError:
        return ProbeResult(
            False,
            "PyTorch is not installed",
            "install a CUDA build of PyTorch (`pip install torch`), which holds the TensorRT backend's KV cache on the GPU",
        )
    except Exception as exc:
        return ProbeResult(False, f"PyTorch does not import ({_first_line(exc)})", "reinstall a CUDA build of PyTorch")
    if getattr(torch.version, "cuda", None) is None:
        return ProbeResult(
            False,
            f"PyTorch {torch.__version__} is a CPU-only build",
            "install a CUDA build of PyTorch (`pip install torch` on Linux x86-64)",
        )
    if not torch.cuda.is_available():
        return ProbeResult(
            False,
            "no CUDA GPU is visible to PyTorch",
            "check the NVIDIA driver (`nvidia-smi`) and CUDA_VISIBLE_DEVICES",
        )
    major, minor = torch.cuda.get_device_capability(0)
    return ProbeResult(True, f"{torch.cuda.get_device_name(0)} (compute capability {major}.{minor})")


def unavailable_message(probe: ProbeResult) -> str:
    """One sentence: what is missing, how to fix it, and the fallback."""
    return f"{probe.detail}: {probe.remedy}, or use --backend onnxruntime."


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


def create_backend(name: str, model: ModelDirectory, num_slots: int, max_context: int, **options: Any) -> DecoderBackend:
    """Constructs the named backend ("onnxruntime" or "tensorrt"); `options` are its own keyword
    arguments (ONNX Runtime: intra_op_threads; TensorRT: max_prefill, precision, cache_dir,
    device, workspace_bytes)."""
    cls = _backend_class(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "model", "num_slots", "max_context")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"the {name} backend does not take {unknown}; it takes {accepted}")
    return cls(model, num_slots, max_context, **options)
