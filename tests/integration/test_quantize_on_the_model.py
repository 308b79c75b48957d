"""Quantization on the real GGUF and the prepared model (the block formats on synthetic weights:
tests/unit/test_quantize.py)."""

from __future__ import annotations

import numpy as np

from services.modelstore.quantize import (
    parse_q8_0,
    q8_0_to_nbits,
)


def test_q8_0_embedding_parses_and_converts_exactly(model_dir):
    import gguf
    from gguf.quants import dequantize

    from services.modelstore.prepare import GGUF_MEMBER
    from tests.conftest import MODELS_ROOT

    reader = gguf.GGUFReader(str(MODELS_ROOT / ".cache" / GGUF_MEMBER.split("/")[-1]))
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    expected = dequantize(tensor.data[:512], tensor.tensor_type).astype(np.float32)
    blocks = parse_q8_0(tensor.data[:512], 512, int(tensor.shape[0]))
    assert np.array_equal(blocks.dequantize(), expected)
    assert np.array_equal(q8_0_to_nbits(blocks).dequantize(), expected)


def test_calibration_records_every_projection_input(model_dir):
    from services.modelstore.calibration import CALIBRATION_TEXT, activation_maxima
    from services.tokenizer.core import TokenizerCore

    ids = TokenizerCore(model_dir).tokenizer.encode(CALIBRATION_TEXT, add_special_tokens=False).ids
    config = model_dir.config
    maxima = activation_maxima(model_dir.decoder_path, config, ids)
    assert len(maxima) == 4 * config.num_layers
    assert maxima[("down", 0)].shape == (config.intermediate_size,)
    assert maxima[("qkv", config.num_layers - 1)].shape == (config.hidden_size,)
    assert all((m > 0).all() for m in maxima.values())
    assert not (model_dir.path / "calibration.onnx").exists()


def test_sampled_answers_batch_rows_of_different_lengths_like_single_rows(model_dir):
    from services.modelstore.calibration import CHAT_PROMPT, sampled_answers
    from services.tokenizer.core import TokenizerCore

    tokenizer = TokenizerCore(model_dir).tokenizer
    prompts = [
        tokenizer.encode(CHAT_PROMPT.format(p), add_special_tokens=False).ids
        for p in ("What is the capital of France?", "Name a colour.")
    ]
    assert len(prompts[0]) != len(prompts[1])
    stop = frozenset(model_dir.eos_token_ids)
    # a temperature this low is greedy decoding: rows must not see each other's tokens or padding
    together = sampled_answers(model_dir.decoder_path, model_dir.config, prompts, stop, max_tokens=12, temperature=1e-4)
    alone = [
        sampled_answers(model_dir.decoder_path, model_dir.config, [p], stop, max_tokens=12, temperature=1e-4)[0]
        for p in prompts
    ]
    assert together == alone
    assert together[0][: len(prompts[0])] == prompts[0] and "Paris" in tokenizer.decode(together[0][len(prompts[0]) :])
    sampled = sampled_answers(model_dir.decoder_path, model_dir.config, prompts, stop, max_tokens=12, seed=1)
    assert sampled == sampled_answers(model_dir.decoder_path, model_dir.config, prompts, stop, max_tokens=12, seed=1)
    # a stop id ends a row right after it is generated
    answer = together[0][len(prompts[0]) :]
    stop_at = answer[2]
    stopped = sampled_answers(
        model_dir.decoder_path, model_dir.config, [prompts[0]], frozenset({stop_at}), max_tokens=12, temperature=1e-4
    )[0]
    assert stopped == prompts[0] + answer[: answer.index(stop_at) + 1]


def test_projection_inputs_concatenate_every_sequence(model_dir):
    from services.modelstore.calibration import projection_inputs

    config = model_dir.config
    inputs = projection_inputs(model_dir.decoder_path, config, [[1, 2, 3, 4, 5], [7, 8, 9]])
    assert inputs[("down", 0)].shape == (8, config.intermediate_size)
    alone = projection_inputs(model_dir.decoder_path, config, [[7, 8, 9]])
    np.testing.assert_allclose(inputs[("o", 3)][5:], alone[("o", 3)], rtol=1e-5, atol=1e-6)
