"""Builds `decoder_cpu.onnx`: the decoder for ONNX Runtime's CPU execution provider.

`decoder.onnx` (onnx_export.py) keeps to standard operators so that TensorRT reads it; this graph
computes the same function with fused operators, so each layer is a handful of kernels:

* one step is a packed run of tokens with no padding: decode rows (one token each) and prefill
  chunks side by side, every projection one GEMM over all of them;
* `meshserve.ops.PackedAttention` (services/inference/backends/ort_ops) applies the rotary embedding,
  writes the step's keys and values into the caller's KV-cache buffers (past and present bound to the
  same memory) and attends causally within each segment's slot;
* `com.microsoft.MatMulNBits` with 8-bit blocks of 64 and 32 (precision int8) or 4-bit blocks of 128
  (int4, see quantize.py), u8s8 `MatMulIntegerToFloat` after meshserve's `RowQuantize` (w8a8), or
  plain `MatMul` (fp32), with q/k/v stacked into one projection;
* `SkipSimplifiedLayerNormalization` for residual add + RMSNorm, `QuickGelu(alpha=1)` for SiLU;
* the embedding and the tied lm_head from the GGUF's Q8_0 blocks (`GatherBlockQuantized`,
  8-bit `MatMulNBits`) in the int8, int4 and w8a8 precisions.

Contract (the ONNX Runtime backend is its only user):

inputs
  input_ids       int64   [tokens]   the step's new tokens, segment after segment
  seg_slots       int64   [segments] KV-cache slot of each segment (a request's row)
  seg_cached      int64   [segments] tokens that slot already holds: the segment's first position
  seg_lengths     int64   [segments] its new tokens (>= 1; they sum to `tokens`)
  logits_indices  int64   [n]        which tokens need logits
  past_key_{i}    cache   [slots, kv_heads, capacity / 16, head_dim, 16]  keys by blocks of 16 positions
  past_value_{i}  cache   [slots, kv_heads, capacity, head_dim]
outputs
  logits          float32 [n, vocab]
  present_key_{i}, present_value_{i}  the caches with the step written in: bind them to the past buffers

Keys are stored after RoPE, as in decoder.onnx. The cache is float16 in the quantized precisions (half the
bytes a decode step reads; PackedAttention computes in float32) and float32 in fp32, which stays the exact
reference; the rest of the graph is float32. A segment needs `cached + length <= capacity`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import TensorProto, helper

from services.modelstore.decoder_contract import KEY_BLOCK, LlamaConfig
from services.modelstore.onnx_export import GraphBuilder, rope_inv_freq
from services.modelstore.quantize import NBitsWeight, Q80Blocks, RowwiseInt8Weight, q8_0_to_nbits

OPSET = 17
MS_DOMAIN = "com.microsoft"
CUSTOM_OPS_DOMAIN = "meshserve.ops"  # services/inference/backends/ort_ops: operators of our own
SEGMENT_INPUTS = ("seg_slots", "seg_cached", "seg_lengths")
ACCURACY_LEVEL = 4  # MatMulNBits: quantize activations to int8 blocks (VNNI dot products)

Linear = np.ndarray | NBitsWeight | RowwiseInt8Weight  # float32 [out, in], or quantized


@dataclass
class CpuDecoderWeights:
    """The decoder's weights as the CPU graph takes them (Hugging Face layouts, RoPE undone)."""

    embed: np.ndarray | Q80Blocks  # [vocab, hidden]; also the tied lm_head
    final_norm: np.ndarray
    input_norms: list[np.ndarray] = field(default_factory=list)
    post_norms: list[np.ndarray] = field(default_factory=list)
    qkv: list[Linear] = field(default_factory=list)  # q, k, v stacked along out
    o: list[Linear] = field(default_factory=list)
    gate_up: list[Linear] = field(default_factory=list)  # gate, up stacked along out
    down: list[Linear] = field(default_factory=list)
    lm_head: Linear | None = None  # None: the tied embedding

    @classmethod
    def from_fp32(cls, config: LlamaConfig, weights: dict[str, np.ndarray]) -> CpuDecoderWeights:
        """From the dequantized float32 weights (Hugging Face names and layouts)."""
        out = cls(embed=weights["model.embed_tokens.weight"], final_norm=weights["model.norm.weight"])
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            out.input_norms.append(weights[p + "input_layernorm.weight"])
            out.post_norms.append(weights[p + "post_attention_layernorm.weight"])
            out.qkv.append(np.concatenate([weights[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]))
            out.o.append(weights[p + "self_attn.o_proj.weight"])
            out.gate_up.append(np.concatenate([weights[p + "mlp.gate_proj.weight"], weights[p + "mlp.up_proj.weight"]]))
            out.down.append(weights[p + "mlp.down_proj.weight"])
        return out


def _rows(weight: Linear, start: int, stop: int | None) -> Linear:
    """Output features [start, stop) of a projection."""
    if isinstance(weight, RowwiseInt8Weight):
        codes = np.ascontiguousarray(weight.codes[:, start:stop])
        return replace(weight, n=codes.shape[1], codes=codes, scales=weight.scales[start:stop])
    if isinstance(weight, NBitsWeight):
        zp = None if weight.zero_points is None else weight.zero_points[start:stop]
        codes = weight.codes[start:stop]
        return replace(weight, n=codes.shape[0], codes=codes, scales=weight.scales[start:stop], zero_points=zp)
    return weight[start:stop]


def build_cpu_decoder(
    config: LlamaConfig,
    weights: CpuDecoderWeights,
    accuracy_level: int = ACCURACY_LEVEL,
    cache_type: int = TensorProto.FLOAT16,
) -> onnx.ModelProto:
    """Builds the CPU decoder graph (see the module docstring for its inputs and outputs); `cache_type`
    is the KV cache's element type, TensorProto.FLOAT16 or FLOAT (PackedAttention's two kernels)."""
    g = GraphBuilder()
    c = config
    hd = c.head_dim

    row_quantized: dict[tuple[str, int], tuple[str, str]] = {}

    def quantize_rows(x: str, hadamard_block: int) -> tuple[str, str]:
        """x [..., k] (rotated by Hadamard blocks where asked) as uint8 codes and one scale a row
        (meshserve.ops RowQuantize); once per tensor: q/k/v, and gate and up, read the same one."""
        key = (x, hadamard_block)
        if key not in row_quantized:
            codes, scale = g.ops(
                "RowQuantize", [x], "row_quantized", 2, domain=CUSTOM_OPS_DOMAIN, hadamard_block=hadamard_block
            )
            row_quantized[key] = (codes, scale)
        return row_quantized[key]

    def linear(x: str, weight: Linear, hint: str, output: str | None = None) -> str:
        if isinstance(weight, RowwiseInt8Weight):
            codes, row_scale = quantize_rows(x, weight.hadamard_block)
            product = g.op(
                "MatMulIntegerToFloat",
                [
                    codes,
                    g.const(f"{hint}_q", weight.codes),
                    shared("one"),
                    g.const(f"{hint}_scales", weight.scales),
                    shared("zp128"),
                ],
                hint,
                domain=MS_DOMAIN,
            )
            return g.op("Mul", [product, row_scale], output=output)
        if isinstance(weight, NBitsWeight):
            inputs = [x, g.const(f"{hint}_q", weight.packed_codes()), g.const(f"{hint}_scales", weight.scales)]
            zero_points = weight.packed_zero_points()
            if zero_points is not None:
                inputs.append(g.const(f"{hint}_zp", zero_points))
            return g.op(
                "MatMulNBits",
                inputs,
                hint,
                output=output,
                domain=MS_DOMAIN,
                K=weight.k,
                N=weight.n,
                bits=weight.bits,
                block_size=weight.block_size,
                accuracy_level=accuracy_level,
            )
        w = g.const(f"{hint}_weight", np.ascontiguousarray(weight.T, dtype=np.float32))
        return g.op("MatMul", [x, w], hint, output=output)

    constants: dict[str, str] = {}

    def shared(name: str) -> str:
        """A scalar the w8a8 projections share, made on first use (an unused initializer draws a warning)."""
        if name not in constants:
            value = np.array(1.0, np.float32) if name == "one" else np.array(128, np.uint8)
            constants[name] = g.const(name, value)
        return constants[name]

    # 1. embeddings
    if isinstance(weights.embed, Q80Blocks):
        table = q8_0_to_nbits(weights.embed)
        rows = table.n
        data = g.const("embed_q", table.codes.reshape(rows, -1))
        scales = g.const("embed_scales", table.scales)
        h = g.op(
            "GatherBlockQuantized",
            [data, "input_ids", scales],
            hint="embeddings",
            domain=MS_DOMAIN,
            bits=8,
            block_size=table.block_size,
            gather_axis=0,
            quantize_axis=1,
        )
        lm_head: Linear = table
    else:
        h = g.op(
            "Gather",
            [g.const("embed_tokens", weights.embed.astype(np.float32)), "input_ids"],
            hint="embeddings",
            axis=0,
        )
        lm_head = weights.embed

    # 2. RoPE tables for PackedAttention: [max_position, head_dim / 2]
    angles = np.arange(c.max_position_embeddings, dtype=np.float64)[:, None] * rope_inv_freq(c)[None, :]
    cos = g.const("rope_cos", np.cos(angles).astype(np.float32))
    sin = g.const("rope_sin", np.sin(angles).astype(np.float32))

    eps = float(c.rms_norm_eps)
    residual = h
    x = g.op(
        "SimplifiedLayerNormalization",
        [h, g.const("l0_attn_norm", weights.input_norms[0].astype(np.float32))],
        hint="l0_attn_norm",
        axis=-1,
        epsilon=eps,
        stash_type=1,
    )
    for i in range(c.num_layers):
        # 3. attention: one projection for q/k/v; PackedAttention writes the cache and attends
        qkv = linear(x, weights.qkv[i], f"l{i}_qkv")
        attn = g.ops(
            "PackedAttention",
            [qkv, "seg_slots", "seg_cached", "seg_lengths", cos, sin, f"past_key_{i}", f"past_value_{i}"],
            outputs=[g.name(f"l{i}_attn"), f"present_key_{i}", f"present_value_{i}"],
            domain=CUSTOM_OPS_DOMAIN,
            num_heads=c.num_heads,
            kv_num_heads=c.num_kv_heads,
        )[0]
        o = linear(attn, weights.o[i], f"l{i}_o")
        x, _, _, residual = g.ops(
            "SkipSimplifiedLayerNormalization",
            [o, residual, g.const(f"l{i}_mlp_norm", weights.post_norms[i].astype(np.float32))],
            outputs=[g.name(f"l{i}_mlp_norm"), "", "", g.name(f"l{i}_residual")],
            domain=MS_DOMAIN,
            epsilon=eps,
        )
        # 4. SwiGLU MLP: gate and up as two projections (measured faster than one and a Split)
        gate = linear(x, _rows(weights.gate_up[i], 0, c.intermediate_size), f"l{i}_gate")
        up = linear(x, _rows(weights.gate_up[i], c.intermediate_size, None), f"l{i}_up")
        act = g.op("Mul", [g.op("QuickGelu", [gate], domain=MS_DOMAIN, alpha=1.0), up])
        down = linear(act, weights.down[i], f"l{i}_down")
        norm = weights.input_norms[i + 1] if i + 1 < c.num_layers else weights.final_norm
        x, _, _, residual = g.ops(
            "SkipSimplifiedLayerNormalization",
            [down, residual, g.const(f"l{i + 1}_norm", norm.astype(np.float32))],
            outputs=[g.name(f"l{i + 1}_norm"), "", "", g.name(f"l{i + 1}_residual")],
            domain=MS_DOMAIN,
            epsilon=eps,
        )

    # 5. only the requested tokens go through the (large) vocabulary projection
    flat = g.op("Reshape", [x, g.const("flat_shape", np.array([-1, c.hidden_size], np.int64))])
    selected = g.op("Gather", [flat, "logits_indices"], axis=0)
    linear(selected, weights.lm_head if weights.lm_head is not None else lm_head, "lm_head", output="logits")

    key_shape: list[str | int] = ["slots", c.num_kv_heads, "key_blocks", hd, KEY_BLOCK]
    value_shape: list[str | int] = ["slots", c.num_kv_heads, "capacity", hd]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["tokens"])]
    inputs += [helper.make_tensor_value_info(n, TensorProto.INT64, ["segments"]) for n in SEGMENT_INPUTS]
    inputs.append(helper.make_tensor_value_info("logits_indices", TensorProto.INT64, ["n_logits"]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n_logits", c.vocab_size])]
    for i in range(c.num_layers):
        for kind, shape in (("key", key_shape), ("value", value_shape)):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", cache_type, shape))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}_{i}", cache_type, shape))
    graph = helper.make_graph(g.nodes, "llama_decoder_cpu", inputs, outputs, g.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid("", OPSET),
            helper.make_opsetid(MS_DOMAIN, 1),
            helper.make_opsetid(CUSTOM_OPS_DOMAIN, 1),
        ],
        producer_name="meshserve",
    )
    model.ir_version = 9
    return model
