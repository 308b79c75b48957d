"""Layer 1 of the TensorRT backend, planning: numpy and onnx only, no tensorrt, no torch, so CI
tests it without either.

The ONNX input/output contract check, optimization-profile shapes, splitting a step longer than
the largest profile into chunks, which tensors stay in float32 under reduced precision, and the
engine cache key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from services.modelstore.decoder_contract import LlamaConfig, StepBatch, input_names, output_names
from services.modelstore.layout import ModelDirectory

if TYPE_CHECKING:  # imported lazily at run time: only reading a real graph needs it
    import onnx

# Bump when how an engine is built changes (profiles policy, precision pins, builder flags), so
# engines cached by an older version are rebuilt rather than reused.
BUILD_RECIPE_VERSION = 1
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
# The symbolic dimensions of the decoder contract (see decoder_contract.py).
SYMBOLIC_DIMS = ("batch", "seq", "past", "total", "n_logits")


class ContractMismatchError(ValueError):
    """The ONNX graph or a built engine does not match the decoder contract this backend drives."""


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
        is_kv = spec.name.startswith(("past_", "new_"))
        if is_kv and (len(spec.dims) != 4 or tuple(spec.dims[i] for i in (1, 3)) != kv_dims):
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
    return [
        ProfilePlan(name, dims, _input_shapes(io, dims)) for name, dims in (("decode", decode), ("prefill", prefill))
    ]


def _input_shapes(io: GraphIO, dims: dict[str, DimRange]) -> dict[str, tuple[Shape, Shape, Shape]]:
    shapes: dict[str, tuple[Shape, Shape, Shape]] = {}
    for spec in io.inputs:
        unknown = [d for d in spec.dims if isinstance(d, str) and d not in dims]
        if unknown:
            raise ContractMismatchError(
                f"input {spec.name} has symbolic dims {unknown} that no profile plans; "
                f"expected only {list(SYMBOLIC_DIMS)}"
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
        if (
            inputs
            and any(n in position_only for n in inputs)
            and all(n in position_only or n in constants for n in inputs)
        ):
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


def resolve_precision(
    requested: str, compute_capability: tuple[int, int], builder_flags: set[str] | frozenset[str]
) -> str:
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
        raise ValueError(
            f"bf16 needs compute capability >= 8.0 and TensorRT's BF16 flag (this GPU is {cc}); use fp16 or fp32"
        )
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
