"""meshserve.ops PackedAttention (services/inference/backends/ort_ops): causal grouped-query attention with
rotary embedding over packed segments of different lengths, against a float64 NumPy reference; a query's
output does not depend on the other segments of its step; the step's keys and values land in the bound
cache; bad shapes and segments are errors of the call, never a crash."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from services.inference.backends import ort_ops

HEADS, KV_HEADS, DIM, SLOTS, CAPACITY, POSITIONS = 6, 2, 64, 4, 64, 80
BLOCK = 16


def _session() -> ort.InferenceSession:
    names = ["qkv", "seg_slots", "seg_cached", "seg_lengths", "cos", "sin", "past_key", "past_value"]
    node = helper.make_node(
        "PackedAttention",
        names,
        ["attn", "present_key", "present_value"],
        domain=ort_ops.DOMAIN,
        num_heads=HEADS,
        kv_num_heads=KV_HEADS,
    )
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [helper.make_tensor_value_info("qkv", f, ["tokens", (HEADS + 2 * KV_HEADS) * DIM])]
    inputs += [helper.make_tensor_value_info(n, i64, ["segments"]) for n in names[1:4]]
    inputs += [helper.make_tensor_value_info(n, f, [POSITIONS, DIM // 2]) for n in ("cos", "sin")]
    inputs += [helper.make_tensor_value_info(n, f, None) for n in ("past_key", "past_value")]
    outputs = [helper.make_tensor_value_info(n, f, None) for n in ("attn", "present_key", "present_value")]
    model = helper.make_model(
        helper.make_graph([node], "packed_attention", inputs, outputs),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ort_ops.DOMAIN, 1)],
    )
    model.ir_version = 9
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(ort_ops.library_path()))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def session():
    return _session()


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


def _reference(qkv, segments, keys, values, cos, sin):
    """float64 attention of every token; keys/values [N, G, C, D] (keys after RoPE), updated in place."""
    group = HEADS // KV_HEADS
    out = np.zeros((len(qkv), HEADS * DIM))
    token = 0
    for slot, cached, length in segments:
        for j in range(length):
            row = qkv[token + j].astype(np.float64)
            for g in range(KV_HEADS):
                k = row[(HEADS + g) * DIM : (HEADS + g + 1) * DIM]
                keys[slot, g, cached + j] = _rope(k, cached + j, cos, sin)
                values[slot, g, cached + j] = row[(HEADS + KV_HEADS + g) * DIM : (HEADS + KV_HEADS + g + 1) * DIM]
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


def _cache(rng):
    keys = rng.standard_normal((SLOTS, KV_HEADS, CAPACITY, DIM)).astype(np.float32)
    values = rng.standard_normal((SLOTS, KV_HEADS, CAPACITY, DIM)).astype(np.float32)
    return keys, values


# decode rows (one token) and prefill chunks, in any slots, across key-block boundaries
SEGMENTS = [(2, 37, 1), (0, 0, 20), (3, 15, 1), (1, 30, 17), (0, 20, 1)]


def test_packed_segments_match_the_reference(session):
    rng = np.random.default_rng(0)
    keys, values = _cache(rng)
    # segment (0, 20, 1) continues slot 0 right after (0, 0, 20): only in a later step
    segments = SEGMENTS[:4]
    tokens = sum(n for *_, n in segments)
    qkv = rng.standard_normal((tokens, (HEADS + 2 * KV_HEADS) * DIM)).astype(np.float32)
    want_keys, want_values = keys.astype(np.float64), values.astype(np.float64)
    want = _reference(qkv, segments, want_keys, want_values, *_tables())
    attn, present_key, present_value = _run(session, qkv, segments, keys, values)
    assert attn.shape == (tokens, HEADS * DIM)
    np.testing.assert_allclose(attn, want, atol=2e-5)
    np.testing.assert_allclose(unblocked(present_key), want_keys, atol=2e-5)
    np.testing.assert_allclose(present_value, want_values, atol=0)
    # untouched positions keep what the cache held
    np.testing.assert_array_equal(unblocked(present_key)[2, :, 38:], keys[2, :, 38:])


def test_a_query_does_not_depend_on_the_other_segments_of_its_step(session):
    rng = np.random.default_rng(1)
    keys, values = _cache(rng)
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
def test_bad_segments_are_errors_of_the_call(session, segments, tokens, message):
    rng = np.random.default_rng(2)
    keys, values = _cache(rng)
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


def test_a_cache_of_the_wrong_layout_is_refused(session):
    rng = np.random.default_rng(3)
    keys, values = _cache(rng)
    qkv = rng.standard_normal((1, (HEADS + 2 * KV_HEADS) * DIM)).astype(np.float32)
    cos, sin = _tables()
    one = np.array([1], np.int64)
    feeds = {"qkv": qkv, "seg_slots": one * 0, "seg_cached": one * 0, "seg_lengths": one, "cos": cos, "sin": sin}
    with pytest.raises(Exception, match="past_key must be"):
        session.run(None, feeds | {"past_key": keys, "past_value": values})  # not blocked
    with pytest.raises(Exception, match="past_value must be"):
        session.run(None, feeds | {"past_key": blocked(keys), "past_value": values[:, :, :32]})
