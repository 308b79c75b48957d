"""The int8 and int4 weights of decoder_cpu.onnx (services/modelstore/quantize.py, calibration.py):
the Q8_0 embedding carried exactly, the 8-bit blocks' error bound, the 4-bit blocks' codes, zero
points and error against plain min/max rounding, GPTQ's compensation, smoothing that leaves the
computed function unchanged, the layouts checked by running ONNX Runtime's MatMulNBits itself, and
the int4 calibration set sampled from the model."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from services.modelstore.decoder_contract import LlamaConfig
from services.modelstore.onnx_cpu_export import CpuDecoderWeights
from services.modelstore.quantize import (
    BLOCK,
    INT8_BLOCKS,
    NBitsWeight,
    Q80Blocks,
    gptq_4bit,
    q8_0_to_nbits,
    quantize_4bit,
    quantize_8bit,
    smooth,
    smooth_and_gptq,
    smooth_and_quantize,
)


@pytest.mark.parametrize("block_size", [32, 64])
def test_8bit_blocks_stay_within_a_510th_of_their_range_and_keep_zero(block_size):
    w = np.random.default_rng(0).standard_normal((16, 192)).astype(np.float32)
    w[3, :block_size] = 0.0  # an all-zero block
    w[5, block_size:] = np.abs(w[5, block_size:])  # blocks of one sign
    quantized = quantize_8bit(w, block_size)
    assert quantized.block_size == block_size and quantized.scales.shape == (16, 192 // block_size)
    blocks = w.reshape(16, -1, block_size)
    span = np.maximum(blocks.max(-1), 0) - np.minimum(blocks.min(-1), 0)
    error = np.abs(quantized.dequantize() - w).reshape(16, -1, block_size)
    assert (error <= span[..., None] / 510 + 1e-6).all()
    assert np.array_equal(quantized.dequantize()[3, :block_size], np.zeros(block_size, np.float32))
    with pytest.raises(ValueError, match="do not divide"):
        quantize_8bit(w[:, :160], 64)


def _random_weights(config: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    c, hd = config, config.head_dim
    shapes = {
        "self_attn.q_proj.weight": (c.num_heads * hd, c.hidden_size),
        "self_attn.k_proj.weight": (c.num_kv_heads * hd, c.hidden_size),
        "self_attn.v_proj.weight": (c.num_kv_heads * hd, c.hidden_size),
        "self_attn.o_proj.weight": (c.hidden_size, c.num_heads * hd),
        "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
        "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
        "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
        "input_layernorm.weight": (c.hidden_size,),
        "post_attention_layernorm.weight": (c.hidden_size,),
    }
    weights = {
        "model.embed_tokens.weight": rng.standard_normal((c.vocab_size, c.hidden_size)),
        "model.norm.weight": rng.uniform(0.5, 2, c.hidden_size),
    }
    for i in range(c.num_layers):
        for name, shape in shapes.items():
            weights[f"model.layers.{i}.{name}"] = (
                rng.uniform(0.5, 2, shape) if "norm" in name else rng.standard_normal(shape) * 0.05
            )
    return {k: v.astype(np.float32) for k, v in weights.items()}


def test_smoothing_moves_scale_between_layers_without_changing_the_function():
    config = LlamaConfig(
        num_layers=2,
        hidden_size=64,
        intermediate_size=96,
        num_heads=4,
        num_kv_heads=2,
        vocab_size=32,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=64,
    )
    fp32 = CpuDecoderWeights.from_fp32(config, _random_weights(config))
    rng = np.random.default_rng(1)
    # activation ranges with a few outlier channels, as in real models
    maxima = {}
    for i in range(config.num_layers):
        for kind, width in (("qkv", 64), ("o", 64), ("gate_up", 64), ("down", 96)):
            m = rng.uniform(0.5, 2, width)
            m[rng.integers(0, width, 3)] *= 50
            maxima[(kind, i)] = m.astype(np.float32)
    embed = Q80Blocks(np.zeros((32, 2, BLOCK), np.int8), np.ones((32, 2), np.float32))
    int8 = smooth_and_quantize(config, fp32, maxima, embed)
    for kind, block_size in INT8_BLOCKS.items():
        assert {w.block_size for w in getattr(int8, kind)} == {block_size}

    hd, group, inter = config.head_dim, config.num_heads // config.num_kv_heads, config.intermediate_size
    v_rows = slice((config.num_heads + config.num_kv_heads) * hd, None)

    def close(smoothed_in: np.ndarray, smoothed_w: np.ndarray, x: np.ndarray, w: np.ndarray) -> bool:
        expected = x @ w.T
        return np.linalg.norm(smoothed_in @ smoothed_w.T - expected) < 0.02 * np.linalg.norm(expected)

    for i in range(config.num_layers):
        qkv, o, gate_up, down = (w.dequantize() for w in (int8.qkv[i], int8.o[i], int8.gate_up[i], int8.down[i]))
        # 1. q/k/v and gate/up: the norm weight now carries 1/s, the weight columns s
        x = rng.standard_normal((8, 64)) * maxima[("qkv", i)]
        ratio = int8.input_norms[i] / fp32.input_norms[i]
        assert close(x * ratio, qkv[: v_rows.start], x, fp32.qkv[i][: v_rows.start])
        assert ratio.max() / ratio.min() > 5  # the outlier channels were flattened
        h = rng.standard_normal((8, 64)) * maxima[("gate_up", i)]
        ratio2 = int8.post_norms[i] / fp32.post_norms[i]
        assert close(h * ratio2, gate_up[:inter], h, fp32.gate_up[i][:inter])
        # 2. v's rows carry 1/s of the channel whose o column carries s (per kv head and dim)
        v = qkv[v_rows] * ratio
        s_v = (fp32.qkv[i][v_rows] * v).sum(1) / np.square(v).sum(1)  # least squares, row by row
        assert close(x * ratio, qkv[v_rows] * s_v[:, None], x, fp32.qkv[i][v_rows])
        s_o = np.repeat(s_v.reshape(config.num_kv_heads, 1, hd), group, axis=1).reshape(-1)
        c = rng.standard_normal((8, 64)) * maxima[("o", i)]
        assert close(c / s_o, o, c, fp32.o[i])
        # 3. up's rows carry 1/s of the channel whose down column carries s
        up = gate_up[inter:] * ratio2
        s_up = (fp32.gate_up[i][inter:] * up).sum(1) / np.square(up).sum(1)
        assert close(h * ratio2, gate_up[inter:] * s_up[:, None], h, fp32.gate_up[i][inter:])
        a = rng.standard_normal((8, 96)) * maxima[("down", i)]
        assert close(a / s_up, down, a, fp32.down[i])


def _matmulnbits(weight: NBitsWeight, x: np.ndarray, accuracy_level: int) -> np.ndarray:
    inits = [numpy_helper.from_array(weight.packed_codes(), "B"), numpy_helper.from_array(weight.scales, "scales")]
    inputs = ["A", "B", "scales"]
    if weight.zero_points is not None:
        inits.append(numpy_helper.from_array(weight.packed_zero_points(), "zp"))
        inputs.append("zp")
    node = helper.make_node(
        "MatMulNBits",
        inputs,
        ["Y"],
        domain="com.microsoft",
        K=weight.k,
        N=weight.n,
        bits=weight.bits,
        block_size=weight.block_size,
        accuracy_level=accuracy_level,
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["m", weight.k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", weight.n])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 9
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"A": x})[0]


@pytest.mark.parametrize("accuracy_level", [1, 4])
def test_onnxruntime_matmulnbits_reads_our_8bit_blocks(accuracy_level):
    rng = np.random.default_rng(2)
    for weight in (
        quantize_8bit(rng.standard_normal((24, 96)).astype(np.float32)),
        quantize_8bit(rng.standard_normal((24, 192)).astype(np.float32), 64),
        q8_0_to_nbits(
            Q80Blocks(
                rng.integers(-127, 128, (24, 3, BLOCK)).astype(np.int8),
                rng.uniform(0.001, 0.01, (24, 3)).astype(np.float32),
            )
        ),
    ):
        x = rng.standard_normal((3, weight.k)).astype(np.float32)
        expected = x @ weight.dequantize().T
        # level 4 rounds x to int8 blocks
        tolerance = 1e-4 if accuracy_level == 1 else 2e-2 * np.abs(expected).max()
        assert np.abs(_matmulnbits(weight, x, accuracy_level) - expected).max() < tolerance


# -- int4 -------------------------------------------------------------------------------------


def _minmax_4bit_error(w: np.ndarray, block_size: int) -> np.ndarray:
    """Squared error per block of plain 4-bit rounding (as quantize_8bit does with 8 bits): the block
    spans [min(w, 0), max(w, 0)] (an integer zero point in 0..15 can only offset by whole steps),
    scale span / 15, zero point rounded."""
    blocks = w.reshape(-1, block_size).astype(np.float64)
    low, high = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
    scale = np.where(high > low, (high - low) / 15, 1.0)
    zero = np.clip(np.rint(-low / scale), 0, 15)
    codes = np.clip(np.rint(blocks / scale[:, None] + zero[:, None]), 0, 15)
    return np.square((codes - zero[:, None]) * scale[:, None] - blocks).sum(-1)


@pytest.mark.parametrize("block_size", [32, 128])
def test_4bit_blocks_beat_plain_rounding_with_codes_and_zero_points_in_range(block_size):
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((24, 256)) * rng.uniform(0.01, 0.1, (24, 1))).astype(np.float32)
    w[2, :block_size] += 0.3  # a block of one sign, far from zero
    q = quantize_4bit(w, block_size)
    assert q.bits == 4 and q.block_size == block_size
    assert q.codes.shape == (24, 256 // block_size, block_size) and q.codes.max() <= 15
    assert q.zero_points.shape == (24, 256 // block_size) and q.zero_points.max() <= 15
    error = np.square(q.dequantize().astype(np.float64) - w).reshape(-1, block_size).sum(-1)
    plain = _minmax_4bit_error(w, block_size)
    assert (error <= plain * (1 + 1e-5) + 1e-12).all()  # never worse than plain rounding, block by block
    assert error.sum() < 0.95 * plain.sum()  # and better overall (measured: 0.91x at 32, 0.88x at 128)
    assert q.zero_points[2, 0] == 0  # the positive block needs no negative codes


def test_4bit_blocks_recover_weights_that_are_exactly_on_a_4bit_grid():
    rng = np.random.default_rng(4)
    codes = rng.integers(0, 16, (8, 4, 32)).astype(np.uint8)
    codes[..., 0], codes[..., 1] = 0, 15  # every block spans the whole code range
    zero = rng.integers(0, 16, (8, 4)).astype(np.uint8)
    scale = rng.uniform(0.001, 0.02, (8, 4)).astype(np.float32)
    w = NBitsWeight(8, 128, codes, scale, zero, bits=4, block_size=32).dequantize()
    q = quantize_4bit(w, 32)
    assert np.array_equal(q.codes, codes) and np.array_equal(q.zero_points, zero)
    np.testing.assert_allclose(q.scales, scale, rtol=1e-5)


def test_4bit_padded_last_block_and_symmetric_blocks():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 96)).astype(np.float32)
    padded = quantize_4bit(w, 64)  # 96 = 64 + 32: the last block is padded to 64
    assert padded.codes.shape == (6, 2, 64) and padded.dequantize().shape == (6, 96)
    plain = _minmax_4bit_error(w[:, :64], 64)
    assert (np.square(padded.dequantize()[:, :64] - w[:, :64]).sum(-1) <= plain * (1 + 1e-5)).all()
    # the padding's edge values leave the last block's range alone: only 32 weights set it
    tail = w[:, 64:]
    assert (np.abs(padded.dequantize()[:, 64:] - tail).max(-1) <= (tail.max(-1) - tail.min(-1)) / 15).all()
    symmetric = quantize_4bit(w, 32, symmetric=True)
    assert symmetric.zero_points is None and symmetric.packed_zero_points() is None
    assert np.abs(symmetric.dequantize() - w).max() < np.abs(w).max() / 7


def test_4bit_packing_puts_the_first_of_two_codes_in_the_low_nibble():
    codes = np.array([[[1, 2, 3, 4]], [[15, 0, 7, 8]]], np.uint8)
    w = NBitsWeight(2, 4, codes, np.ones((2, 1), np.float32), np.array([[3], [9]], np.uint8), bits=4, block_size=4)
    assert w.packed_codes().tolist() == [[[0x21, 0x43]], [[0x0F, 0x87]]]
    assert w.packed_zero_points().tolist() == [[0x03], [0x09]]  # one block per row: padded to a byte


@pytest.mark.parametrize("accuracy_level", [1, 4])
@pytest.mark.parametrize("block_size", [32, 64, 128])
def test_onnxruntime_matmulnbits_reads_our_4bit_blocks(accuracy_level, block_size):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 96)).astype(np.float32)  # 96: blocks of 64 and 128 are padded
    for weight in (
        quantize_4bit(rng.standard_normal((24, 96)).astype(np.float32), block_size),
        quantize_4bit(rng.standard_normal((24, 96)).astype(np.float32), block_size, symmetric=True),
    ):
        expected = x @ weight.dequantize().T
        tolerance = 1e-4 if accuracy_level == 1 else 2e-2 * np.abs(expected).max()
        assert np.abs(_matmulnbits(weight, x, accuracy_level) - expected).max() < tolerance


def _correlated_inputs(rng, tokens: int, channels: int, held_out: int = 0) -> np.ndarray:
    """Inputs with channels of different scales, mixed; the last `held_out` rows are more of the
    same distribution."""
    mix = rng.standard_normal((channels, channels)) * 0.3 + np.eye(channels)
    return (rng.standard_normal((tokens + held_out, channels)) * rng.uniform(0.2, 3, channels)) @ mix


def test_gptq_compensates_rounding_in_the_outputs_on_held_out_inputs():
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((64, 128)) * 0.05).astype(np.float32)
    both = _correlated_inputs(rng, 4000, 128, held_out=1000)
    x, held_out = both[:4000], both[4000:]
    plain, gptq = quantize_4bit(w, 32), gptq_4bit(w, x.T @ x, 32, damping=0.01)
    assert gptq.codes.max() <= 15 and gptq.zero_points.max() <= 15 and gptq.codes.shape == plain.codes.shape

    def output_error(q: NBitsWeight) -> float:
        return float(np.linalg.norm(held_out @ (q.dequantize() - w).T) / np.linalg.norm(held_out @ w.T))

    assert output_error(gptq) < 0.8 * output_error(plain)  # measured: 0.67x


def test_gptq_with_uncorrelated_inputs_is_the_weighted_block_search():
    # a diagonal X^T X leaves nothing to compensate with: each column only weighs its own error
    rng = np.random.default_rng(9)
    w = rng.standard_normal((16, 64)).astype(np.float32)
    h = np.diag(rng.uniform(0.5, 4, 64))
    gptq = gptq_4bit(w, h, 32, damping=0.1)
    plain = quantize_4bit(w, 32, importance=np.diag(h) + 0.1 * np.diag(h).mean())
    assert np.array_equal(gptq.codes, plain.codes) and np.array_equal(gptq.zero_points, plain.zero_points)
    np.testing.assert_allclose(gptq.scales, plain.scales, rtol=1e-6)


def test_smooth_and_gptq_quantizes_every_projection_to_4bit_against_the_smoothed_inputs():
    config = LlamaConfig(
        num_layers=2,
        hidden_size=64,
        intermediate_size=96,
        num_heads=4,
        num_kv_heads=2,
        vocab_size=32,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=64,
    )
    fp32 = CpuDecoderWeights.from_fp32(config, _random_weights(config))
    rng = np.random.default_rng(10)
    activations = {
        (kind, i): _correlated_inputs(rng, 400, width).astype(np.float32)
        for i in range(config.num_layers)
        for kind, width in (("qkv", 64), ("o", 64), ("gate_up", 64), ("down", 96))
    }
    embed = Q80Blocks(np.zeros((32, 2, BLOCK), np.int8), np.ones((32, 2), np.float32))
    int4 = smooth_and_gptq(config, fp32, activations, embed, alpha=0.5, block_size=32)
    factors: dict = {}
    smoothed = smooth(config, fp32, {k: np.abs(x).max(0) for k, x in activations.items()}, 0.5, factors)
    assert int4.embed is embed
    for i in range(config.num_layers):
        assert np.array_equal(int4.input_norms[i], smoothed.input_norms[i])
        for kind in ("qkv", "o", "gate_up", "down"):
            q, s = getattr(int4, kind)[i], getattr(smoothed, kind)[i]
            assert q.bits == 4 and q.block_size == 32 and (q.n, q.k) == s.shape
            # GPTQ's error is that of the outputs for the smoothed inputs x / s
            x = activations[(kind, i)] / factors[(kind, i)]
            expected = x @ s.T
            assert np.linalg.norm(x @ q.dequantize().T - expected) < 0.1 * np.linalg.norm(expected)


def test_hadamard_blocks_are_orthonormal_and_leave_the_product_unchanged():
    from services.modelstore.quantize import hadamard, rotate_blocks

    h = hadamard(64)
    np.testing.assert_allclose(h @ h.T, np.eye(64), atol=1e-6)
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((5, 192)), rng.standard_normal((7, 192))
    np.testing.assert_allclose(rotate_blocks(x, 64) @ rotate_blocks(w, 64).T, x @ w.T, atol=1e-9)
    with pytest.raises(ValueError, match="power of two"):
        hadamard(48)


@pytest.mark.parametrize("block", [0, 64])
def test_rowwise_int8_weights_stay_within_half_a_step_of_their_channel(block):
    from services.modelstore.quantize import quantize_rowwise_int8, rotate_blocks

    rng = np.random.default_rng(1)
    w = rng.standard_normal((12, 128)).astype(np.float32)
    w[4] = 0.0  # an all-zero channel
    q = quantize_rowwise_int8(w, block)
    assert q.codes.dtype == np.int8 and q.codes.shape == (128, 12) and q.hadamard_block == block
    assert np.abs(q.codes.astype(np.int32)).max() <= 127
    target = rotate_blocks(w, block) if block else w
    step = np.abs(target).max(1, keepdims=True) / 127
    assert (np.abs(q.dequantize() - target) <= step / 2 + 1e-7).all()
    assert (q.dequantize()[4] == 0).all()
