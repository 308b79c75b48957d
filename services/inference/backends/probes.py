"""What the TensorRT backend needs, and whether this machine has it: the `tensorrt` package of
TensorRT 10 and a CUDA GPU seen by PyTorch. Each probe returns what it found or what is missing
with how to fix it; nothing here raises for a missing library.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

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
            "install the `tensorrt` Python package for TensorRT 10 (`pip install 'tensorrt-cu12>=10,<11'`) "
            "and an NVIDIA driver",
        )
    except Exception as exc:  # a broken install raises OSError/ImportError from its native libraries
        return ProbeResult(
            False,
            f"TensorRT is installed but does not import ({_first_line(exc)})",
            "reinstall the `tensorrt` package that matches your CUDA version "
            "(`pip install 'tensorrt-cu12>=10,<11'` for CUDA 12)",
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
            "install a CUDA build of PyTorch (`pip install torch`), "
            "which holds the TensorRT backend's KV cache on the GPU",
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
