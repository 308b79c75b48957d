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

from services.inference.backends.tensorrt.backend import (
    CACHE_DIR_NAME,
    DEFAULT_MAX_PREFILL,
    EngineBuildError,
    TensorRTBackend,
)
from services.inference.backends.tensorrt.device import DeviceKVCache, DeviceStepRunner, ExecuteFn
from services.inference.backends.tensorrt.planning import (
    BUILD_RECIPE_VERSION,
    PRECISIONS,
    SYMBOLIC_DIMS,
    ContractMismatchError,
    DimRange,
    EngineCacheKey,
    GraphIO,
    IONames,
    ProfilePlan,
    SubStep,
    TensorSpec,
    check_engine_io,
    engine_cache_key,
    fp32_pinned_tensors,
    graph_io_from_model,
    load_graph,
    map_io_names,
    merge_logits,
    plan_profiles,
    resolve_precision,
    select_profile,
    split_step,
    validate_step,
)

__all__ = [
    "BUILD_RECIPE_VERSION",
    "CACHE_DIR_NAME",
    "DEFAULT_MAX_PREFILL",
    "PRECISIONS",
    "SYMBOLIC_DIMS",
    "ContractMismatchError",
    "DeviceKVCache",
    "DeviceStepRunner",
    "DimRange",
    "EngineBuildError",
    "EngineCacheKey",
    "ExecuteFn",
    "GraphIO",
    "IONames",
    "ProfilePlan",
    "SubStep",
    "TensorRTBackend",
    "TensorSpec",
    "check_engine_io",
    "engine_cache_key",
    "fp32_pinned_tensors",
    "graph_io_from_model",
    "load_graph",
    "map_io_names",
    "merge_logits",
    "plan_profiles",
    "resolve_precision",
    "select_profile",
    "split_step",
    "validate_step",
]
