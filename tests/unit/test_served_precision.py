"""The precision an inference replica reports is the one that runs: the prepared directory's on ONNX
Runtime, the TensorRT engine's own (built from the float decoder) on TensorRT."""

from __future__ import annotations

import types
from typing import Any

from services.inference.main import served_precision

INT8_DIRECTORY: Any = types.SimpleNamespace(precision="int8")


def test_onnx_runtime_runs_the_directorys_precision():
    assert served_precision("onnxruntime", object(), INT8_DIRECTORY) == "int8"


def test_tensorrt_reports_the_precision_its_engine_was_built_in_not_the_directorys():
    for built in ("fp32", "fp16", "bf16"):
        assert served_precision("tensorrt", types.SimpleNamespace(precision=built), INT8_DIRECTORY) == built
