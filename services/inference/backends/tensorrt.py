"""TensorRT backend (NVIDIA GPUs): builds or reuses a serialized engine of the exported decoder
and keeps the slotted KV cache resident on the GPU.

The module is in three layers so that CI, which has neither TensorRT nor a GPU, can test most of it:

1. Planning (numpy and onnx only, no tensorrt, no torch): the ONNX input/output contract check,
   optimization-profile shapes, splitting a step longer than the largest profile into chunks,
   which tensors stay in float32 under reduced precision, and the engine cache key.
2. `DeviceKVCache` and `DeviceStepRunner` (torch, any device): gather the rows' cached keys and
   values into contiguous buffers, run one graph call through an `execute` callback, scatter the
   new keys and values back. On CPU the callback can be ONNX Runtime, which is how CI tests it.
3. `TensorRTBackend`: the TensorRT builder, runtime and execution context behind that callback.

Only logits cross back to the host; sampling stays on the host, in the engine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from services.inference.backends.base import DecoderBackend, StepBatch
from services.inference.backends.probes import BackendUnavailableError, probe_cuda, probe_tensorrt, unavailable_message
from services.modelstore.layout import ModelDirectory
from services.modelstore.decoder_contract import LlamaConfig, input_names, output_names

if TYPE_CHECKING:  # imported lazily at run time: neither is needed to plan or to test the planning
    import onnx
    import torch

log = logging.getLogger(__name__)

# Bump when how an engine is built changes (profiles policy, precision pins, builder flags), so
# engines cached by an older version are rebuilt rather than reused.
BUILD_RECIPE_VERSION = 1
CACHE_DIR_NAME = "trt-cache"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DEFAULT_MAX_PREFILL = 512
# The symbolic dimensions of the decoder contract (see decoder_contract.py).
SYMBOLIC_DIMS = ("batch", "seq", "past", "total", "n_logits")


class ContractMismatchError(ValueError):
    """The ONNX graph or a built engine does not match the decoder contract this backend drives."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the model or build the engine."""


# -- 1. planning: no tensorrt, no torch -----------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: numpy dtype name and dims (ints are static, strings symbolic)."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]


@dataclass(frozen=True)
class GraphIO:
    """The inputs and outputs a decoder graph actually declares."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec:
        return next(spec for spec in self.inputs if spec.name == name)


def graph_io_from_model(model: onnx.ModelProto) -> GraphIO:
    """Reads the declared inputs (initializers excluded) and outputs of an ONNX model."""
    from onnx import helper

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        tensor_type = value.type.tensor_type
        dims: list[int | str] = []
        for dim in tensor_type.shape.dim:
            dims.append(int(dim.dim_value) if dim.HasField("dim_value") else (dim.dim_param or "?"))
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
        return TensorSpec(value.name, dtype, tuple(dims))

    initializers = {init.name for init in model.graph.initializer}
    return GraphIO(
        inputs=tuple(spec(v) for v in model.graph.input if v.name not in initializers),
        outputs=tuple(spec(v) for v in model.graph.output),
    )


def load_graph(onnx_path: Path) -> onnx.ModelProto:
    """Loads the graph structure only; the weights (decoder.onnx.data) stay on disk."""
    import onnx

    return onnx.load(str(onnx_path), load_external_data=False)


@dataclass(frozen=True)
class IONames:
    """Names of the decoder's inputs and outputs, in contract order, checked against a real graph."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    past_keys: tuple[str, ...]
    past_values: tuple[str, ...]
    new_keys: tuple[str, ...]
    new_values: tuple[str, ...]


def _name_diff(what: str, expected: Sequence[str], actual: Sequence[str]) -> list[str]:
    problems = []
    missing = [n for n in expected if n not in set(actual)]
    unexpected = [n for n in actual if n not in set(expected)]
    if missing:
        problems.append(f"missing {what} {missing}")
    if unexpected:
        problems.append(f"unexpected {what} {unexpected}")
    return problems


