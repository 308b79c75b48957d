"""Weights for ONNX Runtime's `com.microsoft.MatMulNBits` (precision int8 of decoder_cpu.onnx).

MatMulNBits computes y = x @ W.T with W stored in blocks of 32 weights along the input dimension,
each dequantized as (code - zero_point) * scale. With `accuracy_level=4` ONNX Runtime also
quantizes x to int8 per row and block (VNNI dot products), and the row's own values alone set
its scale, so a row's result does not depend on the other rows of its batch.

* The tied embedding / lm_head: the GGUF's Q8_0 blocks (w = d * q, q int8) map exactly onto
  8-bit codes q + 128 with the default zero point 128 and scale d.
* The projections: the GGUF's Q4_1 weights (dequantized by gguf) are smoothed, then quantized
  to asymmetric 8-bit blocks (error at most 1/510 of a block's range). Smoothing (SmoothQuant,
  Xiao et al. 2023) moves the range of outlier activation channels into the weights: the input
  channel k of a projection is divided by s_k and the weight column k multiplied by s_k, with
  s_k = max|x_k|^a / max|W[:, k]|^(1-a) from a calibration run (calibration.py). The division
  is folded into the layer that produces the input (the RMSNorm weight for q/k/v and gate/up, v's
  rows for o, up's rows for down), so the graph is unchanged and computes the same function;
  only the int8 activation rounding hurts less. On tests/data/perplexity_text.txt it brings the
  perplexity change from +1.2% to +0.25% of fp32's.

Why not the GGUF's 4-bit blocks: ONNX Runtime's fast MatMulNBits kernels take integer zero points
only, and Q4_1's offset m = -zero_point * d is not a multiple of d. Rounding the zero point costs
about 19% perplexity; exact float zero points make the CPU kernel dequantize the whole matrix on
every call (9 tokens/s). 8 bits carry the Q4_1 weights within 1/32 of their step instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32  # block of weights along the input dimension (Q8_0's block, MatMulNBits' block_size)
SMOOTHING_ALPHA = 0.7  # a: how much of each activation channel's range moves into the weights


@dataclass(frozen=True)
class Q80Blocks:
    """A Q8_0 matrix [rows, cols] as its codes and per-block scales."""

    codes: np.ndarray  # int8 [rows, blocks, 32]
    d: np.ndarray  # float32 [rows, blocks]

    def dequantize(self) -> np.ndarray:
        return (self.codes.astype(np.float32) * self.d[..., None]).reshape(self.codes.shape[0], -1)


@dataclass(frozen=True)
class NBitsWeight:
    """One 8-bit MatMulNBits right-hand side: y = x @ W.T with W [n, k] stored as blocks along k."""

    n: int
    k: int
    codes: np.ndarray  # uint8 [n, k / 32, 32]
    scales: np.ndarray  # float32 [n, k / 32]
    zero_points: np.ndarray | None  # uint8 [n, k / 32]; None: the default 128

    bits = 8
    block_size = BLOCK

    def dequantize(self) -> np.ndarray:
        """W [n, k] as float32, as MatMulNBits computes it (for tests)."""
        zp = np.float32(128) if self.zero_points is None else self.zero_points[..., None].astype(np.float32)
        return ((self.codes.astype(np.float32) - zp) * self.scales[..., None]).reshape(self.n, self.k)


def parse_q8_0(raw: np.ndarray, rows: int, cols: int) -> Q80Blocks:
    """Splits GGUF Q8_0 bytes (one row of `cols` weights per row) into int8 codes and the f16 scale d."""
    blocks = np.asarray(raw, np.uint8).reshape(rows, cols // BLOCK, 34)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    codes = blocks[..., 2:].copy().view(np.int8)
    return Q80Blocks(codes, d)


def q8_0_to_nbits(blocks: Q80Blocks) -> NBitsWeight:
    """Exact: 8-bit codes q + 128 with the default zero point 128 and scale d."""
    rows, nblocks, _ = blocks.codes.shape
    codes = (blocks.codes.astype(np.int16) + 128).astype(np.uint8)
    return NBitsWeight(rows, nblocks * BLOCK, codes, blocks.d.astype(np.float32), None)


def quantize_8bit(weight: np.ndarray) -> NBitsWeight:
    """Asymmetric 8-bit blocks of 32 along the input dimension of a float weight [n, k]; each block
    spans [min(w, 0), max(w, 0)] so that zero is exact."""
    n, k = weight.shape
    blocks = weight.reshape(n, k // BLOCK, BLOCK).astype(np.float64)
    low, high = np.minimum(blocks.min(-1), 0.0), np.maximum(blocks.max(-1), 0.0)
    scale = (high - low) / 255.0
    scale = np.where(scale == 0, 1.0, scale)
    zero_point = np.clip(np.rint(-low / scale), 0, 255)
    codes = np.clip(np.rint(blocks / scale[..., None] + zero_point[..., None]), 0, 255).astype(np.uint8)
    return NBitsWeight(n, k, codes, scale.astype(np.float32), zero_point.astype(np.uint8))


def smoothing_factors(activation_max: np.ndarray, weight: np.ndarray, alpha: float = SMOOTHING_ALPHA) -> np.ndarray:
    """s_k = max|x_k|^a / max|W[:, k]|^(1-a), normalized to a geometric mean of 1."""
    s = np.maximum(activation_max, 1e-5) ** alpha / np.maximum(np.abs(weight).max(0), 1e-5) ** (1 - alpha)
    return (s / np.exp(np.log(s).mean())).astype(np.float32)


def smooth_and_quantize(config, weights, activation_max: dict[tuple[str, int], np.ndarray], embed: Q80Blocks,
                        alpha: float = SMOOTHING_ALPHA):
    """The int8 CpuDecoderWeights: float weights (CpuDecoderWeights.from_fp32) smoothed with the
    calibration's per-channel input maxima `activation_max[(kind, layer)]` (kinds qkv, o, gate_up,
    down), their projections quantized to 8 bits; the embedding and lm_head are `embed`'s Q8_0 blocks."""
    from dataclasses import replace

    hd, group, inter = config.head_dim, config.num_heads // config.num_kv_heads, config.intermediate_size
    v_rows = slice((config.num_heads + config.num_kv_heads) * hd, None)
    out = replace(weights, embed=embed, input_norms=list(weights.input_norms), post_norms=list(weights.post_norms),
                  qkv=[], o=[], gate_up=[], down=[])
    for i in range(config.num_layers):
        qkv, o = weights.qkv[i].copy(), weights.o[i].copy()
        gate_up, down = weights.gate_up[i].copy(), weights.down[i].copy()
        # 1. q/k/v and gate/up read RMSNorm outputs: fold 1/s into the norm's weight
        s = smoothing_factors(activation_max[("qkv", i)], qkv, alpha)
        out.input_norms[i] = out.input_norms[i] / s
        qkv *= s
        s = smoothing_factors(activation_max[("gate_up", i)], gate_up, alpha)
        out.post_norms[i] = out.post_norms[i] / s
        gate_up *= s
        # 2. o reads attention outputs, mixtures of v: fold 1/s into v's rows. A kv head serves
        #    `group` query heads, so their channels share one factor.
        s = smoothing_factors(activation_max[("o", i)], o, alpha).reshape(config.num_kv_heads, group, hd)
        s = np.exp(np.log(s).mean(1))
        qkv[v_rows] /= s.reshape(-1, 1)
        o *= np.repeat(s[:, None, :], group, axis=1).reshape(1, -1)
        # 3. down reads silu(gate) * up: fold 1/s into up's rows
        s = smoothing_factors(activation_max[("down", i)], down, alpha)
        gate_up[inter:] /= s[:, None]
        down *= s
        out.qkv.append(quantize_8bit(qkv))
        out.o.append(quantize_8bit(o))
        out.gate_up.append(quantize_8bit(gate_up))
        out.down.append(quantize_8bit(down))
    return out


def gguf_embedding_blocks(reader) -> Q80Blocks:
    """The GGUF's tied embedding (and lm_head) as Q8_0 blocks."""
    from gguf import GGMLQuantizationType

    tensors = {t.name: t for t in reader.tensors}
    if "output.weight" in tensors:
        raise ValueError("the GGUF has an untied output.weight; only a tied lm_head is supported")
    embd = tensors["token_embd.weight"]
    if embd.tensor_type != GGMLQuantizationType.Q8_0:
        raise ValueError(f"token_embd.weight: expected Q8_0, got {embd.tensor_type.name}")
    return parse_q8_0(embd.data, int(embd.shape[1]), int(embd.shape[0]))
