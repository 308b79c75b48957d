"""The int8 weights of decoder_cpu.onnx (services/modelstore/quantize.py, calibration.py): the
Q8_0 embedding carried exactly, the 8-bit blocks' error bound, smoothing that leaves the computed
function unchanged, and the layout checked by running ONNX Runtime's MatMulNBits itself."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from services.modelstore.onnx_cpu_export import CpuDecoderWeights
from services.modelstore.decoder_contract import LlamaConfig
from services.modelstore.quantize import (
    BLOCK,
    NBitsWeight,
    Q80Blocks,
    parse_q8_0,
    q8_0_to_nbits,
    quantize_8bit,
    smooth_and_quantize,
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


def test_8bit_blocks_stay_within_a_510th_of_their_range_and_keep_zero():
    w = np.random.default_rng(0).standard_normal((16, 96)).astype(np.float32)
    w[3, :BLOCK] = 0.0  # an all-zero block
    w[5, BLOCK:] = np.abs(w[5, BLOCK:])  # blocks of one sign
    blocks = w.reshape(16, 3, BLOCK)
    span = np.maximum(blocks.max(-1), 0) - np.minimum(blocks.min(-1), 0)
    error = np.abs(quantize_8bit(w).dequantize() - w).reshape(16, 3, BLOCK)
    assert (error <= span[..., None] / 510 + 1e-6).all()
    assert np.array_equal(quantize_8bit(w).dequantize()[3, :BLOCK], np.zeros(BLOCK, np.float32))


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
    weights = {"model.embed_tokens.weight": rng.standard_normal((c.vocab_size, c.hidden_size)), "model.norm.weight": rng.uniform(0.5, 2, c.hidden_size)}
    for i in range(c.num_layers):
        for name, shape in shapes.items():
            weights[f"model.layers.{i}.{name}"] = rng.uniform(0.5, 2, shape) if "norm" in name else rng.standard_normal(shape) * 0.05
    return {k: v.astype(np.float32) for k, v in weights.items()}


def test_smoothing_moves_scale_between_layers_without_changing_the_function():
    config = LlamaConfig(num_layers=2, hidden_size=64, intermediate_size=96, num_heads=4, num_kv_heads=2, vocab_size=32,
                         rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=64)
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
    inits = [numpy_helper.from_array(weight.codes, "B"), numpy_helper.from_array(weight.scales, "scales")]
    inputs = ["A", "B", "scales"]
    if weight.zero_points is not None:
        inits.append(numpy_helper.from_array(weight.zero_points, "zp"))
        inputs.append("zp")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=weight.k, N=weight.n, bits=weight.bits,
                            block_size=weight.block_size, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["m", weight.k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", weight.n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"A": x})[0]


@pytest.mark.parametrize("accuracy_level", [1, 4])
def test_onnxruntime_matmulnbits_reads_our_8bit_blocks(accuracy_level):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 96)).astype(np.float32)
    for weight in (quantize_8bit(rng.standard_normal((24, 96)).astype(np.float32)),
                   q8_0_to_nbits(Q80Blocks(rng.integers(-127, 128, (24, 3, BLOCK)).astype(np.int8), rng.uniform(0.001, 0.01, (24, 3)).astype(np.float32)))):
        expected = x @ weight.dequantize().T
        # level 4 rounds x to int8 blocks
        tolerance = 1e-4 if accuracy_level == 1 else 2e-2 * np.abs(expected).max()
        assert np.abs(_matmulnbits(weight, x, accuracy_level) - expected).max() < tolerance


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