def map_io_names(config: LlamaConfig, io: GraphIO, source: str = "the ONNX decoder") -> IONames:
    """Checks the graph's inputs and outputs (names, dtypes, static dims) against the contract of
    `decoder_contract.py` for this config and returns the names the backend binds.

    Raises ContractMismatchError listing every difference.
    """
    expected_inputs, expected_outputs = input_names(config), output_names(config)
    problems = _name_diff("inputs", expected_inputs, [s.name for s in io.inputs])
    problems += _name_diff("outputs", expected_outputs, [s.name for s in io.outputs])
    kv_dims = (config.num_kv_heads, config.head_dim)
    for spec in io.inputs + io.outputs:
        want_dtype = "int64" if spec.name in ("input_ids", "position_ids", "logits_indices") else "float32"
        if spec.dtype != want_dtype:
            problems.append(f"{spec.name} is {spec.dtype}, expected {want_dtype}")
        if spec.name.startswith(("past_", "new_")):
            if len(spec.dims) != 4 or tuple(spec.dims[i] for i in (1, 3)) != kv_dims:
                problems.append(f"{spec.name} has dims {list(spec.dims)}, expected [batch, {kv_dims[0]}, *, {kv_dims[1]}]")
        if spec.name == "logits" and (len(spec.dims) != 3 or spec.dims[2] != config.vocab_size):
            problems.append(f"logits has dims {list(spec.dims)}, expected [batch, n_logits, {config.vocab_size}]")
    if problems:
        raise ContractMismatchError(f"{source} does not match the decoder contract: " + "; ".join(problems))
    layers = range(config.num_layers)
    return IONames(
        inputs=tuple(expected_inputs),
        outputs=tuple(expected_outputs),
        past_keys=tuple(f"past_key_{i}" for i in layers),
        past_values=tuple(f"past_value_{i}" for i in layers),
        new_keys=tuple(f"new_key_{i}" for i in layers),
        new_values=tuple(f"new_value_{i}" for i in layers),
    )


def check_engine_io(names: IONames, engine_inputs: Sequence[str], engine_outputs: Sequence[str]) -> None:
    """Checks that a deserialized engine exposes exactly the tensors the backend binds."""
    problems = _name_diff("inputs", names.inputs, engine_inputs) + _name_diff("outputs", names.outputs, engine_outputs)
    if problems:
        raise ContractMismatchError("the TensorRT engine does not match the decoder contract: " + "; ".join(problems))


