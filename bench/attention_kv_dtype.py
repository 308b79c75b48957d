"""ONNX Runtime's CPU GroupQueryAttention alone, with the KV cache in float32 (as served) and in
float16: the time of one decode step's attention over the model's 30 layers, by rows and cached
tokens, with the shapes of SmolLM2-135M (9 query heads, 3 KV heads, head size 64, slots of 2,048
positions, past and present sharing one buffer as in the backend).

    .venv/bin/python bench/attention_kv_dtype.py

Half-precision KV would halve the bytes a long-context step reads, but the CPU kernel has no native
half arithmetic and converts, so it is measured before it is built.
"""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

HEADS, KV_HEADS, HEAD_DIM, CAPACITY, LAYERS = 9, 3, 64, 2048, 30
ROUNDS = 5
CASES = ((1, 1100), (8, 1100), (32, 150), (32, 1500))  # (rows, cached tokens)


def session(dtype: type) -> ort.InferenceSession:
    t = TensorProto.FLOAT16 if dtype is np.float16 else TensorProto.FLOAT
    node = helper.make_node(
        "GroupQueryAttention",
        ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total_sequence_length"],
        ["out", "present_key", "present_value"],
        domain="com.microsoft",
        num_heads=HEADS,
        kv_num_heads=KV_HEADS,
    )
    cache = ["batch", KV_HEADS, CAPACITY, HEAD_DIM]
    graph = helper.make_graph(
        [node],
        "attention",
        [
            helper.make_tensor_value_info("qkv", t, ["batch", "seq", (HEADS + 2 * KV_HEADS) * HEAD_DIM]),
            helper.make_tensor_value_info("past_key", t, cache),
            helper.make_tensor_value_info("past_value", t, cache),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
            helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        ],
        [
            helper.make_tensor_value_info("out", t, ["batch", "seq", HEADS * HEAD_DIM]),
            helper.make_tensor_value_info("present_key", t, cache),
            helper.make_tensor_value_info("present_value", t, cache),
        ],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def step_ms(sess: ort.InferenceSession, dtype: type, rows: int, cached: int, repeats: int = 30) -> float:
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((rows, 1, (HEADS + 2 * KV_HEADS) * HEAD_DIM)).astype(dtype)
    key = rng.standard_normal((rows, KV_HEADS, CAPACITY, HEAD_DIM)).astype(dtype)
    value = key.copy()
    binding = sess.io_binding()
    binding.bind_cpu_input("qkv", qkv)
    binding.bind_cpu_input("past_key", key)
    binding.bind_cpu_input("past_value", value)
    binding.bind_cpu_input("seqlens_k", np.full(rows, cached, np.int32))
    binding.bind_cpu_input("total_sequence_length", np.array(cached + 1, np.int32))
    binding.bind_output("out")
    binding.bind_output("present_key", "cpu", 0, dtype, key.shape, key.ctypes.data)
    binding.bind_output("present_value", "cpu", 0, dtype, value.shape, value.ctypes.data)
    for _ in range(3):
        sess.run_with_iobinding(binding)
    started = time.perf_counter()
    for _ in range(repeats):
        sess.run_with_iobinding(binding)
    return (time.perf_counter() - started) / repeats * 1000 * LAYERS


def main() -> None:
    sessions = {dtype: session(dtype) for dtype in (np.float32, np.float16)}
    print(f"{'rows':>4} {'cached':>6}  float32 ms  float16 ms   (attention of one decode step, {LAYERS} layers;")
    print(f"{'':13}medians of {ROUNDS} rounds alternating the two)")
    for rows, cached in CASES:
        times: dict[type, list[float]] = {np.float32: [], np.float16: []}
        for _ in range(ROUNDS):
            for dtype in times:
                times[dtype].append(step_ms(sessions[dtype], dtype, rows, cached))
        fp32, fp16 = (float(np.median(times[d])) for d in times)
        print(f"{rows:>4} {cached:>6}  {fp32:10.1f}  {fp16:10.1f}")


if __name__ == "__main__":
    main()
