"""Layer 2 of the TensorRT backend: the device-resident KV cache and one step's execution (torch,
any device).

`DeviceKVCache` and `DeviceStepRunner` gather the rows' cached keys and values into contiguous
buffers, run one graph call through an `execute` callback, and scatter the new keys and values
back. On CPU the callback can be ONNX Runtime, which is how CI tests this layer without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from services.inference.backends.tensorrt.planning import (
    IONames,
    ProfilePlan,
    merge_logits,
    select_profile,
    split_step,
    validate_step,
)
from services.modelstore.decoder_contract import LlamaConfig, StepBatch

if TYPE_CHECKING:  # imported lazily at run time: planning and its tests need no torch
    import torch

# execute(profile_index, inputs, outputs): runs the graph once, writing into the output tensors.
ExecuteFn = Callable[[int, "dict[str, torch.Tensor]", "dict[str, torch.Tensor]"], None]


class DeviceKVCache:
    """The KV cache on a torch device: one tensor [layers, 2, slots, kv_heads, max_context, head_dim];
    `storage[i, 0]` and `storage[i, 1]` are layer i's key and value buffers
    [slots, kv_heads, max_context, head_dim]. One tensor lets one kernel gather or scatter all layers."""

    def __init__(self, config: LlamaConfig, num_slots: int, max_context: int, device: str | torch.device) -> None:
        import torch

        shape = (config.num_layers, 2, num_slots, config.num_kv_heads, max_context, config.head_dim)
        self.storage = torch.zeros(shape, dtype=torch.float32, device=device)

    def gather(self, slots: torch.Tensor, past: int) -> torch.Tensor:
        """Contiguous [layers, 2, rows, kv_heads, past, head_dim]: the rows' first `past` positions."""
        import torch

        return torch.index_select(self.storage[:, :, :, :, :past], 2, slots)

    def scatter(self, new_kv: torch.Tensor, batch: StepBatch) -> None:
        """Writes new_kv [layers, 2, rows, kv_heads, seq, head_dim] after each row's cached tokens,
        real (unpadded) tokens only."""
        import torch

        row, t = np.nonzero(np.arange(batch.seq)[None, :] < batch.new_lengths[:, None])
        device = self.storage.device
        slot_idx = torch.as_tensor(batch.slots[row], device=device)
        pos_idx = torch.as_tensor(batch.cached_lengths[row] + t, device=device)
        row_idx = torch.as_tensor(row, device=device)
        t_idx = torch.as_tensor(t, device=device)
        # both sides index two non-adjacent dims, so both come out as [tokens, layers, 2, kv, head_dim]
        self.storage[:, :, slot_idx, :, pos_idx] = new_kv[:, :, row_idx, :, t_idx]

    def copy_prefix(self, src_slot: int, dst_slot: int, length: int) -> None:
        """Every layer's keys and values of positions [0, length) from one slot to another."""
        self.storage[:, :, dst_slot, :, :length] = self.storage[:, :, src_slot, :, :length]


class DeviceStepRunner:
    """One engine step on a device: per sub-step, upload the small inputs, gather the rows' past
    keys/values, call `execute`, scatter the new keys/values, download the logits."""

    def __init__(
        self,
        config: LlamaConfig,
        names: IONames,
        num_slots: int,
        max_context: int,
        plans: Sequence[ProfilePlan],
        execute: ExecuteFn,
        device: str | torch.device = "cpu",
        input_dtypes: Mapping[str, torch.dtype] | None = None,
    ) -> None:
        import torch

        self.config = config
        self.names = names
        self.num_slots = num_slots
        self.max_context = max_context
        self.plans = list(plans)
        self.max_seq = max(plan.dims["seq"].max for plan in self.plans)
        self.execute = execute
        self.device = torch.device(device)
        self.input_dtypes = dict(input_dtypes or {})
        self.cache = DeviceKVCache(config, num_slots, max_context, self.device)

    def _upload(self, name: str, array: np.ndarray) -> torch.Tensor:
        import torch

        tensor = torch.as_tensor(np.ascontiguousarray(array), device=self.device)
        wanted = self.input_dtypes.get(name)
        return tensor if wanted is None or tensor.dtype == wanted else tensor.to(wanted)

    def forward(self, batch: StepBatch) -> np.ndarray:
        validate_step(batch, self.num_slots, self.max_context)
        c = self.config
        if batch.rows == 0:
            return np.zeros((0, batch.logits_indices.shape[1], c.vocab_size), np.float32)
        subs = split_step(batch, self.max_seq)
        return merge_logits(batch, subs, [self._run(sub.batch) for sub in subs])

    def _run(self, batch: StepBatch) -> np.ndarray:
        import torch

        c, names = self.config, self.names
        rows, seq, past, n_logits = batch.rows, batch.seq, batch.past, batch.logits_indices.shape[1]
        profile = select_profile(self.plans, rows, seq, past, n_logits)
        # 1. small inputs to the device; the attention bias comes from StepBatch, the one definition
        inputs = {
            "input_ids": self._upload("input_ids", batch.input_ids),
            "position_ids": self._upload("position_ids", batch.position_ids()),
            "attention_bias": self._upload("attention_bias", batch.attention_bias()),
            "logits_indices": self._upload("logits_indices", batch.logits_indices),
        }
        # 2. the rows' cached prefixes, gathered on the device
        past_kv = self.cache.gather(torch.as_tensor(batch.slots, device=self.device), past)
        for i in range(c.num_layers):
            inputs[names.past_keys[i]] = past_kv[i, 0]
            inputs[names.past_values[i]] = past_kv[i, 1]
        # 3. outputs written in place by the graph
        new_kv = torch.empty(
            (c.num_layers, 2, rows, c.num_kv_heads, seq, c.head_dim), dtype=torch.float32, device=self.device
        )
        logits = torch.empty((rows, n_logits, c.vocab_size), dtype=torch.float32, device=self.device)
        outputs = {"logits": logits}
        for i in range(c.num_layers):
            outputs[names.new_keys[i]] = new_kv[i, 0]
            outputs[names.new_values[i]] = new_kv[i, 1]
        self.execute(profile, inputs, outputs)
        # 4. new keys/values into the slots, on the device; only the logits come back
        self.cache.scatter(new_kv, batch)
        return logits.cpu().numpy()