@dataclass(frozen=True)
class DimRange:
    """min <= opt <= max of one symbolic dimension within one optimization profile."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.opt <= self.max:
            raise ValueError(f"invalid dimension range {self.min}..{self.opt}..{self.max}")

    def covers(self, value: int) -> bool:
        return self.min <= value <= self.max


Shape = tuple[int, ...]


@dataclass(frozen=True)
class ProfilePlan:
    """One TensorRT optimization profile: ranges of the symbolic dims and the resulting
    (min, opt, max) shape of every input."""

    name: str
    dims: dict[str, DimRange]
    input_shapes: dict[str, tuple[Shape, Shape, Shape]]

    def covers(self, rows: int, seq: int, past: int, n_logits: int) -> bool:
        values = {"batch": rows, "seq": seq, "past": past, "total": past + seq, "n_logits": n_logits}
        return all(self.dims[k].covers(v) for k, v in values.items())

    def components(self) -> dict[str, Any]:
        """A JSON-able description, part of the engine cache key."""
        return {
            "name": self.name,
            "dims": {k: [r.min, r.opt, r.max] for k, r in sorted(self.dims.items())},
            "inputs": {k: [list(s) for s in shapes] for k, shapes in sorted(self.input_shapes.items())},
        }


def plan_profiles(io: GraphIO, num_slots: int, max_context: int, max_prefill: int) -> list[ProfilePlan]:
    """Plans two optimization profiles over the graph's declared input dims.

    Profile 0, "decode": one new token per row, 1..num_slots rows, past 0..max_context-1, tuned for
    a full batch at half context. Profile 1, "prefill": 1..max_prefill new tokens, same rows and
    past, tuned for one prompt of max_prefill tokens. `total` (the attention bias width) is
    past + seq. Longer steps are split by `split_step` into chunks of at most max_prefill tokens.
    """
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    if max_context < 2:
        raise ValueError(f"max_context must be >= 2, got {max_context}")
    if not 1 <= max_prefill <= max_context:
        raise ValueError(f"max_prefill must be in [1, max_context={max_context}], got {max_prefill}")
    past = DimRange(0, max_context // 2, max_context - 1)
    decode = {
        "batch": DimRange(1, num_slots, num_slots),
        "seq": DimRange(1, 1, 1),
        "past": past,
        "total": DimRange(1, past.opt + 1, past.max + 1),
        "n_logits": DimRange(1, 1, 1),
    }
    prefill = {
        "batch": DimRange(1, 1, num_slots),
        "seq": DimRange(1, max_prefill, max_prefill),
        "past": DimRange(0, 0, past.max),
        "total": DimRange(1, max_prefill, past.max + max_prefill),
        "n_logits": DimRange(1, 1, max_prefill),
    }
    return [ProfilePlan(name, dims, _input_shapes(io, dims)) for name, dims in (("decode", decode), ("prefill", prefill))]


def _input_shapes(io: GraphIO, dims: dict[str, DimRange]) -> dict[str, tuple[Shape, Shape, Shape]]:
    shapes: dict[str, tuple[Shape, Shape, Shape]] = {}
    for spec in io.inputs:
        unknown = [d for d in spec.dims if isinstance(d, str) and d not in dims]
        if unknown:
            raise ContractMismatchError(
                f"input {spec.name} has symbolic dims {unknown} that no profile plans; expected only {list(SYMBOLIC_DIMS)}"
            )

        def pick(which: str, spec: TensorSpec = spec) -> Shape:
            return tuple(d if isinstance(d, int) else getattr(dims[d], which) for d in spec.dims)

        shapes[spec.name] = (pick("min"), pick("opt"), pick("max"))
    return shapes


def select_profile(plans: Sequence[ProfilePlan], rows: int, seq: int, past: int, n_logits: int) -> int:
    """Index of the first profile covering a step's shape."""
    for index, plan in enumerate(plans):
        if plan.covers(rows, seq, past, n_logits):
            return index
    raise ValueError(f"no optimization profile covers rows={rows} seq={seq} past={past} n_logits={n_logits}")


def validate_step(batch: StepBatch, num_slots: int, max_context: int) -> None:
    """Rejects steps that would write outside the cache; the engine never sends them."""
    if batch.rows == 0:
        return
    if batch.slots.min() < 0 or batch.slots.max() >= num_slots or len(set(batch.slots.tolist())) != batch.rows:
        raise ValueError(f"slots must be distinct and in [0, {num_slots}), got {batch.slots.tolist()}")
    if batch.new_lengths.min() < 1 or batch.new_lengths.max() > batch.seq:
        raise ValueError(f"new_lengths must be in [1, seq={batch.seq}], got {batch.new_lengths.tolist()}")
    if batch.cached_lengths.min() < 0 or (batch.cached_lengths + batch.new_lengths).max() > max_context:
        raise ValueError(f"cached + new tokens must fit max_context={max_context} in every row")
    if batch.logits_indices.size and (batch.logits_indices.min() < 0 or batch.logits_indices.max() >= batch.seq):
        raise ValueError(f"logits_indices must be in [0, seq={batch.seq})")


@dataclass(frozen=True)
class SubStep:
    """One graph call of a step: `rows` index the original batch, `offset` is its first new-token
    column, `batch` the rows' tokens from that column on (at most the profile's seq)."""

    rows: np.ndarray
    offset: int
    batch: StepBatch


