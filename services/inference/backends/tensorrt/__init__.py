"""TensorRT backend (NVIDIA GPUs): builds or reuses a serialized engine of the exported decoder
and keeps the slotted KV cache resident on the GPU.

It is in three layers so that CI, which has neither TensorRT nor a GPU, can test most of it:

1. `planning` (numpy and onnx only, no tensorrt, no torch): the ONNX input/output contract check,
   optimization-profile shapes, splitting a step longer than the largest profile into chunks,
   which tensors stay in float32 under reduced precision, and the engine cache key.
2. `device`: `DeviceKVCache` and `DeviceStepRunner` (torch, any device) gather the rows' cached
   keys and values into contiguous buffers, run one graph call through an `execute` callback,
   scatter the new keys and values back. On CPU the callback can be ONNX Runtime, which is how CI
   tests it.
3. `backend`: `TensorRTBackend`, the TensorRT builder, runtime and execution context behind that
   callback.

Each layer imports only the ones above it in this list. Importing the package loads neither
tensorrt nor torch; only constructing a `TensorRTBackend` does. Only logits cross back to the host;
sampling stays on the host, in the engine.
"""

from services.inference.backends.tensorrt.backend import TensorRTBackend

__all__ = ["TensorRTBackend"]
