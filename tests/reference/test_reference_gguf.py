"""Correctness against an independent implementation of the same GGUF: Hugging Face transformers'
GGUF loader (it dequantizes the same Q4_1/Q8_0 blocks itself and runs its own PyTorch llama).

Tolerance: our fp32 graph and transformers' fp32 model compute the same function, so logits may
differ only by float rounding: max |Δlogit| < 1e-2 (observed ~1e-4) and identical argmax."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from services.inference.backends.base import StepBatch
from services.inference.backends.onnxruntime import OnnxRuntimeBackend
from services.tokenizer.core import ChatMessage, TokenizerCore

TOLERANCE = 1e-2
TEXT = "<|im_start|>user\nWhat is the capital of France? 12345 héllo 😀 世界<|im_end|>\n"


@pytest.fixture(scope="module")
def model_dir():
    """The fp32 model: the reference comparison is about the export, not quantization."""
    from services.modelstore.prepare import prepare_model
    from tests.conftest import MODELS_ROOT

    return prepare_model(MODELS_ROOT, "fp32")


@pytest.fixture(scope="module")
def reference(model_dir):
    from services.modelstore.prepare import GGUF_MEMBER
    from tests.conftest import MODELS_ROOT

    gguf = MODELS_ROOT / ".cache" / GGUF_MEMBER.split("/")[-1]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return model.eval(), tokenizer


def test_tokenizer_matches_transformers_gguf_tokenizer(model_dir, reference):
    _, hf_tokenizer = reference
    core = TokenizerCore(model_dir)
    assert (
        core.tokenizer.encode(TEXT, add_special_tokens=False).ids
        == hf_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    )
    chat = [ChatMessage("user", "What is the capital of France?")]
    rendered = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": chat[0].content}], tokenize=False, add_generation_prompt=True
    )
    assert core.render_chat(chat) == rendered


def test_prefill_and_cached_decode_logits_match_transformers(model_dir, reference):
    hf_model, _ = reference
    ids = TokenizerCore(model_dir).tokenizer.encode(TEXT, add_special_tokens=False).ids
    with torch.no_grad():
        expected = hf_model(torch.tensor([ids])).logits[0].numpy()

    backend = OnnxRuntimeBackend(model_dir, num_slots=2, max_context=128)
    # slot 1: prefill all but the last 6 tokens, then decode them one at a time from the KV cache
    split = len(ids) - 6
    batch = StepBatch(np.array([1]), np.array([ids[:split]]), np.array([0]), np.array([split]), np.arange(split)[None])
    got = [backend.forward(batch)[0]]
    for pos in range(split, len(ids)):
        step = StepBatch(np.array([1]), np.array([[ids[pos]]]), np.array([pos]), np.array([1]), np.array([[0]]))
        got.append(backend.forward(step)[0])
    logits = np.concatenate(got, axis=0)
    assert logits.shape == expected.shape
    assert np.abs(logits - expected).max() < TOLERANCE
    assert (logits.argmax(-1) == expected.argmax(-1)).all()