def split_step(batch: StepBatch, max_seq: int) -> list[SubStep]:
    """Splits a step whose rows carry more new tokens than `max_seq` into consecutive chunks.

    Chunk k holds columns [k*max_seq, (k+1)*max_seq) of the rows that still have tokens there;
    each row continues from its cache, so running the chunks in order writes the same keys and
    values as one call would. A step that fits is returned unchanged as a single sub-step.
    """
    if max_seq < 1:
        raise ValueError("max_seq must be >= 1")
    if batch.seq <= max_seq:
        return [SubStep(np.arange(batch.rows), 0, batch)]
    if (batch.logits_indices >= batch.new_lengths[:, None]).any():
        raise ValueError("a step split into chunks needs every logits index to point at a real (unpadded) token")
    subs: list[SubStep] = []
    for offset in range(0, batch.seq, max_seq):
        rows = np.nonzero(batch.new_lengths > offset)[0]
        if rows.size == 0:
            break
        new = np.minimum(batch.new_lengths[rows] - offset, max_seq)
        seq = int(new.max())
        sub = StepBatch(
            slots=batch.slots[rows],
            input_ids=np.ascontiguousarray(batch.input_ids[rows, offset : offset + seq]),
            cached_lengths=batch.cached_lengths[rows] + offset,
            new_lengths=new,
            logits_indices=np.clip(batch.logits_indices[rows] - offset, 0, seq - 1),
        )
        subs.append(SubStep(rows, offset, sub))
    return subs


def merge_logits(batch: StepBatch, subs: Sequence[SubStep], logits: Sequence[np.ndarray]) -> np.ndarray:
    """Puts each requested position's logits, computed by the chunk holding it, back in batch order."""
    if len(subs) == 1 and subs[0].offset == 0 and subs[0].batch is batch:
        return logits[0]
    vocab = logits[0].shape[-1]
    merged = np.empty((batch.rows, batch.logits_indices.shape[1], vocab), np.float32)
    filled = np.zeros(batch.logits_indices.shape, bool)
    for sub, chunk in zip(subs, logits):
        wanted = batch.logits_indices[sub.rows]
        inside = (wanted >= sub.offset) & (wanted < sub.offset + sub.batch.seq)
        r, j = np.nonzero(inside)
        merged[sub.rows[r], j] = chunk[r, j]
        filled[sub.rows[r], j] = True
    if not filled.all():
        raise RuntimeError("some requested logits were computed by no chunk")
    return merged


def fp32_pinned_tensors(model: onnx.ModelProto) -> frozenset[str]:
    """Tensors that must stay float32 when the engine runs in fp16/bf16.

    - the RoPE tables: everything computed from `position_ids` alone. Angles reach
      position * inv_freq ~ thousands of radians, where a 16-bit float's rounding error exceeds
      a whole turn, so cos/sin would be noise at long context;
    - RMSNorm statistics: Pow -> ReduceMean -> Add(eps) -> Sqrt, whose squares overflow fp16.
    TensorRT keeps ONNX tensor names, so these names select the layers to pin.
    """
    graph = model.graph
    constants = {init.name for init in graph.initializer}
    constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    pinned: set[str] = set()
    # nodes are topologically sorted in a valid ONNX graph
    position_only = {"position_ids"}
    for node in graph.node:
        inputs = [name for name in node.input if name]
        if inputs and any(n in position_only for n in inputs) and all(n in position_only or n in constants for n in inputs):
            position_only.update(node.output)
            pinned.update(node.output)

    for node in graph.node:
        if node.op_type != "ReduceMean":
            continue
        pinned.update(node.output)
        source = producers.get(node.input[0])
        if source is not None and source.op_type == "Pow":
            pinned.update(source.output)
        frontier = list(node.output)
        while frontier:
            for user in consumers.get(frontier.pop(), []):
                if user.op_type in ("Add", "Sqrt", "Reciprocal") and not set(user.output) <= pinned:
                    pinned.update(user.output)
                    frontier.extend(user.output)
    return frozenset(pinned)


