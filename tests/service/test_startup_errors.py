"""Start-up failures are one clear sentence, not a traceback."""

import subprocess
import sys

from tests.conftest import MODELS_ROOT, REPO


def test_asking_for_tensorrt_where_it_is_missing_fails_with_one_sentence(model_dir):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli.main",
            "serve-inference",
            "--backend",
            "tensorrt",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--models-root",
            str(MODELS_ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "TensorRT" in message and "pip install" in message and "--backend onnxruntime" in message


def test_a_missing_model_says_how_to_prepare_it(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli.main",
            "serve-tokenizer",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--models-root",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "meshserve prepare-model" in result.stderr
