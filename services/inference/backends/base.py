"""The engine interface every execution backend implements (ONNX Runtime, TensorRT).

A backend owns the decoder and the KV cache storage; the engine above it owns scheduling,
sampling and which slot belongs to which request. One `forward` call is one engine step for
a batch of rows, each row a slot that continues from its cached length.
"""

from __future__ import annotations

import abc

import numpy as np

from services.modelstore.decoder_contract import StepBatch
from services.modelstore.layout import ModelDirectory

__all__ = ["DecoderBackend", "StepBatch"]


class DecoderBackend(abc.ABC):
    """Runs the exported decoder over a slotted KV cache allocated up front."""

    name: str = "abstract"
    mixed_steps: bool = False
    """Whether a decode row computes the same logits in a step with prefill chunks as in a decode-only
    step. Only then does the engine mix them in one step; otherwise it alternates the two kinds."""

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

    def close(self) -> None:  # noqa: B027 -- optional: a backend without device resources has nothing to release
        """Releases device resources."""
