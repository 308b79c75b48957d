"""Activation ranges for smoothing the int8 weights (quantize.smooth_and_quantize).

One forward pass of the float32 `decoder.onnx` over a short fixed text (a chat in the model's own
template, code, numbers and prose; not the perplexity test text) records, for every layer, the
largest |x| of each input channel of the four projections: q/k/v, o, gate/up and down.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

CALIBRATION_TEXT = """<|im_start|>system
You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
<|im_start|>user
Can you explain how a rainbow forms, and why it is curved?<|im_end|>
<|im_start|>assistant
A rainbow forms when sunlight enters raindrops, bends, reflects off the back of each drop and bends again as it leaves. Each colour bends by a slightly different amount, so the white light spreads into red, orange, yellow, green, blue and violet. The bow is curved because every drop that sends light to your eye sits at the same angle, about 42 degrees, from the point directly opposite the sun.<|im_end|>
<|im_start|>user
Write a short Python function that returns the largest of three numbers.<|im_end|>
<|im_start|>assistant
def largest(a, b, c):
    return max(a, b, c)

print(largest(3, 17, 8))  # 17<|im_end|>
The committee met on Tuesday, 14 March 2023, to review the budget of $1,250,000. After two hours of discussion, members agreed to spend 40% on new equipment, 35% on training and the rest on repairs. In other news, the weather stayed mild across the region, with temperatures between 12 and 18 degrees, and the local football club won its third match in a row.
"""

# the MatMul of each projection in decoder.onnx (onnx_export.py names its outputs l{i}_{hint}_{n})
_PROJECTION_HINTS = {"q": "qkv", "o": "o", "gate": "gate_up", "down": "down"}


def activation_maxima(decoder_path: Path, config, token_ids: list[int]) -> dict[tuple[str, int], np.ndarray]:
    """{(kind, layer): max |x| per input channel} of the projections' inputs over `token_ids`."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from services.modelstore.decoder_contract import StepBatch

    model = onnx.load(str(decoder_path), load_external_data=False)
    inputs: dict[tuple[str, int], str] = {}
    pattern = re.compile(rf"l(\d+)_({'|'.join(_PROJECTION_HINTS)})_\d+")
    for node in model.graph.node:
        match = pattern.fullmatch(node.output[0]) if node.op_type == "MatMul" else None
        if match:
            inputs[(_PROJECTION_HINTS[match.group(2)], int(match.group(1)))] = node.input[0]
    expected = 4 * config.num_layers
    if len(inputs) != expected:
        raise RuntimeError(f"found {len(inputs)} projection inputs in {decoder_path}, expected {expected}")
    for name in set(inputs.values()):
        model.graph.output.append(helper.make_empty_tensor_value_info(name))
    # next to decoder.onnx so that its external data resolves; removed right after loading
    probe = decoder_path.with_name("calibration.onnx")
    onnx.save(model, str(probe))
    try:
        session = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
    finally:
        probe.unlink()

    batch = StepBatch.one_row(token_ids)
    feed = {
        "input_ids": batch.input_ids,
        "position_ids": batch.position_ids(),
        "attention_bias": batch.attention_bias(),
        "logits_indices": batch.logits_indices,
    }
    empty = np.zeros((1, config.num_kv_heads, 0, config.head_dim), np.float32)
    for i in range(config.num_layers):
        feed[f"past_key_{i}"] = feed[f"past_value_{i}"] = empty
    keys = list(inputs)
    outputs = session.run([inputs[k] for k in keys], feed)
    return {k: np.abs(x).reshape(-1, x.shape[-1]).max(0) for k, x in zip(keys, outputs)}
