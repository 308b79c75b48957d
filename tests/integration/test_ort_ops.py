"""meshserve's own ONNX Runtime operators (services/inference/backends/ort_ops): the library built from the
API-23 header (Debian's libonnxruntime-dev 1.23) loads into the pinned onnxruntime wheel, whose runtime
serves a newer API version; RowQuantize computes what its definition says; bad attributes and shapes are
errors of the session or the call, never a crash."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from services.inference.backends import ort_ops
from services.modelstore.quantize import rotate_blocks


def _session(k: int | str, **attrs) -> ort.InferenceSession:
    node = helper.make_node("RowQuantize", ["x"], ["codes", "scale"], domain=ort_ops.DOMAIN, **attrs)
    graph = helper.make_graph(
        [node],
        "row_quantize",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", k])],
        [
            helper.make_tensor_value_info("codes", TensorProto.UINT8, None),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, None),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ort_ops.DOMAIN, 1)]
    )
    model.ir_version = 9
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(ort_ops.library_path()))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _reference(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    values = rotate_blocks(x.astype(np.float64), block) if block else x.astype(np.float64)
    scale = np.abs(values).max(-1, keepdims=True) / 127
    scale = np.where(scale == 0, 1.0, scale)
    return np.clip(np.rint(values / scale), -127, 127) + 128, scale


def _header_dir() -> Path:
    """Where build.sh put ONNX Runtime's headers: $ORT_HEADERS, else its cache under ~/.cache."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "meshserve" / "onnxruntime-headers"
    return Path(os.environ.get("ORT_HEADERS") or cache)


def test_the_library_is_built_on_an_older_api_than_the_runtime_serves():
    source = ort_ops.LIBRARY.with_name("meshserve_ops.cc").read_text()
    assert "GetApi(ORT_API_VERSION)" in source  # the library asks for the header's version, not a hard-coded one
    header = _header_dir() / "onnxruntime_c_api.h"
    assert header.is_file(), f"no {header}: build.sh fetches it"
    built = int(re.search(r"#define ORT_API_VERSION (\d+)", header.read_text())[1])
    runtime_minor = int(ort.__version__.split(".")[1])
    assert built < runtime_minor, (built, ort.__version__)  # an older API than the runtime's, served by it


@pytest.mark.parametrize("block", [0, 64])
def test_row_quantize_matches_its_definition(block):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 50, 1536)).astype(np.float32)
    x[0, 3, 7] = 40.0  # an outlier channel
    x[1, 4] = 0.0  # an all-zero row: scale 1, codes 128
    codes, scale = _session(1536, hadamard_block=block).run(None, {"x": x})
    want_codes, want_scale = _reference(x, block)
    assert codes.dtype == np.uint8 and codes.shape == x.shape and scale.shape == (3, 50, 1)
    np.testing.assert_allclose(scale, want_scale, rtol=1e-6)
    # float32 against float64 rounding: a code may differ by one where x / scale lands on .5
    assert np.abs(codes.astype(np.int32) - want_codes).max() <= 1
    assert (codes.astype(np.int32) != want_codes).mean() < 1e-3
    assert (codes[1, 4] == 128).all() and scale[1, 4, 0] == 1.0


def test_each_row_is_quantized_from_its_own_values_alone():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 40, 576)).astype(np.float32)
    session = _session(576)
    together = session.run(None, {"x": x})
    alone = [session.run(None, {"x": x[:, i : i + 1]}) for i in range(40)]  # below and above the threaded size
    assert np.array_equal(together[0], np.concatenate([a[0] for a in alone], axis=1))
    assert np.array_equal(together[1], np.concatenate([a[1] for a in alone], axis=1))


def test_a_block_that_does_not_divide_the_row_is_an_error_of_the_call():
    session = _session("k", hadamard_block=64)
    with pytest.raises(Exception, match="multiple of hadamard_block"):
        session.run(None, {"x": np.ones((1, 1, 100), np.float32)})
    codes, _ = session.run(None, {"x": np.ones((1, 1, 128), np.float32)})  # the session still serves
    assert codes.shape == (1, 1, 128)


def test_a_block_that_is_not_a_power_of_two_is_refused_at_session_creation():
    with pytest.raises(Exception, match="power of two"):
        _session(96, hadamard_block=48)
