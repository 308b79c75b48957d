"""The decoder contract: what the exported graph takes and returns, shared by the exporter
(onnx_export.py, onnx_cpu_export.py), the int8 calibration and every backend.

inputs
  input_ids        int64   [batch, seq]          new tokens of each row (right-padded)
  position_ids     int64   [batch, seq]          absolute position of each new token
  attention_bias   float32 [batch, seq, past+seq] 0 where a query may attend, -1e9 elsewhere
  logits_indices   int64   [batch, n_logits]     which of the seq positions need logits
  past_key_{i}     float32 [batch, kv_heads, past, head_dim]   cached keys of layer i (after RoPE)
  past_value_{i}   float32 [batch, kv_heads, past, head_dim]
outputs
  logits           float32 [batch, n_logits, vocab]
  new_key_{i}      float32 [batch, kv_heads, seq, head_dim]    keys of the new tokens only
  new_value_{i}    float32 [batch, kv_heads, seq, head_dim]

Only the new tokens' keys and values come out: the engine owns the cache and writes them into
its preallocated slots, so no backend returns (or copies) the whole cache each step.

numpy only, no onnx: the tokenizer reads `LlamaConfig` from a manifest through layout.py, and a
process that only reads a model directory should not load the ONNX library to do it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MASK_VALUE = -1e9
"""The attention bias where a query may not attend."""

KEY_BLOCK = 16
"""Positions per block of the CPU decoder's key cache (decoder_cpu.onnx, PackedAttention's layout)."""


@dataclass(frozen=True)
class LlamaConfig:
    """Architecture hyper-parameters read from the GGUF metadata."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def input_names(config: LlamaConfig) -> list[str]:
    names = ["input_ids", "position_ids", "attention_bias", "logits_indices"]
    for i in range(config.num_layers):
        names += [f"past_key_{i}", f"past_value_{i}"]
    return names


def output_names(config: LlamaConfig) -> list[str]:
    names = ["logits"]
    for i in range(config.num_layers):
        names += [f"new_key_{i}", f"new_value_{i}"]
    return names


@dataclass(frozen=True)
class StepBatch:
    """Inputs of one forward pass. Rows are right-padded to the longest new-token count."""

    slots: np.ndarray  # int64 [rows]            KV-cache slot of each row
    input_ids: np.ndarray  # int64 [rows, seq]    new tokens, padded with 0
    cached_lengths: np.ndarray  # int64 [rows]    tokens already in the row's slot
    new_lengths: np.ndarray  # int64 [rows]       real (unpadded) new tokens per row
    logits_indices: np.ndarray  # int64 [rows, n] positions (in 0..seq) whose logits are needed

    @classmethod
    def one_row(cls, token_ids, slot: int = 0, cached: int = 0, all_logits: bool = False) -> StepBatch:
        """One row of new tokens after `cached` ones in `slot`; logits of its last token, or of all."""
        n = len(token_ids)
        positions = np.arange(n)[None] if all_logits else np.array([[n - 1]])
        return cls(
            np.array([slot]),
            np.asarray(token_ids, np.int64).reshape(1, n),
            np.array([cached]),
            np.array([n]),
            positions,
        )

    def row(self, i: int) -> StepBatch:
        """Row `i` alone, with the same padding: its logits are those it has in the whole batch."""
        pick = slice(i, i + 1)
        return StepBatch(
            self.slots[pick],
            self.input_ids[pick],
            self.cached_lengths[pick],
            self.new_lengths[pick],
            self.logits_indices[pick],
        )

    @property
    def rows(self) -> int:
        return int(self.slots.shape[0])

    @property
    def seq(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def past(self) -> int:
        return int(self.cached_lengths.max()) if self.rows else 0

    def position_ids(self) -> np.ndarray:
        return self.cached_lengths[:, None] + np.arange(self.seq, dtype=np.int64)[None, :]

    def attention_bias(self) -> np.ndarray:
        """[rows, seq, past + seq]: each query sees its row's cached tokens and the new ones up to itself."""
        past, seq = self.past, self.seq
        key_pos = np.arange(past + seq)
        query = np.arange(seq)
        cached_ok = key_pos[None, None, :past] < self.cached_lengths[:, None, None]
        cached_ok = np.broadcast_to(cached_ok, (self.rows, seq, past))
        new_ok = (query[None, :] <= query[:, None])[None]  # causal among the new tokens
        new_ok = np.broadcast_to(new_ok, (self.rows, seq, seq))
        allowed = np.concatenate([cached_ok, new_ok], axis=2)
        return np.where(allowed, 0.0, MASK_VALUE).astype(np.float32)
