"""The TensorRT backend's planning and device-step logic, tested without TensorRT or a GPU.

The name mapping and profile shapes are checked against the real exported decoder; the device
step (gather, graph call, scatter, chunking) runs on CPU torch tensors with ONNX Runtime standing
in for the TensorRT engine, and must reproduce the ONNX Runtime backend.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from services.inference.backends.base import StepBatch
from services.inference.backends.tensorrt.device import DeviceKVCache, DeviceStepRunner
from services.inference.backends.tensorrt.planning import (
    BUILD_RECIPE_VERSION,
    ContractMismatchError,
    EngineCacheKey,
    GraphIO,
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


@pytest.fixture(scope="module")
def graph(model_dir):
    return load_graph(model_dir.decoder_path)


@pytest.fixture(scope="module")
def io(graph) -> GraphIO:
    return graph_io_from_model(graph)


def _batch(slots, input_ids, cached, new, logits_indices=None) -> StepBatch:
    new = np.asarray(new, np.int64)
    return StepBatch(
        slots=np.asarray(slots, np.int64),
        input_ids=np.asarray(input_ids, np.int64),
        cached_lengths=np.asarray(cached, np.int64),
        new_lengths=new,
        logits_indices=(new - 1)[:, None] if logits_indices is None else np.asarray(logits_indices, np.int64),
    )


# -- name mapping against the real graph ----------------------------------------------------


def test_real_graph_maps_to_the_contract(model_dir, io):
    c = model_dir.config
    names = map_io_names(c, io)
    assert names.inputs == tuple(s.name for s in io.inputs)
    assert names.outputs == tuple(s.name for s in io.outputs)
    assert len(names.past_keys) == len(names.new_values) == c.num_layers == 30
    assert names.past_values[7] == "past_value_7" and names.new_keys[29] == "new_key_29"
    assert io.input("past_key_0").dims == ("batch", c.num_kv_heads, "past", c.head_dim)


def test_config_with_another_layer_count_is_rejected(model_dir, io):
    wrong = dataclasses.replace(model_dir.config, num_layers=31)
    with pytest.raises(ContractMismatchError, match=r"missing inputs \['past_key_30', 'past_value_30'\]"):
        map_io_names(wrong, io)


def test_missing_unexpected_and_misshapen_tensors_are_all_reported(model_dir, io):
    c = model_dir.config
    inputs = [s for s in io.inputs if s.name != "past_key_3"]
    inputs.append(TensorSpec("cache_position", "int64", ("batch",)))
    inputs = [
        dataclasses.replace(s, dims=("batch", 4, "past", c.head_dim)) if s.name == "past_value_0" else s for s in inputs
    ]
    outputs = [dataclasses.replace(s, dtype="float16") if s.name == "logits" else s for s in io.outputs]
    with pytest.raises(ContractMismatchError) as err:
        map_io_names(c, GraphIO(tuple(inputs), tuple(outputs)))
    message = str(err.value)
    assert "missing inputs ['past_key_3']" in message
    assert "unexpected inputs ['cache_position']" in message
    assert "past_value_0 has dims" in message
    assert "logits is float16, expected float32" in message


def test_engine_io_check_names_what_the_engine_lacks(model_dir, io):
    names = map_io_names(model_dir.config, io)
    check_engine_io(names, list(names.inputs), list(names.outputs))
    with pytest.raises(ContractMismatchError, match=r"missing outputs \['new_value_29'\]"):
        check_engine_io(names, list(names.inputs), list(names.outputs[:-1]))


# -- optimization profiles -------------------------------------------------------------------


def test_profiles_cover_the_documented_ranges(io):
    decode, prefill = plan_profiles(io, num_slots=4, max_context=256, max_prefill=64)
    assert (decode.name, prefill.name) == ("decode", "prefill")
    assert decode.input_shapes["input_ids"] == ((1, 1), (4, 1), (4, 1))
    assert decode.input_shapes["past_key_0"] == ((1, 3, 0, 64), (4, 3, 128, 64), (4, 3, 255, 64))
    assert decode.input_shapes["attention_bias"] == ((1, 1, 1), (4, 1, 129), (4, 1, 256))
    assert prefill.input_shapes["input_ids"] == ((1, 1), (1, 64), (4, 64))
    assert prefill.input_shapes["attention_bias"][2] == (4, 64, 255 + 64)
    assert prefill.input_shapes["logits_indices"][2] == (4, 64)
    assert prefill.input_shapes["past_value_29"][2] == (4, 3, 255, 64)
    for plan in (decode, prefill):
        assert set(plan.input_shapes) == {s.name for s in io.inputs}
        for lo, opt, hi in plan.input_shapes.values():
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))
        assert plan.dims["total"].opt == plan.dims["past"].opt + plan.dims["seq"].opt
        assert plan.dims["total"].max == plan.dims["past"].max + plan.dims["seq"].max


@pytest.mark.parametrize(
    "kwargs", [dict(max_prefill=0), dict(max_prefill=300), dict(num_slots=0), dict(max_context=1, max_prefill=1)]
)
def test_profile_arguments_out_of_range_are_refused(io, kwargs):
    args = dict(num_slots=4, max_context=256, max_prefill=64) | kwargs
    with pytest.raises(ValueError):
        plan_profiles(io, **args)


def test_an_unplanned_symbolic_dim_is_refused(io):
    odd = GraphIO(io.inputs + (TensorSpec("rope_scale", "float32", ("heads",)),), io.outputs)
    with pytest.raises(ContractMismatchError, match="rope_scale has symbolic dims \\['heads'\\]"):
        plan_profiles(odd, 4, 256, 64)


def test_steps_pick_the_profile_that_covers_them(io):
    plans = plan_profiles(io, num_slots=4, max_context=256, max_prefill=64)
    assert select_profile(plans, rows=4, seq=1, past=255, n_logits=1) == 0
    assert select_profile(plans, rows=1, seq=1, past=0, n_logits=1) == 0
    assert select_profile(plans, rows=2, seq=64, past=200, n_logits=1) == 1
    assert select_profile(plans, rows=1, seq=1, past=10, n_logits=2) == 1
    with pytest.raises(ValueError, match="no optimization profile"):
        select_profile(plans, rows=1, seq=65, past=0, n_logits=1)
    with pytest.raises(ValueError, match="no optimization profile"):
        select_profile(plans, rows=5, seq=1, past=0, n_logits=1)


# -- engine cache key ----------------------------------------------------------------------


def _key_args(model_dir, io, **overrides):
    args = dict(
        model=model_dir,
        plans=plan_profiles(io, 4, 256, 64),
        precision="bf16",
        tensorrt_version="10.9.0.34",
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability=(9, 0),
    )
    return args | overrides


def test_same_inputs_give_the_same_key(model_dir, io):
    first = engine_cache_key(**_key_args(model_dir, io))
    second = engine_cache_key(**_key_args(model_dir, io))  # profiles planned afresh
    assert first.digest == second.digest
    assert len(first.digest) == 64 and set(first.digest) <= set("0123456789abcdef")
    assert first.file_name() == f"decoder-bf16-{first.digest[:24]}.engine"
    assert first.model_sha256 == model_dir.manifest["source"]["sha256"]
    assert first.recipe_version == BUILD_RECIPE_VERSION


@pytest.mark.parametrize(
    "change",
    [
        {"precision": "fp16"},
        {"tensorrt_version": "10.9.0.35"},
        {"gpu_name": "NVIDIA A100-SXM4-80GB"},
        {"compute_capability": (8, 0)},
        {"max_prefill": 128},
        {"num_slots": 8},
        {"max_context": 512},
    ],
)
def test_changing_any_component_changes_the_key(model_dir, io, change):
    base = engine_cache_key(**_key_args(model_dir, io))
    sizes = {k: change.pop(k) for k in ("max_prefill", "num_slots", "max_context") if k in change}
    if sizes:
        plan_args = dict(num_slots=4, max_context=256, max_prefill=64) | sizes
        change["plans"] = plan_profiles(io, **plan_args)
    changed = engine_cache_key(**_key_args(model_dir, io, **change))
    assert changed.digest != base.digest
    assert changed.file_name() != base.file_name()


@pytest.mark.parametrize("field", ["model_sha256", "export_version", "model_precision", "recipe_version"])
def test_model_identity_and_recipe_are_part_of_the_key(model_dir, io, field):
    base = engine_cache_key(**_key_args(model_dir, io))
    value = getattr(base, field)
    other = value + 1 if isinstance(value, int) else value + "x"
    assert dataclasses.replace(base, **{field: other}).digest != base.digest


def test_key_components_are_json_and_name_every_part(model_dir, io):
    components = engine_cache_key(**_key_args(model_dir, io)).components()
    assert set(components) == {f.name for f in dataclasses.fields(EngineCacheKey)}
    assert components["profiles"][1]["inputs"]["input_ids"] == [[1, 1], [1, 64], [4, 64]]


# -- precision -----------------------------------------------------------------------------


def test_precision_resolution():
    both = {"FP16", "BF16"}
    assert resolve_precision("auto", (9, 0), both) == "bf16"
    assert resolve_precision("auto", (8, 0), both) == "bf16"
    assert resolve_precision("auto", (7, 5), both) == "fp16"
    assert resolve_precision("auto", (9, 0), {"FP16"}) == "fp16"
    assert resolve_precision("auto", (9, 0), set()) == "fp32"
    assert resolve_precision("fp32", (7, 5), both) == "fp32"
    assert resolve_precision("fp16", (9, 0), both) == "fp16"
    with pytest.raises(ValueError, match=r"compute capability >= 8\.0"):
        resolve_precision("bf16", (7, 5), both)
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("int8", (9, 0), both)


def test_reduced_precision_pins_rope_and_norm_statistics(model_dir, graph):
    pinned = fp32_pinned_tensors(graph)
    nodes = list(graph.graph.node)
    by_op = lambda op: [out for n in nodes if n.op_type == op for out in n.output]  # noqa: E731
    norms = 2 * model_dir.config.num_layers + 1
    assert set(by_op("Cos")) | set(by_op("Sin")) <= pinned and len(by_op("Cos")) == 1
    assert set(by_op("ReduceMean")) <= pinned and len(by_op("ReduceMean")) == norms
    assert set(by_op("Pow")) <= pinned and set(by_op("Sqrt")) <= pinned
    rope_tables = [
        out
        for n in nodes
        if n.op_type == "Unsqueeze" and n.input[0] in set(by_op("Cos")) | set(by_op("Sin"))
        for out in n.output
    ]
    assert len(rope_tables) == 2 and set(rope_tables) <= pinned
    # the heavy math stays free to run in reduced precision
    for op in ("MatMul", "Softmax", "Div", "Gather", "Sigmoid"):
        assert not set(by_op(op)) & pinned, op
    assert len(pinned) < 0.2 * len(nodes)


# -- step validation, chunking and logits merging --------------------------------------------


def test_invalid_steps_are_refused():
    ok = _batch([0, 1], [[5, 6], [7, 0]], [3, 0], [2, 1])
    validate_step(ok, num_slots=2, max_context=8)
    with pytest.raises(ValueError, match="slots"):
        validate_step(ok, num_slots=1, max_context=8)
    with pytest.raises(ValueError, match="slots"):
        validate_step(_batch([1, 1], [[5], [7]], [0, 0], [1, 1]), num_slots=2, max_context=8)
    with pytest.raises(ValueError, match="max_context"):
        validate_step(ok, num_slots=2, max_context=4)
    with pytest.raises(ValueError, match="new_lengths"):
        validate_step(_batch([0], [[5, 6]], [0], [3], [[1]]), num_slots=2, max_context=8)
    with pytest.raises(ValueError, match="logits_indices"):
        validate_step(_batch([0], [[5, 6]], [0], [2], [[2]]), num_slots=2, max_context=8)


def test_a_step_that_fits_is_not_split():
    batch = _batch([0, 1], [[5, 6], [7, 0]], [3, 0], [2, 1])
    (only,) = split_step(batch, max_seq=2)
    assert only.batch is batch and only.offset == 0 and only.rows.tolist() == [0, 1]


def test_long_steps_are_split_into_chunks_that_continue_each_row():
    ids = np.arange(1, 11).reshape(2, 5)
    ids[1, 2:] = 0  # row 1 has 2 real tokens
    batch = _batch([3, 1], ids, [0, 4], [5, 2])
    subs = split_step(batch, max_seq=2)
    assert [s.offset for s in subs] == [0, 2, 4]
    assert [s.rows.tolist() for s in subs] == [[0, 1], [0], [0]]
    first, second, third = (s.batch for s in subs)
    assert first.input_ids.tolist() == [[1, 2], [6, 7]] and first.cached_lengths.tolist() == [0, 4]
    assert (
        second.input_ids.tolist() == [[3, 4]] and second.cached_lengths.tolist() == [2] and second.slots.tolist() == [3]
    )
    assert (
        third.input_ids.tolist() == [[5]] and third.cached_lengths.tolist() == [4] and third.new_lengths.tolist() == [1]
    )
    # every real token is sent exactly once, at its absolute position
    sent = sorted(
        (int(s.batch.slots[r]), int(s.batch.position_ids()[r, t]))
        for s in subs
        for r in range(s.batch.rows)
        for t in range(s.batch.new_lengths[r])
    )
    assert sent == [(1, 4), (1, 5), (3, 0), (3, 1), (3, 2), (3, 3), (3, 4)]


def test_chunk_logits_are_merged_back_in_batch_order():
    batch = _batch([3, 1], np.ones((2, 5)), [0, 4], [5, 2], logits_indices=[[4, 0], [1, 1]])
    subs = split_step(batch, max_seq=2)
    # fake chunk logits that encode (original row, absolute column)
    outs = []
    for sub in subs:
        cols = sub.offset + sub.batch.logits_indices
        outs.append(np.stack([sub.rows[:, None] * 100 + cols], -1).astype(np.float32))
    merged = merge_logits(batch, subs, outs)
    assert merged[..., 0].tolist() == [[4, 0], [101, 101]]


def test_chunked_steps_need_logits_on_real_tokens():
    batch = _batch([0], np.ones((1, 5)), [0], [3], logits_indices=[[4]])
    assert split_step(batch, max_seq=5)  # one call: allowed, like the ONNX Runtime backend
    with pytest.raises(ValueError, match="real"):
        split_step(batch, max_seq=2)


# -- the device step on CPU, ONNX Runtime standing in for TensorRT -------------------------


def test_cache_gather_and_scatter_match_numpy(model_dir):
    torch = pytest.importorskip("torch")
    c = dataclasses.replace(model_dir.config, num_layers=2)
    cache = DeviceKVCache(c, num_slots=3, max_context=6, device="cpu")
    assert cache.storage.shape == (2, 2, 3, c.num_kv_heads, 6, c.head_dim)
    reference = np.zeros(tuple(cache.storage.shape), np.float32)
    rng = np.random.default_rng(0)
    batch = _batch([2, 0], np.zeros((2, 3)), [1, 0], [3, 2])
    new_kv = rng.standard_normal((2, 2, 2, c.num_kv_heads, 3, c.head_dim)).astype(np.float32)
    cache.scatter(torch.from_numpy(new_kv), batch)
    reference[:, :, 2, :, 1:4] = new_kv[:, :, 0, :, :3]
    reference[:, :, 0, :, 0:2] = new_kv[:, :, 1, :, :2]  # the padded third token is not written
    np.testing.assert_array_equal(cache.storage.numpy(), reference)
    gathered = cache.gather(torch.tensor([0, 2]), past=3)
    assert gathered.is_contiguous() and gathered[1, 0].is_contiguous()
    np.testing.assert_array_equal(gathered.numpy(), reference[:, :, [0, 2], :, :3])
    assert cache.gather(torch.tensor([1]), past=0).numel() == 0
    cache.copy_prefix(src_slot=2, dst_slot=1, length=3)  # a shared prompt prefix into another slot
    reference[:, :, 1, :, :3] = reference[:, :, 2, :, :3]
    np.testing.assert_array_equal(cache.storage.numpy(), reference)


@pytest.fixture(scope="module")
def model_dir():
    """fp32 weights: decoder.onnx is what TensorRT builds from, and it is fp32 at every precision."""
    from services.modelstore.prepare import prepare_model
    from tests.conftest import MODELS_ROOT

    return prepare_model(MODELS_ROOT, "fp32")


@pytest.fixture(scope="module")
def ort_backend(model_dir):
    from services.inference.backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(model_dir, num_slots=3, max_context=64, intra_op_threads=2)


def _runner(model_dir, io, ort_backend, max_prefill):
    torch = pytest.importorskip("torch")
    import onnxruntime

    # the standard-ops decoder.onnx stands in for the TensorRT engine built from it
    session = onnxruntime.InferenceSession(str(model_dir.decoder_path), providers=["CPUExecutionProvider"])
    calls = []

    def execute(profile, inputs, outputs):
        calls.append(profile)
        results = session.run(list(outputs), {k: v.numpy() for k, v in inputs.items()})
        for tensor, result in zip(outputs.values(), results):
            tensor.copy_(torch.from_numpy(result))

    names = map_io_names(model_dir.config, io)
    plans = plan_profiles(io, num_slots=3, max_context=64, max_prefill=max_prefill)
    return DeviceStepRunner(model_dir.config, names, 3, 64, plans, execute, device="cpu"), calls


PROMPTS = [[1, 504, 3458, 314, 260, 3187, 282, 4194], [1, 9690, 28, 634]]


def _prefill_batch() -> StepBatch:
    ids = np.zeros((2, 8), np.int64)
    for i, p in enumerate(PROMPTS):
        ids[i, : len(p)] = p
    return _batch([2, 0], ids, [0, 0], [len(p) for p in PROMPTS])


def test_device_steps_reproduce_the_onnxruntime_backend(model_dir, io, ort_backend):
    runner, calls = _runner(model_dir, io, ort_backend, max_prefill=16)
    batch = _prefill_batch()
    expected, got = ort_backend.forward(batch), runner.forward(batch)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    cached = batch.new_lengths.copy()
    for _ in range(3):  # greedy decode, both rows in one batch
        tokens = expected[:, 0].argmax(-1)
        step = _batch([2, 0], tokens[:, None], cached, [1, 1])
        expected, got = ort_backend.forward(step), runner.forward(step)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
        cached += 1
    assert calls == [1, 0, 0, 0]  # prefill profile once, then the decode profile
    storage = runner.cache.storage.numpy()
    for layer in (0, 29):
        for slot, length in ((2, cached[0]), (0, cached[1])):
            keys, values = ort_backend.slot_cache(layer, slot)
            np.testing.assert_allclose(storage[layer, 0, slot, :, :length], keys[:, :length], atol=1e-4)
            np.testing.assert_allclose(storage[layer, 1, slot, :, :length], values[:, :length], atol=1e-4)
    assert not storage[:, :, 1].any()  # the unused slot stays untouched


def test_chunked_prefill_equals_one_long_call(model_dir, io, ort_backend):
    runner, calls = _runner(model_dir, io, ort_backend, max_prefill=3)
    batch = _prefill_batch()
    expected, got = ort_backend.forward(batch), runner.forward(batch)
    assert calls == [1, 1, 1]  # 8 tokens in chunks of 3
    storage = runner.cache.storage.numpy()
    np.testing.assert_allclose(storage[5, 0, 2, :, :8], ort_backend.slot_cache(5, 2)[0][:, :8], atol=1e-4)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)


# -- the TensorRT call sequence, against a recording stand-in for IExecutionContext -------


class _RecordingContext:
    def __init__(self, logits_shape, execute_ok=True):
        self.calls = []
        self.logits_shape = logits_shape
        self.execute_ok = execute_ok

    def set_optimization_profile_async(self, index, stream):
        self.calls.append(("profile", index, stream))
        return True

    def set_input_shape(self, name, shape):
        self.calls.append(("shape", name, shape))
        return True

    def set_tensor_address(self, name, address):
        self.calls.append(("address", name, address))
        return True

    def get_tensor_shape(self, name):
        return self.logits_shape

    def execute_async_v3(self, stream):
        self.calls.append(("execute", stream))
        return self.execute_ok


def test_executor_binds_by_name_switches_profiles_once_and_covers_empty_tensors():
    torch = pytest.importorskip("torch")
    from services.inference.backends.tensorrt.backend import _TrtExecutor

    ctx = _RecordingContext((2, 1, 7))
    executor = _TrtExecutor(ctx, stream_handle=1234, dummy_address=4096)
    past = torch.zeros((2, 3, 0, 4))
    ids = torch.ones((2, 1), dtype=torch.int64)
    logits = torch.empty((2, 1, 7))
    for _ in range(2):
        executor(0, {"input_ids": ids, "past_key_0": past}, {"logits": logits})
    assert [c for c in ctx.calls if c[0] == "profile"] == [("profile", 0, 1234)]
    assert ("shape", "past_key_0", (2, 3, 0, 4)) in ctx.calls
    addresses = {name: addr for kind, name, addr in (c for c in ctx.calls if c[0] == "address")}
    assert addresses == {"input_ids": ids.data_ptr(), "past_key_0": 4096, "logits": logits.data_ptr()}
    assert ctx.calls[-1] == ("execute", 1234)
    executor(1, {"input_ids": ids}, {"logits": logits})
    assert [c for c in ctx.calls if c[0] == "profile"][-1] == ("profile", 1, 1234)


def test_executor_refuses_a_shape_disagreement_and_a_failed_launch():
    torch = pytest.importorskip("torch")
    from services.inference.backends.tensorrt.backend import _TrtExecutor

    logits = torch.empty((2, 1, 7))
    with pytest.raises(RuntimeError, match="TensorRT infers logits"):
        _TrtExecutor(_RecordingContext((2, 1, 8)), 1, 4096)(0, {}, {"logits": logits})
    with pytest.raises(RuntimeError, match="execute_async_v3 failed"):
        _TrtExecutor(_RecordingContext((2, 1, 7), execute_ok=False), 1, 4096)(0, {}, {"logits": logits})
    with pytest.raises(ValueError, match="contiguous"):
        _TrtExecutor(_RecordingContext((2, 1, 7)), 1, 4096)(0, {"x": torch.zeros((4, 4)).t()}, {"logits": logits})
