"""Quality gates of every precision `meshserve prepare-model` offers (services/modelstore/prepare.py):
the greedy chat answer to "What is the capital of France?" names Paris, and a quantized model's
perplexity on a fixed English text (tests/data/perplexity_text.txt, 2,135 tokens, prefilled in
chunks with logits at every position) stays within its bound of the fp32 reference's: 3% for
int8, 1% for w8a8 (measured +0.6%: 19.23); int4, the lighter fallback variant, is allowed to cost
quality and is held to 30% (measured +21%: 23.16 against 19.12). int4 must also be what makes it
lighter: 4-bit projections in blocks of 128, and a weights file a third smaller than int8's. The quantized
precisions keep their KV cache in float16 (scored with it: int8 19.13, w8a8 19.26), fp32 in float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.inference.backends.onnxruntime import OnnxRuntimeBackend
from services.inference.evaluate import greedy, perplexity
from services.modelstore.prepare import PRECISIONS, prepare_model
from services.tokenizer.core import ChatMessage, TokenizerCore

TEXT = Path(__file__).resolve().parents[1] / "data" / "perplexity_text.txt"
MAX_PERPLEXITY_RATIO = {"int8": 1.03, "int4": 1.30, "w8a8": 1.01}


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
def test_quantized_perplexity_is_within_its_bound_of_fp32(perplexities, precision):
    reference = perplexities["fp32"]
    assert 5 < reference < 40, f"fp32 perplexity {reference:.2f}: the text or the model is not what this test expects"
    assert perplexities[precision] <= reference * MAX_PERPLEXITY_RATIO[precision], perplexities


def test_int4_is_4bit_blocks_of_128_and_lighter_than_int8(precision_models):
    import onnx

    graph = onnx.load(str(precision_models["int4"].path / "decoder_cpu.onnx"), load_external_data=False).graph
    projections = [n for n in graph.node if n.op_type == "MatMulNBits" and n.output[0] != "logits"]
    attributes = {(a.name, a.i) for n in projections for a in n.attribute if a.name in ("bits", "block_size")}
    assert len(projections) == 5 * precision_models["int4"].config.num_layers  # qkv, o, gate, up, down
    assert attributes == {("bits", 4), ("block_size", 128)}

    def weights_bytes(precision: str) -> int:
        return (precision_models[precision].path / "decoder_cpu.onnx.data").stat().st_size

    assert weights_bytes("int4") < 0.75 * weights_bytes("int8")  # measured: 0.68


def test_the_quantized_precisions_cache_in_float16_and_fp32_in_float32(precision_models):
    for precision, model in precision_models.items():
        backend = OnnxRuntimeBackend(model, num_slots=2, max_context=32)
        want = np.float32 if precision == "fp32" else np.float16
        dtypes = {a.dtype for a in backend.keys + backend.values}
        assert dtypes == {np.dtype(want)}, (precision, dtypes)
