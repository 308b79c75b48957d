"""The engine interface every execution backend implements (ONNX Runtime, TensorRT).

A backend owns the decoder and the KV cache storage; the engine above it owns scheduling,
sampling and which slot belongs to which request. One `forward` call is one engine step for
a batch of rows, each row a slot that continues from its cached length.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np

from services.modelstore.layout import ModelDirectory
from services.modelstore.onnx_export import MASK_VALUE


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
        return cls(np.array([slot]), np.asarray(token_ids, np.int64).reshape(1, n), np.array([cached]), np.array([n]), positions)

    def row(self, i: int) -> StepBatch:
        """Row `i` alone, with the same padding: its logits are those it has in the whole batch."""
        pick = slice(i, i + 1)
        return StepBatch(self.slots[pick], self.input_ids[pick], self.cached_lengths[pick], self.new_lengths[pick],
                         self.logits_indices[pick])

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


class DecoderBackend(abc.ABC):
    """Runs the exported decoder over a slotted KV cache allocated up front."""

    name: str = "abstract"

    def __init__(self, model: ModelDirectory, num_slots: int, max_context: int) -> None:
        self.model = model
        self.config = model.config
        self.num_slots = num_slots
        self.max_context = max_context

    @property
    def kv_cache_bytes(self) -> int:
        c = self.config
        return 2 * c.num_layers * self.num_slots * c.num_kv_heads * self.max_context * c.head_dim * 4

    @abc.abstractmethod
    def forward(self, batch: StepBatch) -> np.ndarray:
        """Runs one step, appends the new tokens' keys/values to each row's slot after its cached
        tokens, and returns float32 logits [rows, n_logits, vocab] on the host."""

    @abc.abstractmethod
    def copy_prefix(self, src_slot: int, dst_slot: int, length: int) -> None:
        """Copies the keys and values of positions [0, length) of `src_slot` into `dst_slot`."""

    def close(self) -> None:
        """Releases device resources."""
