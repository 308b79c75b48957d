"""Layer 3 of the TensorRT backend: `TensorRTBackend`, the TensorRT builder, runtime and execution
context behind the device runner's `execute` callback. Needs the `tensorrt` package and a CUDA GPU
(tests/gpu); everything it plans with and runs through lives in planning.py and device.py.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from services.inference.backends.base import DecoderBackend, StepBatch
from services.inference.backends.probes import BackendUnavailableError, probe_cuda, probe_tensorrt, unavailable_message
from services.inference.backends.tensorrt.device import DeviceKVCache, DeviceStepRunner
from services.inference.backends.tensorrt.planning import (
    ContractMismatchError,
    ProfilePlan,
    check_engine_io,
    engine_cache_key,
    fp32_pinned_tensors,
    graph_io_from_model,
    load_graph,
    map_io_names,
    plan_profiles,
    resolve_precision,
)
from services.modelstore.layout import ModelDirectory

if TYPE_CHECKING:  # imported lazily at run time
    import onnx
    import torch

log = logging.getLogger(__name__)

CACHE_DIR_NAME = "trt-cache"
DEFAULT_MAX_PREFILL = 512
"""New tokens per graph call; longer steps run in chunks (planning.split_step)."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the model or build the engine."""


def _build_serialized_engine(
    trt: Any,
    logger: Any,
    onnx_path: Path,
    plans: Sequence[ProfilePlan],
    precision: str,
    pinned: frozenset[str],
    workspace_bytes: int | None,
) -> memoryview:
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so the parser finds decoder.onnx.data next to the model
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: results comparable with ONNX Runtime
    else:
        config.set_flag(trt.BuilderFlag.BF16 if precision == "bf16" else trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        log.info("pinned %d layers to float32 (RoPE tables, RMSNorm statistics)", _pin_float32(trt, network, pinned))
    for plan in plans:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in plan.input_shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError("TensorRT failed to build the decoder engine; its log above says why")
    return memoryview(serialized)


def _pin_float32(trt: Any, network: Any, pinned: frozenset[str]) -> int:
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not any(t is not None and t.name in pinned for t in outs):
            continue
        ins = [layer.get_input(j) for j in range(layer.num_inputs)]
        if all(t is None or t.dtype == trt.DataType.FLOAT for t in ins):
            layer.precision = trt.DataType.FLOAT
        for j, t in enumerate(outs):
            if t is not None and t.dtype == trt.DataType.FLOAT:
                layer.set_output_type(j, trt.DataType.FLOAT)
        count += 1
    return count


def _write_atomically(path: Path, data: bytes | memoryview) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class _TrtExecutor:
    """Binds named device tensors to an execution context and enqueues it on a CUDA stream."""

    context: Any
    stream_handle: int
    dummy_address: int
    active_profile: int = -1
    checked_shapes: set[tuple[int, ...]] = field(default_factory=set)

    def _address(self, tensor: torch.Tensor) -> int:
        if tensor.numel() == 0:
            # TensorRT still wants a valid address (at least one byte) for an empty tensor
            return self.dummy_address
        if not tensor.is_contiguous():
            raise ValueError("TensorRT bindings must be contiguous")
        return tensor.data_ptr()

    def __call__(self, profile: int, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        ctx = self.context
        if profile != self.active_profile:
            ctx.set_optimization_profile_async(profile, self.stream_handle)
            self.active_profile = profile
        for name, tensor in inputs.items():
            if not ctx.set_input_shape(name, tuple(tensor.shape)):
                raise RuntimeError(f"TensorRT rejected shape {tuple(tensor.shape)} for {name} in profile {profile}")
        for name, tensor in (inputs | outputs).items():
            if not ctx.set_tensor_address(name, self._address(tensor)):
                raise RuntimeError(f"TensorRT rejected the address of {name}")
        logits = outputs["logits"]
        if tuple(logits.shape) not in self.checked_shapes:
            engine_shape = tuple(ctx.get_tensor_shape("logits"))
            if engine_shape != tuple(logits.shape):
                raise RuntimeError(
                    f"TensorRT infers logits {engine_shape}, the backend allocated {tuple(logits.shape)}"
                )
            self.checked_shapes.add(tuple(logits.shape))
        if not ctx.execute_async_v3(self.stream_handle):
            raise RuntimeError("TensorRT execute_async_v3 failed; its log says why")


class TensorRTBackend(DecoderBackend):
    """Runs the decoder as a TensorRT engine on an NVIDIA GPU, with the KV cache in GPU memory.

    The engine is built once per (model, TensorRT version, GPU, profiles, precision) and cached in
    `<model dir>/trt-cache/` (or `cache_dir`); later constructions deserialize it.
    """

    name = "tensorrt"

    def __init__(
        self,
        model: ModelDirectory,
        num_slots: int,
        max_context: int,
        max_prefill: int = DEFAULT_MAX_PREFILL,
        precision: str = "auto",
        cache_dir: Path | str | None = None,
        device: str = "cuda:0",
        workspace_bytes: int | None = None,
    ) -> None:
        """`max_prefill` bounds new tokens per graph call (longer steps run in chunks) and with it
        the activation memory; `precision` is auto | fp32 | fp16 | bf16; `workspace_bytes` caps
        TensorRT's builder workspace (default: TensorRT's, the whole GPU)."""
        super().__init__(model, num_slots, max_context)
        for probe in (probe_tensorrt(), probe_cuda()):
            if not probe.available:
                raise BackendUnavailableError(unavailable_message(probe))
        import tensorrt as trt
        import torch

        max_prefill = min(max_prefill, max_context)
        graph = load_graph(model.decoder_path)
        io = graph_io_from_model(graph)
        self.names = map_io_names(self.config, io, source=str(model.decoder_path))
        self.plans = plan_profiles(io, num_slots, max_context, max_prefill)

        self._torch = torch
        self._device = torch.device(device)
        torch.cuda.set_device(self._device)  # TensorRT builds and runs on the current device
        gpu_name = torch.cuda.get_device_name(self._device)
        capability = tuple(torch.cuda.get_device_capability(self._device))
        flags = {name for name in ("FP16", "BF16") if hasattr(trt.BuilderFlag, name)}
        self.precision = resolve_precision(precision, capability, flags)  # type: ignore[arg-type]
        self.cache_key = engine_cache_key(model, self.plans, self.precision, trt.__version__, gpu_name, capability)  # type: ignore[arg-type]
        self.engine_path = Path(cache_dir or model.path / CACHE_DIR_NAME) / self.cache_key.file_name()

        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.built = False
        self._engine = self._load_engine()
        if self._engine is None:
            self._engine = self._build_engine(graph, workspace_bytes)
            self.built = True
        del graph

        engine = self._engine
        tensor_names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        modes = {name: engine.get_tensor_mode(name) for name in tensor_names}
        check_engine_io(
            self.names,
            [n for n in tensor_names if modes[n] == trt.TensorIOMode.INPUT],
            [n for n in tensor_names if modes[n] == trt.TensorIOMode.OUTPUT],
        )
        if engine.num_optimization_profiles != len(self.plans):
            raise ContractMismatchError(
                f"the engine has {engine.num_optimization_profiles} profiles, expected {len(self.plans)}"
            )
        dtypes = {
            trt.DataType.FLOAT: torch.float32,
            trt.DataType.INT32: torch.int32,
            trt.DataType.INT64: torch.int64,
        }
        input_dtypes = {}
        for name in tensor_names:
            dtype = engine.get_tensor_dtype(name)
            if dtype not in dtypes or (modes[name] == trt.TensorIOMode.OUTPUT and dtypes[dtype] != torch.float32):
                raise ContractMismatchError(f"engine tensor {name} has unsupported type {dtype}")
            if modes[name] == trt.TensorIOMode.INPUT:
                input_dtypes[name] = dtypes[dtype]

        self._context = engine.create_execution_context()
        if self._context is None:
            raise EngineBuildError("TensorRT could not create an execution context (out of GPU memory?)")
        self._stream = torch.cuda.Stream(device=self._device)
        self._dummy = torch.zeros(64, dtype=torch.float32, device=self._device)
        executor = _TrtExecutor(self._context, self._stream.cuda_stream, self._dummy.data_ptr())
        with torch.cuda.device(self._device), torch.cuda.stream(self._stream):
            self._runner = DeviceStepRunner(
                self.config, self.names, num_slots, max_context, self.plans, executor, self._device, input_dtypes
            )
        self._stream.synchronize()
        log.info(
            "TensorRT %s engine ready on %s (%s, %s): %s, KV cache %.0f MiB on the GPU",
            trt.__version__,
            gpu_name,
            self.precision,
            "built" if self.built else "from cache",
            self.engine_path,
            self.kv_cache_bytes / 2**20,
        )

    def _load_engine(self) -> Any:
        if not self.engine_path.exists():
            return None
        engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if engine is None:
            log.warning("cached engine %s could not be deserialized; rebuilding it", self.engine_path)
        return engine

    def _build_engine(self, graph: onnx.ModelProto, workspace_bytes: int | None) -> Any:
        log.info(
            "building a TensorRT engine for %s (%s, profiles %s); this takes a few minutes once",
            self.model.decoder_path,
            self.precision,
            [p.name for p in self.plans],
        )
        started = time.monotonic()
        pinned = fp32_pinned_tensors(graph) if self.precision != "fp32" else frozenset()
        serialized = _build_serialized_engine(
            self._trt, self._logger, self.model.decoder_path, self.plans, self.precision, pinned, workspace_bytes
        )
        log.info("built the engine in %.0fs", time.monotonic() - started)
        try:
            _write_atomically(self.engine_path, serialized)
            meta = self.engine_path.with_suffix(".json")
            _write_atomically(meta, json.dumps(self.cache_key.components(), indent=2).encode())
        except OSError as exc:
            log.warning("could not cache the engine at %s (%s); it will be rebuilt next time", self.engine_path, exc)
        engine = self._runtime.deserialize_cuda_engine(serialized)
        if engine is None:
            raise EngineBuildError("TensorRT could not deserialize the engine it just built")
        return engine

    @property
    def kv_cache(self) -> DeviceKVCache:
        return self._runner.cache

    def forward(self, batch: StepBatch) -> np.ndarray:
        torch = self._torch
        with torch.cuda.device(self._device), torch.cuda.stream(self._stream):
            return self._runner.forward(batch)

    def copy_prefix(self, src_slot: int, dst_slot: int, length: int) -> None:
        torch = self._torch
        with torch.cuda.device(self._device), torch.cuda.stream(self._stream):
            self._runner.cache.copy_prefix(src_slot, dst_slot, length)

    def close(self) -> None:
        self._stream.synchronize()
        for attr in ("_runner", "_context", "_engine", "_runtime"):
            if hasattr(self, attr):
                delattr(self, attr)
        self._torch.cuda.empty_cache()
