"""meshserve.ops PackedAttention (services/inference/backends/ort_ops): causal grouped-query attention with
rotary embedding over packed segments of different lengths, against a float64 NumPy reference over the same
cache, in both cache types (float16, what the quantized precisions serve, and float32, fp32's); a query's output
does not depend on the other segments of its step; the step's keys and values land in the bound cache, a float16
one rounding them to nearest even and saturating at its largest finite value; bad shapes and segments are errors
of the call, never a crash."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from services.inference.backends import ort_ops

HEADS, KV_HEADS, DIM, SLOTS, CAPACITY, POSITIONS = 6, 2, 64, 4, 64, 80
BLOCK = 16


CACHE_TYPES = {np.float16: TensorProto.FLOAT16, np.float32: TensorProto.FLOAT}


def _session(cache_dtype) -> ort.InferenceSession:
    names = ["qkv", "seg_slots", "seg_cached", "seg_lengths", "cos", "sin", "past_key", "past_value"]
    node = helper.make_node(
        "PackedAttention",
        names,
        ["attn", "present_key", "present_value"],
        domain=ort_ops.DOMAIN,
        num_heads=HEADS,
        kv_num_heads=KV_HEADS,
    )
    f, cache, i64 = TensorProto.FLOAT, CACHE_TYPES[cache_dtype], TensorProto.INT64
    inputs = [helper.make_tensor_value_info("qkv", f, ["tokens", (HEADS + 2 * KV_HEADS) * DIM])]
    inputs += [helper.make_tensor_value_info(n, i64, ["segments"]) for n in names[1:4]]
    inputs += [helper.make_tensor_value_info(n, f, [POSITIONS, DIM // 2]) for n in ("cos", "sin")]
    inputs += [helper.make_tensor_value_info(n, cache, None) for n in ("past_key", "past_value")]
    outputs = [helper.make_tensor_value_info("attn", f, None)]
    outputs += [helper.make_tensor_value_info(n, cache, None) for n in ("present_key", "present_value")]
    model = helper.make_model(
        helper.make_graph([node], "packed_attention", inputs, outputs),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ort_ops.DOMAIN, 1)],
    )
    model.ir_version = 9
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(ort_ops.library_path()))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=list(CACHE_TYPES), ids=lambda t: t.__name__)
def cache_dtype(request):
    return request.param


@pytest.fixture(scope="module")
def session(cache_dtype):
    return _session(cache_dtype)


def _tables():
    angles = np.arange(POSITIONS)[:, None] * (10000.0 ** (-np.arange(0, DIM, 2) / DIM))[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _rope(x, position, cos, sin):
    half = DIM // 2
    a, b = x[..., :half], x[..., half:]
    c, s = cos[position].astype(np.float64), sin[position].astype(np.float64)
    return np.concatenate([a * c - b * s, b * c + a * s], -1)


def blocked(keys: np.ndarray) -> np.ndarray:
    """keys [N, G, C, D] in the operator's layout [N, G, C / 16, D, 16]."""
    n, g, c, d = keys.shape
    return np.ascontiguousarray(keys.reshape(n, g, c // BLOCK, BLOCK, d).transpose(0, 1, 2, 4, 3))


def unblocked(keys: np.ndarray) -> np.ndarray:
    n, g, b, d, _ = keys.shape
    return keys.transpose(0, 1, 2, 4, 3).reshape(n, g, b * BLOCK, d)


def _reference(qkv, segments, keys, values, cos, sin, cache_dtype):
    """float64 attention of every token over the cache; keys/values [N, G, C, D] (keys after RoPE), updated
    in place with the step's keys and values rounded to the cache's type (float16: nearest even)."""

    def stored(x):
        return np.asarray(x).astype(cache_dtype).astype(np.float64)

    group = HEADS // KV_HEADS
    out = np.zeros((len(qkv), HEADS * DIM))
    token = 0
    for slot, cached, length in segments:
        for j in range(length):
            row = qkv[token + j].astype(np.float64)
            for g in range(KV_HEADS):
                k = row[(HEADS + g) * DIM : (HEADS + g + 1) * DIM]
                keys[slot, g, cached + j] = stored(_rope(k, cached + j, cos, sin))
                v = row[(HEADS + KV_HEADS + g) * DIM : (HEADS + KV_HEADS + g + 1) * DIM]
                values[slot, g, cached + j] = stored(v)
        for j in range(length):
            position = cached + j
            row = qkv[token + j].astype(np.float64)
            for h in range(HEADS):
                g = h // group
                q = _rope(row[h * DIM : (h + 1) * DIM], position, cos, sin)
                scores = keys[slot, g, : position + 1] @ q / np.sqrt(DIM)
                p = np.exp(scores - scores.max())
                out[token + j, h * DIM : (h + 1) * DIM] = p @ values[slot, g, : position + 1] / p.sum()
        token += length
    return out


def _run(session, qkv, segments, keys, values):
    cos, sin = _tables()
    slots, cached, lengths = (np.array(c, np.int64) for c in zip(*segments))
    return session.run(
        None,
        {
            "qkv": qkv,
            "seg_slots": slots,
            "seg_cached": cached,
            "seg_lengths": lengths,
            "cos": cos,
            "sin": sin,
            "past_key": blocked(keys),
            "past_value": values,
        },
    )


def _cache(rng, cache_dtype):
    keys = rng.standard_normal((SLOTS, KV_HEADS, CAPACITY, DIM)).astype(cache_dtype)
    values = rng.standard_normal((SLOTS, KV_HEADS, CAPACITY, DIM)).astype(cache_dtype)
    return keys, values


# decode rows (one token) and prefill chunks, in any slots, across key-block boundaries
SEGMENTS = [(2, 37, 1), (0, 0, 20), (3, 15, 1), (1, 30, 17), (0, 20, 1)]


def test_packed_segments_match_the_reference(session, cache_dtype):
    rng = np.random.default_rng(0)
    keys, values = _cache(rng, cache_dtype)
    # segment (0, 20, 1) continues slot 0 right after (0, 0, 20): only in a later step
    segments = SEGMENTS[:4]
    tokens = sum(n for *_, n in segments)
    qkv = rng.standard_normal((tokens, (HEADS + 2 * KV_HEADS) * DIM)).astype(np.float32)
    want_keys, want_values = keys.astype(np.float64), values.astype(np.float64)
    want = _reference(qkv, segments, want_keys, want_values, *_tables(), cache_dtype)
    attn, present_key, present_value = _run(session, qkv, segments, keys, values)
    assert attn.shape == (tokens, HEADS * DIM)
    np.testing.assert_allclose(attn, want, atol=2e-5)
    np.testing.assert_allclose(unblocked(present_key), want_keys, atol=2e-5)
    np.testing.assert_allclose(present_value, want_values, atol=0)
    # untouched positions keep what the cache held
    np.testing.assert_array_equal(unblocked(present_key)[2, :, 38:], keys[2, :, 38:])


def test_a_query_does_not_depend_on_the_other_segments_of_its_step(session, cache_dtype):
    rng = np.random.default_rng(1)
    keys, values = _cache(rng, cache_dtype)
    width = (HEADS + 2 * KV_HEADS) * DIM
    decode = rng.standard_normal((1, width)).astype(np.float32)
    chunk = rng.standard_normal((20, width)).astype(np.float32)
    alone = _run(session, decode, [(2, 37, 1)], keys, values)[0]
    mixed = _run(session, np.concatenate([chunk, decode]), [(0, 0, 20), (2, 37, 1)], keys, values)[0]
    chunk_alone = _run(session, chunk, [(0, 0, 20)], keys, values)[0]
    np.testing.assert_array_equal(mixed[20:], alone)  # bit for bit
    np.testing.assert_array_equal(mixed[:20], chunk_alone)
    # and a chunk split in two steps gives what one step gives
    keys_first = unblocked(_run(session, chunk[:9], [(0, 0, 9)], keys, values)[1])
    values_first = _run(session, chunk[:9], [(0, 0, 9)], keys, values)[2]
    rest = _run(session, chunk[9:], [(0, 9, 11)], keys_first, values_first)[0]
    np.testing.assert_array_equal(rest, chunk_alone[9:])


def test_a_half_cache_rounds_to_nearest_even_and_saturates_instead_of_overflowing(session, cache_dtype):
    rng = np.random.default_rng(4)
    keys, values = _cache(rng, cache_dtype)
    qkv = rng.standard_normal((1, (HEADS + 2 * KV_HEADS) * DIM)).astype(np.float32)
    # ties between two halves go to the even one; beyond +-65504 (float16's largest) the cache saturates,
    # where a plain conversion would store an infinity and every later attention over it would be NaN
    one_ulp = 2.0**-10
    written = [1 + one_ulp / 2, 1 + 3 * one_ulp / 2, 1 + one_ulp / 2 + 2**-20, 65519.0, 65520.0, 1e6, -1e6, 1e-7]
    stored = [1.0, 1 + 2 * one_ulp, 1 + one_ulp, 65504.0, 65504.0, 65504.0, -65504.0, np.float16(1e-7)]
    first_value = (HEADS + KV_HEADS) * DIM  # value of KV head 0
    qkv[0, first_value : first_value + len(written)] = written
    attn, _, present_value = _run(session, qkv, [(1, 5, 1)], keys, values)
    if cache_dtype is np.float32:
        stored = written  # a float32 cache holds them as they came
    np.testing.assert_array_equal(present_value[1, 0, 5, : len(written)], np.array(stored, cache_dtype))
    assert np.isfinite(attn).all()
    # the next step attends over the saturated value and stays finite
    later = _run(session, qkv, [(1, 6, 1)], keys, present_value)[0]
    assert np.isfinite(later).all()


@pytest.mark.parametrize(
    ("segments", "tokens", "message"),
    [
        ([(4, 0, 2)], 2, "slot is outside the cache"),
        ([(0, 60, 5)], 5, "runs past the cache"),
        ([(0, 0, 0)], 0, "length >= 1"),
        ([(0, 0, 3)], 4, "sum to the number of tokens"),
        ([(0, -1, 2)], 2, "cached length >= 0"),
    ],
)
def test_bad_segments_are_errors_of_the_call(session, cache_dtype, segments, tokens, message):
    rng = np.random.default_rng(2)
    keys, values = _cache(rng, cache_dtype)
    qkv = rng.standard_normal((tokens, (HEADS + 2 * KV_HEADS) * DIM)).astype(np.float32)
    with pytest.raises(Exception, match=message):
        _run(session, qkv, segments, keys, values)
    # the session still serves a good call afterwards
    assert _run(
        session,
        qkv[:1] if tokens else rng.standard_normal((1, qkv.shape[1])).astype(np.float32),
        [(0, 0, 1)],
        keys,
        values,
    )[0].shape == (1, HEADS * DIM)


def test_a_cache_of_the_wrong_layout_is_refused(session, cache_dtype):
    rng = np.random.default_rng(3)
    keys, values = _cache(rng, cache_dtype)
    qkv = rng.standard_normal((1, (HEADS + 2 * KV_HEADS) * DIM)).astype(np.float32)
    cos, sin = _tables()
    one = np.array([1], np.int64)
    feeds = {"qkv": qkv, "seg_slots": one * 0, "seg_cached": one * 0, "seg_lengths": one, "cos": cos, "sin": sin}
    with pytest.raises(Exception, match="past_key must be"):
        session.run(None, feeds | {"past_key": keys, "past_value": values})  # not blocked
    with pytest.raises(Exception, match="past_value must be"):
        session.run(None, feeds | {"past_key": blocked(keys), "past_value": values[:, :, :32]})
