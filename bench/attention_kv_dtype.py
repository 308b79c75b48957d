"""ONNX Runtime's CPU GroupQueryAttention alone, with the KV cache in float32 (as served), in float16
and in int8 (static per-channel scales, `kv_cache_bit_width=8`): the time of one step's attention over
the model's 30 layers, for decode steps by rows and cached tokens and for one row's 128-token prefill
chunk after cached tokens, with the shapes of SmolLM2-135M (9 query heads, 3 KV heads, head size 64,
slots of 2,048 positions, past and present sharing one buffer as in the backend).

    .venv/bin/python bench/attention_kv_dtype.py

Half-precision or int8 KV would halve or quarter the bytes a long-context step reads, but the CPU
kernel converts them to float32 to compute, so they are measured before they are built.
"""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

HEADS, KV_HEADS, HEAD_DIM, CAPACITY, LAYERS = 9, 3, 64, 2048, 30
ROUNDS = 5
CHUNK = 128
# (rows, new tokens a row, cached tokens): decode steps, then one prompt's prefill chunks
CASES = ((1, 1, 1100), (8, 1, 1100), (32, 1, 150), (32, 1, 1500), (1, CHUNK, 0), (1, CHUNK, 512), (1, CHUNK, 896))
KINDS = {
    "float32": (np.float32, TensorProto.FLOAT),
    "float16": (np.float16, TensorProto.FLOAT16),
    "int8": (np.int8, TensorProto.INT8),
}


def session(kind: str) -> ort.InferenceSession:
    cache_type = KINDS[kind][1]
    t = TensorProto.FLOAT16 if kind == "float16" else TensorProto.FLOAT
    inputs = ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total_sequence_length"]
    initializers, attributes = [], {}
    if kind == "int8":
        # a scale per KV head and channel (calibrated from real keys/values if this were built)
        scale = np.full((KV_HEADS, 1, HEAD_DIM), 0.05, np.float32)
        initializers = [helper.make_tensor(n, TensorProto.FLOAT, scale.shape, scale.ravel()) for n in ("ks", "vs")]
        inputs += ["", "", "", "", "", "ks", "vs"]
        attributes = {"kv_cache_bit_width": 8, "k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL"}
    node = helper.make_node(
        "GroupQueryAttention",
        inputs,
        ["out", "present_key", "present_value"],
        domain="com.microsoft",
        num_heads=HEADS,
        kv_num_heads=KV_HEADS,
        **attributes,
    )
    cache = ["batch", KV_HEADS, CAPACITY, HEAD_DIM]
    graph = helper.make_graph(
        [node],
        "attention",
        [
            helper.make_tensor_value_info("qkv", t, ["batch", "seq", (HEADS + 2 * KV_HEADS) * HEAD_DIM]),
            helper.make_tensor_value_info("past_key", cache_type, cache),
            helper.make_tensor_value_info("past_value", cache_type, cache),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
            helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        ],
        [
            helper.make_tensor_value_info("out", t, ["batch", "seq", HEADS * HEAD_DIM]),
            helper.make_tensor_value_info("present_key", cache_type, cache),
            helper.make_tensor_value_info("present_value", cache_type, cache),
        ],
        initializers,
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def step_ms(sess: ort.InferenceSession, kind: str, rows: int, new: int, cached: int, repeats: int = 10) -> float:
    rng = np.random.default_rng(0)
    cache_dtype = KINDS[kind][0]
    dtype = np.float16 if kind == "float16" else np.float32
    qkv = rng.standard_normal((rows, new, (HEADS + 2 * KV_HEADS) * HEAD_DIM)).astype(dtype)
    if cache_dtype is np.int8:
        key = rng.integers(-127, 128, (rows, KV_HEADS, CAPACITY, HEAD_DIM)).astype(np.int8)
    else:
        key = rng.standard_normal((rows, KV_HEADS, CAPACITY, HEAD_DIM)).astype(cache_dtype)
    value = key.copy()
    binding = sess.io_binding()
    binding.bind_cpu_input("qkv", qkv)
    binding.bind_cpu_input("past_key", key)
    binding.bind_cpu_input("past_value", value)
    binding.bind_cpu_input("seqlens_k", np.full(rows, cached + new - 1, np.int32))
    binding.bind_cpu_input("total_sequence_length", np.array(cached + new, np.int32))
    binding.bind_output("out")
    binding.bind_output("present_key", "cpu", 0, cache_dtype, key.shape, key.ctypes.data)
    binding.bind_output("present_value", "cpu", 0, cache_dtype, value.shape, value.ctypes.data)
    for _ in range(3):
        sess.run_with_iobinding(binding)
    started = time.perf_counter()
    for _ in range(repeats):
        sess.run_with_iobinding(binding)
    return (time.perf_counter() - started) / repeats * 1000 * LAYERS


def main() -> None:
    sessions = {kind: session(kind) for kind in KINDS}
    print(f"{'rows':>4} {'new':>4} {'cached':>6}  " + "  ".join(f"{k + ' ms':>10}" for k in KINDS))
    print(f"(attention of one step, {LAYERS} layers; medians of {ROUNDS} rounds alternating the kinds)")
    for rows, new, cached in CASES:
        times: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for _ in range(ROUNDS):
            for kind in KINDS:
                times[kind].append(step_ms(sessions[kind], kind, rows, new, cached))
        print(f"{rows:>4} {new:>4} {cached:>6}  " + "  ".join(f"{float(np.median(times[k])):10.1f}" for k in KINDS))


if __name__ == "__main__":
    main()
