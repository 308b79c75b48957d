"""Issue 3's quality bar measured through the public API: the served (default, quantized) model's
perplexity on tests/data/perplexity_text.txt, from prompt logprobs through Envoy, is within 3% of
the fp32 reference model's on the same windows of the same text."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from services.cli.perplexity import perplexity_of, windows
from services.inference.backends.onnxruntime import OnnxRuntimeBackend
from services.inference.evaluate import token_log_probs
from services.modelstore.prepare import prepare_model
from services.tokenizer.core import TokenizerCore
from tests.conftest import MODELS_ROOT, REPO

TEXT = REPO / "tests" / "data" / "perplexity_text.txt"


def reference_perplexity(model) -> float:
    """The same windows scored by the ONNX Runtime backend directly, no service in between."""
    tokenizer = TokenizerCore(model)
    backend = OnnxRuntimeBackend(model, num_slots=1, max_context=2048)
    log_probs = []
    for text in windows(TEXT.read_text()):
        ids = tokenizer.encode_text(text)
        assert len(ids) < 2048
        log_probs.append(list(token_log_probs(backend, ids)))
    return perplexity_of(log_probs)


def test_perplexity_through_the_api_is_within_3_percent_of_fp32(mesh, model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "perplexity", str(TEXT), "--target", mesh.target],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["windows"] >= 2 and report["tokens"] > 1500
    served = report["perplexity"]
    # the API path computes what the served model computes directly (rounding of the printed value aside)
    assert math.isclose(served, reference_perplexity(model_dir), rel_tol=1e-3)
    fp32 = reference_perplexity(prepare_model(MODELS_ROOT, "fp32"))
    assert 5 < fp32 < 40, f"fp32 perplexity {fp32:.2f}: the text or the model is not what this test expects"
    assert served <= fp32 * 1.03, (served, fp32)
    print(
        f"perplexity through the API: served {served:.3f}, fp32 reference {fp32:.3f} "
        f"({(served / fp32 - 1) * 100:+.2f}%)"
    )
