"""Builds the ONNX decoder graph of a llama-architecture model from dequantized GGUF weights.

The graph uses standard ONNX operators only (opset 17) so that ONNX Runtime and TensorRT's ONNX
parser read the same file. Its inputs and outputs, shared by every backend, are the decoder
contract written down in `decoder_contract.py`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from services.modelstore.decoder_contract import LlamaConfig

OPSET = 17


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """RoPE's inverse frequencies [head_dim / 2], float64."""
    hd = config.head_dim
    return 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))


class GraphBuilder:
    """Nodes and initializers of a graph under construction; names are `{hint}_{n}`, unique."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counter = 0

    def name(self, hint: str) -> str:
        self._counter += 1
        return f"{hint}_{self._counter}"

    def const(self, hint: str, array: np.ndarray) -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(array, order="C"), name))
        return name

    def op(
        self,
        op_type: str,
        inputs: list[str],
        hint: str | None = None,
        *,
        output: str | None = None,
        domain: str = "",
        **attrs: Any,
    ) -> str:
        """Adds a node with one output; returns that output's name (`output` names it)."""
        return self.ops(op_type, inputs, hint, outputs=[output] if output else None, domain=domain, **attrs)[0]

    def ops(
        self,
        op_type: str,
        inputs: list[str],
        hint: str | None = None,
        n_out: int = 1,
        *,
        outputs: list[str] | None = None,
        domain: str = "",
        **attrs: Any,
    ) -> list[str]:
        """Adds a node; returns the names of its outputs (`outputs` names them, else `n_out` are made)."""
        outs = outputs or [self.name(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(
            helper.make_node(op_type, inputs, outs, name=self.name(f"n_{op_type}"), domain=domain or None, **attrs)
        )
        return outs


def build_decoder(config: LlamaConfig, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Builds the decoder graph.

    ``weights`` uses Hugging Face names and layouts (``model.layers.{i}.self_attn.q_proj.weight``
    as [out, in], rotate-half RoPE layout), float32.
    """
    g = GraphBuilder()
    c = config
    hd = c.head_dim
    n_rep = c.num_heads // c.num_kv_heads

    shape_i64 = lambda *v: g.const("shape", np.array(v, dtype=np.int64))  # noqa: E731
    eps = g.const("eps", np.array(c.rms_norm_eps, dtype=np.float32))
    two = g.const("two", np.array(2.0, dtype=np.float32))
    scale = g.const("scale", np.array(1.0 / np.sqrt(hd), dtype=np.float32))

    def rms_norm(x: str, weight: np.ndarray, hint: str) -> str:
        w = g.const(f"{hint}_weight", weight.astype(np.float32))
        var = g.op("ReduceMean", [g.op("Pow", [x, two])], axes=[-1], keepdims=1)
        normed = g.op("Div", [x, g.op("Sqrt", [g.op("Add", [var, eps])])])
        return g.op("Mul", [normed, w], hint=hint)

    def linear(x: str, weight: np.ndarray, hint: str) -> str:
        # weight is [out, in]; the graph multiplies by its transpose
        w = g.const(f"{hint}_weight", np.ascontiguousarray(weight.T, dtype=np.float32))
        return g.op("MatMul", [x, w], hint=hint)

    # RoPE tables: cos/sin of position * inv_freq, duplicated for rotate-half, [batch, seq, 1, hd]
    inv_freq = rope_inv_freq(c)
    inv_freq_c = g.const("inv_freq", inv_freq.astype(np.float32).reshape(1, 1, -1))
    pos_f = g.op(
        "Unsqueeze",
        [g.op("Cast", ["position_ids"], to=TensorProto.FLOAT), g.const("ax", np.array([-1], dtype=np.int64))],
    )
    freqs = g.op("Mul", [pos_f, inv_freq_c])
    emb = g.op("Concat", [freqs, freqs], axis=-1)
    ax2 = g.const("ax2", np.array([2], dtype=np.int64))
    cos = g.op("Unsqueeze", [g.op("Cos", [emb]), ax2], hint="rope_cos")
    sin = g.op("Unsqueeze", [g.op("Sin", [emb]), ax2], hint="rope_sin")
    half = hd // 2
    split_sizes = g.const("split", np.array([half, half], dtype=np.int64))

    def rope(x: str) -> str:
        # x: [batch, seq, heads, hd]
        x1, x2 = g.ops("Split", [x, split_sizes], axis=-1, n_out=2)
        rotated = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
        return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])])

    # attention bias [batch, seq, total] -> [batch, 1, 1, seq, total] for (kv_head, rep) broadcast
    bias = g.op("Unsqueeze", ["attention_bias", g.const("ax12", np.array([1, 2], dtype=np.int64))])

    embed = weights["model.embed_tokens.weight"].astype(np.float32)
    embed_c = g.const("embed_tokens", embed)
    h = g.op("Gather", [embed_c, "input_ids"], axis=0, hint="embeddings")

    graph_outputs_kv: list[onnx.ValueInfoProto] = []
    graph_inputs_kv: list[onnx.ValueInfoProto] = []
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        x = rms_norm(h, weights[p + "input_layernorm.weight"], f"l{i}_attn_norm")
        q = linear(x, weights[p + "self_attn.q_proj.weight"], f"l{i}_q")
        k = linear(x, weights[p + "self_attn.k_proj.weight"], f"l{i}_k")
        v = linear(x, weights[p + "self_attn.v_proj.weight"], f"l{i}_v")
        q = rope(g.op("Reshape", [q, shape_i64(0, 0, c.num_heads, hd)]))
        k = rope(g.op("Reshape", [k, shape_i64(0, 0, c.num_kv_heads, hd)]))
        v = g.op("Reshape", [v, shape_i64(0, 0, c.num_kv_heads, hd)])
        # new keys/values as [batch, kv_heads, seq, hd]
        new_k = g.op("Transpose", [k], perm=[0, 2, 1, 3])
        new_v = g.op("Transpose", [v], perm=[0, 2, 1, 3])
        g.nodes.append(helper.make_node("Identity", [new_k], [f"new_key_{i}"]))
        g.nodes.append(helper.make_node("Identity", [new_v], [f"new_value_{i}"]))
        k_all = g.op("Concat", [f"past_key_{i}", new_k], axis=2)
        v_all = g.op("Concat", [f"past_value_{i}", new_v], axis=2)
        # grouped-query attention without repeating K/V: q as [b, kv, rep, s, hd]
        q5 = g.op("Transpose", [g.op("Reshape", [q, shape_i64(0, 0, c.num_kv_heads, n_rep, hd)])], perm=[0, 2, 3, 1, 4])
        k5 = g.op("Unsqueeze", [k_all, ax2])
        v5 = g.op("Unsqueeze", [v_all, ax2])
        scores = g.op("Mul", [g.op("MatMul", [q5, g.op("Transpose", [k5], perm=[0, 1, 2, 4, 3])]), scale])
        probs = g.op("Softmax", [g.op("Add", [scores, bias])], axis=-1)
        ctx = g.op("MatMul", [probs, v5])  # [b, kv, rep, s, hd]
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 3, 1, 2, 4]), shape_i64(0, 0, c.hidden_size)])
        h = g.op("Add", [h, linear(ctx, weights[p + "self_attn.o_proj.weight"], f"l{i}_o")])

        x = rms_norm(h, weights[p + "post_attention_layernorm.weight"], f"l{i}_mlp_norm")
        gate = linear(x, weights[p + "mlp.gate_proj.weight"], f"l{i}_gate")
        up = linear(x, weights[p + "mlp.up_proj.weight"], f"l{i}_up")
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate])])
        h = g.op("Add", [h, linear(g.op("Mul", [act, up]), weights[p + "mlp.down_proj.weight"], f"l{i}_down")])

        for kind in ("key", "value"):
            graph_inputs_kv.append(
                helper.make_tensor_value_info(
                    f"past_{kind}_{i}", TensorProto.FLOAT, ["batch", c.num_kv_heads, "past", hd]
                )
            )
            graph_outputs_kv.append(
                helper.make_tensor_value_info(
                    f"new_{kind}_{i}", TensorProto.FLOAT, ["batch", c.num_kv_heads, "seq", hd]
                )
            )

    h = rms_norm(h, weights["model.norm.weight"], "final_norm")
    # only the requested positions go through the (large) vocabulary projection
    idx = g.op("Unsqueeze", ["logits_indices", g.const("ax_last", np.array([-1], dtype=np.int64))])
    idx = g.op("Expand", [idx, g.op("Concat", [shape_i64(1, 1), shape_i64(c.hidden_size)], axis=0)])
    selected = g.op("GatherElements", [h, idx], axis=1)
    lm_head = weights.get("lm_head.weight", embed)
    g.nodes.append(
        helper.make_node("MatMul", [selected, g.const("lm_head", np.ascontiguousarray(lm_head.T))], ["logits"])
    )

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_bias", TensorProto.FLOAT, ["batch", "seq", "total"]),
        helper.make_tensor_value_info("logits_indices", TensorProto.INT64, ["batch", "n_logits"]),
    ] + graph_inputs_kv
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "n_logits", c.vocab_size])]
    outputs += graph_outputs_kv
    graph = helper.make_graph(g.nodes, "llama_decoder", inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="meshserve")
    model.ir_version = 9
    return model