def resolve_precision(requested: str, compute_capability: tuple[int, int], builder_flags: set[str] | frozenset[str]) -> str:
    """Picks the engine precision: "auto" means bf16 on compute capability >= 8.0, else fp16, else
    fp32 when this TensorRT has neither builder flag. `builder_flags` are the names of the
    `trt.BuilderFlag` members present ("FP16", "BF16")."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    bf16_ok = compute_capability >= (8, 0) and "BF16" in builder_flags
    if requested == "auto":
        return "bf16" if bf16_ok else "fp16" if "FP16" in builder_flags else "fp32"
    if requested == "bf16" and not bf16_ok:
        cc = ".".join(map(str, compute_capability))
        raise ValueError(f"bf16 needs compute capability >= 8.0 and TensorRT's BF16 flag (this GPU is {cc}); use fp16 or fp32")
    if requested == "fp16" and "FP16" not in builder_flags:
        raise ValueError("this TensorRT has no FP16 builder flag; use fp32")
    return requested


@dataclass(frozen=True)
class EngineCacheKey:
    """Everything a serialized engine depends on; engines are reused only when all of it matches."""

    model_sha256: str
    export_version: int
    model_precision: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    profiles: tuple[dict[str, Any], ...]
    precision: str
    recipe_version: int = BUILD_RECIPE_VERSION

    def components(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["compute_capability"] = list(self.compute_capability)
        data["profiles"] = [dict(p) for p in self.profiles]
        return data

    @property
    def digest(self) -> str:
        canonical = json.dumps(self.components(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def file_name(self) -> str:
        return f"decoder-{self.precision}-{self.digest[:24]}.engine"


def engine_cache_key(
    model: ModelDirectory,
    plans: Sequence[ProfilePlan],
    precision: str,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: tuple[int, int],
) -> EngineCacheKey:
    manifest = model.manifest
    return EngineCacheKey(
        model_sha256=manifest["source"]["sha256"],
        export_version=int(manifest["export_version"]),
        model_precision=str(manifest.get("precision", "fp32")),
        tensorrt_version=tensorrt_version,
        gpu_name=gpu_name,
        compute_capability=tuple(compute_capability),  # type: ignore[arg-type]
        profiles=tuple(plan.components() for plan in plans),
        precision=precision,
    )


# -- 2. device-resident cache and step execution (torch, any device) -------------------------

# execute(profile_index, inputs, outputs): runs the graph once, writing into the output tensors.
ExecuteFn = Callable[[int, "dict[str, torch.Tensor]", "dict[str, torch.Tensor]"], None]


class DeviceKVCache:
    """The KV cache on a torch device: one tensor [layers, 2, slots, kv_heads, max_context, head_dim];
    `storage[i, 0]` and `storage[i, 1]` are layer i's key and value buffers
    [slots, kv_heads, max_context, head_dim]. One tensor lets one kernel gather or scatter all layers."""

    def __init__(self, config: LlamaConfig, num_slots: int, max_context: int, device: str | torch.device) -> None:
        import torch

        shape = (config.num_layers, 2, num_slots, config.num_kv_heads, max_context, config.head_dim)
        self.storage = torch.zeros(shape, dtype=torch.float32, device=device)

    def gather(self, slots: torch.Tensor, past: int) -> torch.Tensor:
        """Contiguous [layers, 2, rows, kv_heads, past, head_dim]: the rows' first `past` positions."""
        import torch

        return torch.index_select(self.storage[:, :, :, :, :past], 2, slots)

    def scatter(self, new_kv: torch.Tensor, batch: StepBatch) -> None:
        """Writes new_kv [layers, 2, rows, kv_heads, seq, head_dim] after each row's cached tokens,
        real (unpadded) tokens only."""
        import torch

        row, t = np.nonzero(np.arange(batch.seq)[None, :] < batch.new_lengths[:, None])
        device = self.storage.device
        slot_idx = torch.as_tensor(batch.slots[row], device=device)
        pos_idx = torch.as_tensor(batch.cached_lengths[row] + t, device=device)
        row_idx = torch.as_tensor(row, device=device)
        t_idx = torch.as_tensor(t, device=device)
        # both sides index two non-adjacent dims, so both come out as [tokens, layers, 2, kv, head_dim]
        self.storage[:, :, slot_idx, :, pos_idx] = new_kv[:, :, row_idx, :, t_idx]

    def copy_prefix(self, src_slot: int, dst_slot: int, length: int) -> None:
        """Every layer's keys and values of positions [0, length) from one slot to another."""
        self.storage[:, :, dst_slot, :, :length] = self.storage[:, :, src_slot, :, :length]


