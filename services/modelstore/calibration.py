"""Calibration data for the quantized precisions (quantize.py), from the float32 `decoder.onnx`.

int8: one forward pass over a short fixed text (a chat in the model's own template, code, numbers
and prose; not the perplexity test text) records, for every layer, the largest |x| of each input
channel of the four projections (q/k/v, o, gate/up and down) for smoothing.

int4: GPTQ needs the projections' inputs themselves, and many more of them than that text's ~300
tokens (with fewer tokens than input channels it fits the calibration text and generalizes worse
than no compensation at all). The float32 model answers CALIBRATION_PROMPTS itself (seeded
sampling): chats in the model's own distribution, several thousand tokens, with no data set to
download; those and the fixed text are the int4 calibration set.
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
    return {k: np.abs(x).max(0) for k, x in projection_inputs(decoder_path, config, [token_ids]).items()}


def projection_inputs(decoder_path: Path, config, sequences: list[list[int]]) -> dict[tuple[str, int], np.ndarray]:
    """{(kind, layer): x [tokens, channels]}: the projections' inputs over every sequence (each
    from an empty cache), concatenated."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

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

    keys = list(inputs)
    collected: dict[tuple[str, int], list[np.ndarray]] = {k: [] for k in keys}
    for token_ids in sequences:
        outputs = session.run([inputs[k] for k in keys], _prefill_feed(config, token_ids))
        for k, x in zip(keys, outputs):
            collected[k].append(x.reshape(-1, x.shape[-1]))
    return {k: np.concatenate(xs) for k, xs in collected.items()}


def _prefill_feed(config, token_ids: list[int]) -> dict[str, np.ndarray]:
    """decoder.onnx's inputs for one row of tokens from an empty cache, logits of the last one."""
    from services.modelstore.decoder_contract import StepBatch

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
    return feed


# int4's calibration chats: the model's own answers to these (none is a benchmark prompt or from
# the perplexity text), rendered in its chat template as CALIBRATION_TEXT's chats are
CALIBRATION_PROMPTS = (
    "Explain how vaccines train the immune system.",
    "Write a haiku about autumn leaves.",
    "What are three tips for a good night's sleep?",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Why do cats purr?",
    "Give me a simple recipe for pancakes.",
    "What is the difference between weather and climate?",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "How does a bicycle stay upright when it moves?",
    "List five countries in South America and their capitals.",
    "What is 17 multiplied by 23? Show your steps.",
    "Write a short, polite email asking a colleague to reschedule a meeting.",
    "What causes earthquakes?",
    "Describe the water cycle to a ten-year-old.",
    "What should I pack for a weekend hiking trip?",
)
CHAT_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
CALIBRATION_MAX_TOKENS = 256
CALIBRATION_SEED = 0
CALIBRATION_TEMPERATURE = 0.8


def sampled_answers(
    decoder_path: Path,
    config,
    prompts: list[list[int]],
    stop_ids: frozenset[int],
    max_tokens: int = CALIBRATION_MAX_TOKENS,
    seed: int = CALIBRATION_SEED,
    temperature: float = CALIBRATION_TEMPERATURE,
) -> list[list[int]]:
    """Each prompt followed by the model's own answer: up to `max_tokens` tokens sampled at
    `temperature` (seeded), all prompts decoded together in one batch, until a stop token."""
    import onnxruntime as ort

    from services.modelstore.decoder_contract import StepBatch

    session = ort.InferenceSession(str(decoder_path), providers=["CPUExecutionProvider"])
    rows, layers = len(prompts), config.num_layers
    capacity = max(map(len, prompts)) + max_tokens
    # per row its cached tokens first; a row shorter than the longest sees the rest masked out
    cache = {
        f"{kind}_{i}": np.zeros((rows, config.num_kv_heads, capacity, config.head_dim), np.float32)
        for i in range(layers)
        for kind in ("key", "value")
    }
    names = [o.name for o in session.get_outputs()]
    lengths = np.array([len(p) for p in prompts], np.int64)
    logits = np.empty((rows, config.vocab_size), np.float32)
    for r, prompt in enumerate(prompts):
        out = dict(zip(names, session.run(None, _prefill_feed(config, prompt))))
        logits[r] = out["logits"][0, -1]
        for name, buffer in cache.items():
            buffer[r, :, : len(prompt)] = out[f"new_{name}"][0]
    rng = np.random.default_rng(seed)
    answers = [list(p) for p in prompts]
    done = np.zeros(rows, bool)
    for _ in range(max_tokens):
        scaled = logits.astype(np.float64) / temperature
        probs = np.exp(scaled - scaled.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        tokens = np.array([rng.choice(config.vocab_size, p=row) for row in probs], np.int64)
        for r in (int(i) for i in np.flatnonzero(~done)):
            answers[r].append(int(tokens[r]))
            done[r] = int(tokens[r]) in stop_ids
        if done.all():
            break
        batch = StepBatch(
            np.arange(rows), tokens[:, None], lengths, np.ones(rows, np.int64), np.zeros((rows, 1), np.int64)
        )
        past = batch.past
        feed = {
            "input_ids": batch.input_ids,
            "position_ids": batch.position_ids(),
            "attention_bias": batch.attention_bias(),
            "logits_indices": batch.logits_indices,
        }
        feed.update({f"past_{name}": np.ascontiguousarray(buffer[:, :, :past]) for name, buffer in cache.items()})
        out = dict(zip(names, session.run(None, feed)))
        logits = out["logits"][:, 0]
        for name, buffer in cache.items():
            buffer[np.arange(rows), :, lengths] = out[f"new_{name}"][:, :, 0]
        lengths += 1
    return answers
