"""Quality gates of every precision `meshserve prepare-model` offers (services/modelstore/prepare.py):
the greedy chat answer to "What is the capital of France?" names Paris, and a quantized model's
perplexity on a fixed English text (tests/data/perplexity_text.txt, 2,135 tokens, prefilled in
chunks with logits at every position) stays within 3% of the fp32 reference's."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.inference.backends.onnxruntime import OnnxRuntimeBackend
from services.inference.evaluate import greedy, perplexity
from services.modelstore.prepare import PRECISIONS, prepare_model
from services.tokenizer.core import ChatMessage, TokenizerCore

TEXT = Path(__file__).resolve().parents[1] / "data" / "perplexity_text.txt"
MAX_PERPLEXITY_RATIO = 1.03


@pytest.fixture(scope="session")
def precision_models():
    """Every precision, prepared once per session (idempotent: reused when already prepared)."""
    from tests.conftest import MODELS_ROOT

    return {precision: prepare_model(MODELS_ROOT, precision) for precision in PRECISIONS}


@pytest.fixture(scope="session")
def perplexities(precision_models):
    out = {}
    for precision, model in precision_models.items():
        ids = TokenizerCore(model).tokenizer.encode(TEXT.read_text(), add_special_tokens=False).ids
        backend = OnnxRuntimeBackend(model, num_slots=1, max_context=len(ids) + 1)
        out[precision] = perplexity(backend, ids)
    return out


@pytest.mark.parametrize("precision", PRECISIONS)
def test_greedy_chat_answer_names_paris(precision_models, precision):
    model = precision_models[precision]
    tokenizer = TokenizerCore(model)
    prompt = tokenizer.encode_chat([ChatMessage("user", "What is the capital of France?")])
    backend = OnnxRuntimeBackend(model, num_slots=1, max_context=len(prompt) + 32)
    answer = tokenizer.tokenizer.decode(greedy(backend, prompt, 32, frozenset(model.eos_token_ids)))
    assert "Paris" in answer


@pytest.mark.parametrize("precision", [p for p in PRECISIONS if p != "fp32"])
def test_quantized_perplexity_is_within_3_percent_of_fp32(perplexities, precision):
    reference = perplexities["fp32"]
    assert 5 < reference < 40, f"fp32 perplexity {reference:.2f}: the text or the model is not what this test expects"
    assert perplexities[precision] <= reference * MAX_PERPLEXITY_RATIO, perplexities
