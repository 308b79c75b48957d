"""Weights for ONNX Runtime's `com.microsoft.MatMulNBits` (precisions int8 and int4 of decoder_cpu.onnx)
and its int8 x int8 GEMM `MatMulIntegerToFloat` (precision w8a8). The layouts below were chosen by
measurement: the perplexities and step rates of each alternative are in docs/benchmarks.md ("Weight
layouts"), with their dates.

MatMulNBits computes y = x @ W.T with W stored in blocks of weights along the input dimension,
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
  only the int8 activation rounding hurts less.
  Block sizes: ONNX Runtime quantizes each row of x to int8 per block too, and every block costs
  a scaling of its int32 dot product, so larger blocks are cheaper; but coarser activation blocks
  before both MLP projections tip near ties (the greedy answer to "What is the capital of France?"
  stops saying Paris with gate/up and down both at 64 or above, though perplexity hardly moves).
  Hence blocks of 64 for q/k/v, o and gate/up, 32 for down.

Why not the GGUF's 4-bit blocks: ONNX Runtime's fast MatMulNBits kernels take integer zero points
only, and Q4_1's offset m = -zero_point * d is not a multiple of d. Rounding the zero point costs
much perplexity; exact float zero points make the CPU kernel dequantize the whole matrix on every
call. 8 bits carry the Q4_1 weights within 1/32 of their step instead.

int4, the lighter variant (the router's fallback tier: cheaper, and allowed to cost quality). The
smoothed float projections are requantized to asymmetric 4-bit blocks of 128 with integer zero
points (a block's zero point and scale chosen by a search minimizing its squared error), by GPTQ
(Frantar et al. 2022): each column's rounding error is compensated in the columns not yet
quantized, using the calibration inputs' X^T X, which minimizes the error of the projection's
outputs rather than of its weights. The embedding / lm_head stay the Q8_0 blocks (4-bit ones lose
the Paris answer). At one row decoding reads the weights, so halving them pays at any block size; at
32 rows the int8 dot products are the work and each block's scaling is their overhead, so only blocks
larger than int8's 32 are cheaper there. GPTQ needs many more calibration tokens than the int8 text's
~300 (with those it fits the text and is worse than no compensation): the calibration set is that
text and the float model's own sampled answers to a few prompts (calibration.py). Its damping (0.3 of
the Hessian's mean diagonal) and a lighter smoothing (a = 0.4) were chosen on the perplexity text, so
its perplexity there is somewhat optimistic for other text.

w8a8, int8 weights and int8 activations: MatMulNBits runs its int8 dot products block by block and
spends more of a many-row step scaling blocks than multiplying; ONNX Runtime's u8 x s8 GEMM (MLAS, the
kernel behind MatMulIntegerToFloat, VNNI here) multiplies whole rows. It takes one scale per
activation tensor, so the graph quantizes each row itself (meshserve.ops RowQuantize: symmetric int8,
one scale a token) and multiplies the GEMM's output by that row's scale: every row is exact integer
arithmetic on its own values, so a row's result does not depend on its batch. The weights are
symmetric int8 per output channel, except where per-channel int8 lost too much: down's input
(silu(gate) * up) carries the MLP's outlier channels. An orthonormal block-diagonal Hadamard rotation
H (QuaRot, Ashkboos et al. 2024), x W^T = (x H)(W H)^T, spreads each outlier over its block of 64; W H
is folded into the weights offline, x H is computed by RowQuantize before it quantizes (a fast
Walsh-Hadamard transform, no matmul), for down's and the lm_head's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

BLOCK = 32  # block of weights along the input dimension (Q8_0's block, MatMulNBits' block_size)
SMOOTHING_ALPHA = 0.7  # a: how much of each activation channel's range moves into the weights
# int8 blocks by projection (see the module docstring): 64 where the input is the hidden state
# (576 = 9 x 64), 32 for down, whose input holds the MLP's outlier channels
INT8_BLOCKS = {"qkv": 64, "o": 64, "gate_up": 64, "down": BLOCK}
# int4 (measured on tests/data/perplexity_text.txt, see the module docstring)
INT4_BLOCK = 128  # blocks of 32 or 64 are no cheaper than int8 at 32 streams
INT4_SMOOTHING_ALPHA = 0.4
GPTQ_DAMPING = 0.3  # fraction of the Hessian's mean diagonal added to its diagonal
# w8a8 (see the module docstring): a lighter smoothing, and Hadamard blocks before down and the lm_head
W8A8_SMOOTHING_ALPHA = 0.5
W8A8_HADAMARD_BLOCK = 64


@dataclass(frozen=True)
class Q80Blocks:
    """A Q8_0 matrix [rows, cols] as its codes and per-block scales."""

    codes: np.ndarray  # int8 [rows, blocks, 32]
    d: np.ndarray  # float32 [rows, blocks]

    def dequantize(self) -> np.ndarray:
        return (self.codes.astype(np.float32) * self.d[..., None]).reshape(self.codes.shape[0], -1)


@dataclass(frozen=True)
class NBitsWeight:
    """One MatMulNBits right-hand side: y = x @ W.T with W [n, k] stored as blocks along k, each
    weight dequantized as (code - zero_point) * scale of its block."""

    n: int
    k: int
    codes: np.ndarray  # uint8 [n, k / block_size, block_size], one code per weight (unpacked)
    scales: np.ndarray  # float32 [n, k / block_size]
    zero_points: np.ndarray | None  # uint8 [n, k / block_size]; None: the default 2^(bits - 1)
    bits: int = 8
    block_size: int = BLOCK

    def dequantize(self) -> np.ndarray:
        """W [n, k] as float32, as MatMulNBits computes it (for tests)."""
        default = np.float32(1 << (self.bits - 1))
        zp = default if self.zero_points is None else self.zero_points[..., None].astype(np.float32)
        w = (self.codes.astype(np.float32) - zp) * self.scales[..., None]
        return w.reshape(self.n, -1)[:, : self.k]  # the last block may be padded past k

    def packed_codes(self) -> np.ndarray:
        """MatMulNBits' B: uint8 [n, blocks, block_size * bits / 8]; 4-bit codes two to a byte,
        the even element in the low nibble."""
        if self.bits == 8:
            return self.codes
        return _pack_nibbles(self.codes)

    def packed_zero_points(self) -> np.ndarray | None:
        """MatMulNBits' zero_points: uint8 [n, ceil(blocks * bits / 8)], 4-bit ones two to a byte
        (low nibble first, each row padded to whole bytes); None when they are the default."""
        if self.zero_points is None or self.bits == 8:
            return self.zero_points
        zp = self.zero_points
        if zp.shape[1] % 2:
            zp = np.concatenate([zp, np.zeros((zp.shape[0], 1), np.uint8)], axis=1)
        return _pack_nibbles(zp)


@dataclass(frozen=True)
class RowwiseInt8Weight:
    """One projection for int8 x int8 GEMMs (ONNX Runtime's `MatMulIntegerToFloat`): y = x @ W.T
    with W [n, k] as symmetric int8 codes and one scale per output channel, w = code * scale. The
    activations are quantized per row (per token) at run time, so each row's result is exact integer
    arithmetic on its own values alone: independent of its batch neighbours."""

    n: int
    k: int
    codes: np.ndarray  # int8 [k, n]: MatMulIntegerToFloat's B, input dimension first
    scales: np.ndarray  # float32 [n]
    # > 0: x is rotated by a block-diagonal Hadamard matrix of this size before quantization (and W
    # with it, offline): the rotation spreads outlier channels over their block
    hadamard_block: int = 0

    def dequantize(self) -> np.ndarray:
        """W [n, k] as float32 (for tests)."""
        return (self.codes.astype(np.float32) * self.scales[None, :]).T


def hadamard(size: int) -> np.ndarray:
    """The orthonormal Sylvester-Hadamard matrix of a power-of-two size (symmetric, its own inverse)."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"a Hadamard block must be a power of two, got {size}")
    h = np.ones((1, 1))
    while h.shape[0] < size:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(size)).astype(np.float32)