class DeviceStepRunner:
    """One engine step on a device: per sub-step, upload the small inputs, gather the rows' past
    keys/values, call `execute`, scatter the new keys/values, download the logits."""

    def __init__(
        self,
        config: LlamaConfig,
        names: IONames,
        num_slots: int,
        max_context: int,
        plans: Sequence[ProfilePlan],
        execute: ExecuteFn,
        device: str | torch.device = "cpu",
        input_dtypes: Mapping[str, torch.dtype] | None = None,
    ) -> None:
        import torch

        self.config = config
        self.names = names
        self.num_slots = num_slots
        self.max_context = max_context
        self.plans = list(plans)
        self.max_seq = max(plan.dims["seq"].max for plan in self.plans)
        self.execute = execute
        self.device = torch.device(device)
        self.input_dtypes = dict(input_dtypes or {})
        self.cache = DeviceKVCache(config, num_slots, max_context, self.device)

    def _upload(self, name: str, array: np.ndarray) -> torch.Tensor:
        import torch

        tensor = torch.as_tensor(np.ascontiguousarray(array), device=self.device)
        wanted = self.input_dtypes.get(name)
        return tensor if wanted is None or tensor.dtype == wanted else tensor.to(wanted)

    def forward(self, batch: StepBatch) -> np.ndarray:
        validate_step(batch, self.num_slots, self.max_context)
        c = self.config
        if batch.rows == 0:
            return np.zeros((0, batch.logits_indices.shape[1], c.vocab_size), np.float32)
        subs = split_step(batch, self.max_seq)
        return merge_logits(batch, subs, [self._run(sub.batch) for sub in subs])

    def _run(self, batch: StepBatch) -> np.ndarray:
        import torch

        c, names = self.config, self.names
        rows, seq, past, n_logits = batch.rows, batch.seq, batch.past, batch.logits_indices.shape[1]
        profile = select_profile(self.plans, rows, seq, past, n_logits)
        # 1. small inputs to the device; the attention bias comes from StepBatch, the one definition
        inputs = {
            "input_ids": self._upload("input_ids", batch.input_ids),
            "position_ids": self._upload("position_ids", batch.position_ids()),
            "attention_bias": self._upload("attention_bias", batch.attention_bias()),
            "logits_indices": self._upload("logits_indices", batch.logits_indices),
        }
        # 2. the rows' cached prefixes, gathered on the device
        past_kv = self.cache.gather(torch.as_tensor(batch.slots, device=self.device), past)
        for i in range(c.num_layers):
            inputs[names.past_keys[i]] = past_kv[i, 0]
            inputs[names.past_values[i]] = past_kv[i, 1]
        # 3. outputs written in place by the graph
        new_kv = torch.empty((c.num_layers, 2, rows, c.num_kv_heads, seq, c.head_dim), dtype=torch.float32, device=self.device)
        logits = torch.empty((rows, n_logits, c.vocab_size), dtype=torch.float32, device=self.device)
        outputs = {"logits": logits}
        for i in range(c.num_layers):
            outputs[names.new_keys[i]] = new_kv[i, 0]
            outputs[names.new_values[i]] = new_kv[i, 1]
        self.execute(profile, inputs, outputs)
        # 4. new keys/values into the slots, on the device; only the logits come back
        self.cache.scatter(new_kv, batch)
        return logits.cpu().numpy()


# -- 3. TensorRT --------------------------------------------------------------------------


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
                raise RuntimeError(f"TensorRT infers logits {engine_shape}, the backend allocated {tuple(logits.shape)}")
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
            raise ContractMismatchError(f"the engine has {engine.num_optimization_profiles} profiles, expected {len(self.plans)}")
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