def rotate_blocks(x: np.ndarray, block: int) -> np.ndarray:
    """x [..., k] times the block-diagonal Hadamard matrix of blocks of `block` (k a multiple of it)."""
    shape = x.shape
    return (x.reshape(*shape[:-1], shape[-1] // block, block) @ hadamard(block).astype(x.dtype)).reshape(shape)


def quantize_rowwise_int8(weight: np.ndarray, hadamard_block: int = 0) -> RowwiseInt8Weight:
    """Symmetric int8 per output channel of a float weight [n, k]: codes in [-127, 127]."""
    if hadamard_block:
        inner = quantize_rowwise_int8(rotate_blocks(weight, hadamard_block))
        return replace(inner, hadamard_block=hadamard_block)
    n, k = weight.shape
    scale = np.abs(weight).max(1).astype(np.float64) / 127.0
    scale = np.where(scale == 0, 1.0, scale)
    codes = np.clip(np.rint(weight / scale[:, None]), -127, 127).astype(np.int8)
    return RowwiseInt8Weight(n, k, np.ascontiguousarray(codes.T), scale.astype(np.float32))


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Pairs of 4-bit values along the last axis into bytes, the first in the low nibble."""
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


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


def quantize_8bit(weight: np.ndarray, block_size: int = BLOCK) -> NBitsWeight:
    """Asymmetric 8-bit blocks of `block_size` along the input dimension of a float weight [n, k]
    (k a multiple of it); each block spans [min(w, 0), max(w, 0)] so that zero is exact."""
    n, k = weight.shape
    if k % block_size:
        raise ValueError(f"8-bit blocks of {block_size} do not divide the input dimension {k}")
    blocks = weight.reshape(n, k // block_size, block_size).astype(np.float64)
    low, high = np.minimum(blocks.min(-1), 0.0), np.maximum(blocks.max(-1), 0.0)
    scale = (high - low) / 255.0
    scale = np.where(scale == 0, 1.0, scale)
    zero_point = np.clip(np.rint(-low / scale), 0, 255)
    codes = np.clip(np.rint(blocks / scale[..., None] + zero_point[..., None]), 0, 255).astype(np.uint8)
    return NBitsWeight(n, k, codes, scale.astype(np.float32), zero_point.astype(np.uint8), block_size=block_size)


def quantize_4bit(
    weight: np.ndarray, block_size: int = BLOCK, symmetric: bool = False, importance: np.ndarray | None = None
) -> NBitsWeight:
    """4-bit blocks of `block_size` along the input dimension of a float weight [n, k], each block's
    integer zero point and scale chosen to minimize its squared error, weighted per input channel
    by `importance` [k] when given (for example the mean square of the activations).

    Asymmetric blocks search scales (max - min) / 15 * r over a grid of r with the zero points
    just below and above -min / scale, and plain rounding over [min(w, 0), max(w, 0)] (so no block
    is worse than that); symmetric ones keep the default zero point 8 (no zero-point tensor) and
    search scales from the block's extreme value mapped to code 0 or 15.
    For each candidate the codes are rounded, the scale refitted by least squares for those
    codes, the codes rounded again and the scale refitted again; the best candidate wins."""
    n, k = weight.shape
    blocks = -(-k // block_size)
    pad = blocks * block_size - k
    # MatMulNBits pads the last block past k; padding with the edge value leaves the block's range
    # alone, and a zero importance leaves its error alone
    w = np.pad(np.asarray(weight, np.float32), ((0, 0), (0, pad)), mode="edge").reshape(n * blocks, block_size)
    if pad or importance is not None:
        channel = np.ones(k, np.float32) if importance is None else np.asarray(importance, np.float32)
        imp = np.tile(np.pad(channel, (0, pad)).reshape(blocks, block_size), (n, 1))
    else:
        imp = None
    low, high = w.min(-1), w.max(-1)
    eight = np.full(len(w), 8, np.float32)
    if symmetric:
        extreme = np.where(-low > high, low, high)  # the signed value of largest magnitude
        bases = [extreme / np.float32(-8), extreme / np.float32(7)]  # maps it to code 0 (-8) or 15 (+7)
        candidates = [(base * r, eight) for base in bases for r in _SCALE_GRID]
    else:
        span = high - low
        candidates = []
        for r in _SCALE_GRID:
            scale = _nonzero(span / np.float32(15) * r)
            candidates += [(scale, np.clip(rounding(-low / scale), 0, 15)) for rounding in (np.floor, np.ceil)]
        # plain rounding over [min(w, 0), max(w, 0)], so that no block ends up worse than that
        scale = _nonzero((np.maximum(high, 0) - np.minimum(low, 0)) / np.float32(15))
        candidates.append((scale, np.clip(np.rint(-np.minimum(low, 0) / scale), 0, 15)))

    weighted_w = w if imp is None else w * imp
    total = np.einsum("ij,ij->i", weighted_w, w)  # sum of imp * w^2
    q = np.empty_like(w)
    best_error = np.full(len(w), np.inf, np.float32)
    best_scale, best_zero = np.ones(len(w), np.float32), np.full(len(w), 8, np.float32)
    for scale, zero in candidates:
        scale = _nonzero(scale)
        for _ in range(2):
            _codes_minus_zero(w, scale, zero, out=q)
            num = np.einsum("ij,ij->i", weighted_w, q)  # sum of imp * w * q
            den = np.einsum("ij,ij->i", q if imp is None else q * imp, q)  # sum of imp * q^2
            # least-squares scale for these codes; its error is total - num^2 / den
            fitted = den > 0
            scale = _nonzero(np.where(fitted & (num != 0), num / np.where(fitted, den, 1), scale))
        error = total - np.where(fitted, num * num / np.where(fitted, den, 1), 0)
        better = error < best_error
        best_error[better], best_scale[better], best_zero[better] = error[better], scale[better], zero[better]
    # rounding at the chosen scale is the nearest code of every weight: no worse than the candidate's
    codes = (_codes_minus_zero(w, best_scale, best_zero, out=q) + best_zero[:, None]).astype(np.uint8)
    zero_points = None if symmetric else best_zero.astype(np.uint8).reshape(n, blocks)
    return NBitsWeight(
        n,
        k,
        codes.reshape(n, blocks, block_size),
        best_scale.reshape(n, blocks),
        zero_points,
        bits=4,
        block_size=block_size,
    )


def _nonzero(scale: np.ndarray) -> np.ndarray:
    """float32 scales with 0 (an all-zero block) replaced by 1."""
    return np.where(scale == 0, 1, scale).astype(np.float32)


def _codes_minus_zero(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, out: np.ndarray) -> np.ndarray:
    """clip(rint(w / scale + zero), 0, 15) - zero, row by row, into `out`."""
    np.divide(w, scale[:, None], out=out)
    out += zero[:, None]
    np.rint(out, out=out)
    np.clip(out, 0, 15, out=out)
    out -= zero[:, None]
    return out


def gptq_4bit(
    weight: np.ndarray, hessian: np.ndarray, block_size: int = BLOCK, damping: float = GPTQ_DAMPING
) -> NBitsWeight:
    """4-bit blocks of a float weight [n, k] by GPTQ (Frantar et al. 2022): the columns are quantized
    in order, and each one's rounding error is compensated in the columns not yet quantized, as the
    calibration inputs' `hessian` H = X^T X [k, k] says they can absorb it. That minimizes the
    error of the outputs x @ W.T over the calibration inputs rather than of the weights. Each
    block's zero point and scale are chosen (quantize_4bit, weighted by diag(H)) on the weights as
    compensated when the block is reached. `damping` (a fraction of diag(H)'s mean added to the
    diagonal) keeps H invertible and the compensation modest: the calibration text is short."""
    n, k = weight.shape
    blocks = -(-k // block_size)
    w = weight.astype(np.float64)  # updated in place as errors are compensated
    h = hessian.astype(np.float64)
    dead = np.diag(h) == 0  # channels the calibration never excited: nothing to compensate with
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(k)] += damping * np.diag(h).mean()
    # upper Cholesky factor U of H^-1 (H^-1 = U^T U): row j drives column j's compensation
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    importance = np.diag(h).astype(np.float32)
    codes = np.zeros((n, blocks * block_size), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zero_points = np.zeros((n, blocks), np.uint8)
    for b in range(blocks):
        c0, c1 = b * block_size, min((b + 1) * block_size, k)
        params = quantize_4bit(w[:, c0:c1].astype(np.float32), block_size, importance=importance[c0:c1])
        assert params.zero_points is not None  # 4-bit blocks are asymmetric
        s, z = params.scales[:, 0].astype(np.float64), params.zero_points[:, 0].astype(np.float64)
        errors = np.empty((n, c1 - c0))
        for j in range(c0, c1):
            q = np.clip(np.rint(w[:, j] / s + z), 0, 15)
            codes[:, j] = q
            errors[:, j - c0] = (w[:, j] - (q - z) * s) / u[j, j]
            w[:, j:c1] -= np.outer(errors[:, j - c0], u[j, j:c1])
        w[:, c1:] -= errors @ u[c0:c1, c1:]
        codes[:, c1 : (b + 1) * block_size] = params.zero_points[:, :1]  # padding past k dequantizes to 0
        scales[:, b], zero_points[:, b] = params.scales[:, 0], params.zero_points[:, 0]
    return NBitsWeight(n, k, codes.reshape(n, blocks, block_size), scales, zero_points, bits=4, block_size=block_size)


_SCALE_GRID = np.linspace(
    0.7, 1.15, 19, dtype=np.float32
)  # r: from clipping the block's extremes to widening its range


def smoothing_factors(activation_max: np.ndarray, weight: np.ndarray, alpha: float = SMOOTHING_ALPHA) -> np.ndarray:
    """s_k = max|x_k|^a / max|W[:, k]|^(1-a), normalized to a geometric mean of 1."""
    s = np.maximum(activation_max, 1e-5) ** alpha / np.maximum(np.abs(weight).max(0), 1e-5) ** (1 - alpha)
    return (s / np.exp(np.log(s).mean())).astype(np.float32)


def smooth(
    config,
    weights,
    activation_max: dict[tuple[str, int], np.ndarray],
    alpha: float = SMOOTHING_ALPHA,
    factors: dict[tuple[str, int], np.ndarray] | None = None,
):
    """Float weights (CpuDecoderWeights.from_fp32) smoothed with the calibration's per-channel input
    maxima `activation_max[(kind, layer)]` (kinds qkv, o, gate_up, down): the same function, with the
    range of outlier activation channels moved into the weights. `factors`, when given, receives
    each projection's s: its smoothed input is x / s."""
    factors = {} if factors is None else factors
    from dataclasses import replace

    hd, group, inter = config.head_dim, config.num_heads // config.num_kv_heads, config.intermediate_size
    v_rows = slice((config.num_heads + config.num_kv_heads) * hd, None)
    out = replace(
        weights,
        input_norms=list(weights.input_norms),
        post_norms=list(weights.post_norms),
        qkv=[],
        o=[],
        gate_up=[],
        down=[],
    )
    for i in range(config.num_layers):
        qkv, o = weights.qkv[i].copy(), weights.o[i].copy()
        gate_up, down = weights.gate_up[i].copy(), weights.down[i].copy()
        # 1. q/k/v and gate/up read RMSNorm outputs: fold 1/s into the norm's weight
        s = factors[("qkv", i)] = smoothing_factors(activation_max[("qkv", i)], qkv, alpha)
        out.input_norms[i] = out.input_norms[i] / s
        qkv *= s
        s = factors[("gate_up", i)] = smoothing_factors(activation_max[("gate_up", i)], gate_up, alpha)
        out.post_norms[i] = out.post_norms[i] / s
        gate_up *= s
        # 2. o reads attention outputs, mixtures of v: fold 1/s into v's rows. A kv head serves
        #    `group` query heads, so their channels share one factor.
        s = smoothing_factors(activation_max[("o", i)], o, alpha).reshape(config.num_kv_heads, group, hd)
        s = np.exp(np.log(s).mean(1))
        qkv[v_rows] /= s.reshape(-1, 1)
        factors[("o", i)] = np.repeat(s[:, None, :], group, axis=1).reshape(-1)
        o *= factors[("o", i)]
        # 3. down reads silu(gate) * up: fold 1/s into up's rows
        s = factors[("down", i)] = smoothing_factors(activation_max[("down", i)], down, alpha)
        gate_up[inter:] /= s[:, None]
        down *= s
        out.qkv.append(qkv)
        out.o.append(o)
        out.gate_up.append(gate_up)
        out.down.append(down)
    return out


def smooth_and_quantize(
    config, weights, activation_max: dict[tuple[str, int], np.ndarray], embed: Q80Blocks, alpha: float = SMOOTHING_ALPHA
):
    """The int8 CpuDecoderWeights: float weights (CpuDecoderWeights.from_fp32) smoothed (see `smooth`),
    their projections quantized to 8-bit blocks; the embedding and lm_head are `embed` (the GGUF's Q8_0
    blocks, or NBitsWeight blocks)."""
    from dataclasses import replace

    smoothed = smooth(config, weights, activation_max, alpha)
    return replace(
        smoothed,
        embed=embed,
        **{kind: [quantize_8bit(w, INT8_BLOCKS[kind]) for w in getattr(smoothed, kind)] for kind in INT8_BLOCKS},
    )


def smooth_and_quantize_rowwise(
    config,
    weights,
    activation_max: dict[tuple[str, int], np.ndarray],
    embed: Q80Blocks,
    alpha: float = W8A8_SMOOTHING_ALPHA,
    hadamard_block: int = W8A8_HADAMARD_BLOCK,
):
    """The w8a8 CpuDecoderWeights: float weights smoothed (see `smooth`), every projection quantized to
    int8 per output channel (`quantize_rowwise_int8`), down's and the lm_head's with their inputs rotated
    by Hadamard blocks; the embedding is `embed` (the GGUF's Q8_0 blocks), the tied lm_head those
    weights dequantized, rotated and requantized."""
    smoothed = smooth(config, weights, activation_max, alpha)
    rotated = {"down": hadamard_block}
    return replace(
        smoothed,
        embed=embed,
        lm_head=quantize_rowwise_int8(embed.dequantize(), hadamard_block),
        **{
            kind: [quantize_rowwise_int8(w, rotated.get(kind, 0)) for w in getattr(smoothed, kind)]
            for kind in INT8_BLOCKS
        },
    )


def smooth_and_gptq(
    config,
    weights,
    activations: dict[tuple[str, int], np.ndarray],
    embed: Q80Blocks,
    alpha: float = INT4_SMOOTHING_ALPHA,
    block_size: int = INT4_BLOCK,
    damping: float = GPTQ_DAMPING,
):
    """The int4 CpuDecoderWeights: float weights (CpuDecoderWeights.from_fp32) smoothed with the
    maxima of the calibration's projection inputs `activations[(kind, layer)]` [tokens, channels],
    their projections quantized to 4-bit blocks by GPTQ against those inputs (as smoothed: x / s);
    the embedding and lm_head stay `embed`'s Q8_0 blocks."""
    from dataclasses import replace

    factors: dict[tuple[str, int], np.ndarray] = {}
    maxima = {key: np.abs(x).max(0) for key, x in activations.items()}
    smoothed = smooth(config, weights, maxima, alpha, factors)

    def quantize(kind: str, layer: int, weight: np.ndarray) -> NBitsWeight:
        x = activations[(kind, layer)].astype(np.float64) / factors[(kind, layer)]
        return gptq_4bit(weight, x.T @ x, block_size, damping)

    return replace(
        smoothed,
        embed=embed,
        qkv=[quantize("qkv", i, w) for i, w in enumerate(smoothed.qkv)],
        o=[quantize("o", i, w) for i, w in enumerate(smoothed.o)],
        gate_up=[quantize("gate_up", i, w) for i, w in enumerate(smoothed.gate_up)],
        down=[quantize("down", i, w) for i, w in enumerate(smoothed.down)],
    )


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
