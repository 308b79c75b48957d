"""ONNX Runtime (CPU) backend: the default that runs everywhere.

It runs `decoder_cpu.onnx` (services/modelstore/onnx_cpu_export.py), whose GroupQueryAttention
reads each row's cached keys/values from, and appends the new ones to, buffers that this backend
owns: one [rows, kv_heads, max_context, head_dim] array per layer and kind, bound with I/O binding
as both `past_*` and `present_*`. Nothing of the cache is copied in a step.

GroupQueryAttention takes the cache of batch row b at buffer row b, so the rows of one step must
be a contiguous range of buffer rows. The backend therefore keeps its own map from engine slot to
buffer row: a step whose slots already sit in a contiguous range (every decode step of a steady
batch, any single-row step) runs in place, in whatever order the engine lists its rows; otherwise
the few out-of-range slots swap buffer rows with slots that are not in the step first, copying
only the cached tokens of the two rows (this happens when requests join or leave the batch).
"""

from __future__ import annotations

import collections
import mmap

import numpy as np

from services.inference.backends import ort_ops
from services.inference.backends.base import DecoderBackend, StepBatch
from services.modelstore.layout import ModelDirectory

# I/O bindings kept for recently used buffer windows (each holds the KV-cache views of one window)
_BINDING_CACHE_SIZE = 64


def token_paged_zeros(shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    """Zeros whose memory the kernel commits a small page at a time, as positions are first written,
    so a KV cache of many slots x the whole context costs what its tokens take (a row's positions of
    one head are contiguous: 16 positions to a 4 KiB page here). np.zeros maps lazily too, but NumPy
    asks for transparent huge pages on large arrays, and one 2 MiB page commits a row's whole context
    of a layer at its first token: 32 slots took 3 GB of 2,048-token rows holding 100 tokens each."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    memory = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(memory, dtype, count=int(np.prod(shape))).reshape(shape)


class OnnxRuntimeBackend(DecoderBackend):
    """Runs the CPU decoder with the KV cache updated in place in host memory."""

    name = "onnxruntime"

    def __init__(self, model: ModelDirectory, num_slots: int, max_context: int, intra_op_threads: int = 0) -> None:
        super().__init__(model, num_slots, max_context)
        import onnxruntime as ort

        self._ort = ort
        decoder = model.manifest["files"].get("decoder_cpu")
        if decoder is None:
            raise RuntimeError(
                f"{model.path} has no decoder_cpu.onnx (prepared by an older meshserve): "
                "run `meshserve prepare-model` again"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        if (library := ort_ops.library_for(model.manifest)) is not None:
            options.register_custom_ops_library(str(library))
        self.session = ort.InferenceSession(str(model.path / decoder), options, providers=["CPUExecutionProvider"])
        c = self.config
        shape = (num_slots, c.num_kv_heads, max_context, c.head_dim)
        self.keys = [token_paged_zeros(shape) for _ in range(c.num_layers)]
        self.values = [token_paged_zeros(shape) for _ in range(c.num_layers)]
        self._row_of_slot = np.arange(num_slots)
        self._slot_of_row = np.arange(num_slots)
        # tokens each buffer row may hold that matter (an upper bound: finished requests are not reported)
        self._row_length = np.zeros(num_slots, np.int64)
        self._bindings: collections.OrderedDict[tuple[int, int], object] = collections.OrderedDict()
        self.row_moves = 0  # buffer-row swaps so far (for tests and benchmarks)

    # -- one step ---------------------------------------------------------------------------
    def forward(self, batch: StepBatch) -> np.ndarray:
        rows, seq = batch.rows, batch.seq
        if len(np.unique(batch.slots)) != rows:
            raise ValueError(f"a step lists a slot more than once: {batch.slots.tolist()}")
        ends = batch.cached_lengths + seq
        if int(ends.max()) > self.max_context:
            # padding would run past a row's buffer: run the rows one by one, unpadded
            return self._forward_rows_separately(batch)
        start = self._place(batch)
        local = self._row_of_slot[batch.slots] - start  # batch row -> row in the window

        input_ids = np.empty((rows, seq), np.int64)
        input_ids[local] = batch.input_ids
        seqlens_k = np.empty(rows, np.int32)
        seqlens_k[local] = np.maximum(batch.cached_lengths + batch.new_lengths - 1, 0)
        query_lengths = np.empty(rows, np.int32)
        query_lengths[local] = batch.new_lengths
        total = np.array(max(int(ends.max()), 1), np.int32)
        n = batch.logits_indices.shape[1]
        logits_indices = (local[:, None] * seq + batch.logits_indices).reshape(-1).astype(np.int64)
        logits = np.empty((rows * n, self.config.vocab_size), np.float32)

        binding = self._binding(start, rows)
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("seqlens_k", seqlens_k)
        binding.bind_cpu_input("query_lengths", query_lengths)
        binding.bind_cpu_input("total_sequence_length", total)
        binding.bind_cpu_input("logits_indices", logits_indices)
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        self._row_length[start + local] = batch.cached_lengths + batch.new_lengths
        return logits.reshape(rows, n, -1)

    def copy_prefix(self, src_slot: int, dst_slot: int, length: int) -> None:
        for layer in range(self.config.num_layers):
            (src_k, src_v), (dst_k, dst_v) = self.slot_cache(layer, src_slot), self.slot_cache(layer, dst_slot)
            dst_k[:, :length] = src_k[:, :length]
            dst_v[:, :length] = src_v[:, :length]
        row = self._row_of_slot[dst_slot]
        self._row_length[row] = max(int(self._row_length[row]), length)

    def slot_cache(self, layer: int, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of the keys and values [kv_heads, max_context, head_dim] that `slot` holds in
        `layer` (slots move between buffer rows, so index through this, not the buffers)."""
        row = int(self._row_of_slot[slot])
        return self.keys[layer][row], self.values[layer][row]

    def _forward_rows_separately(self, batch: StepBatch) -> np.ndarray:
        out = []
        for r in range(batch.rows):
            n = int(batch.new_lengths[r])
            out.append(
                self.forward(
                    StepBatch(
                        batch.slots[r : r + 1],
                        batch.input_ids[r : r + 1, :n],
                        batch.cached_lengths[r : r + 1],
                        batch.new_lengths[r : r + 1],
                        batch.logits_indices[r : r + 1],
                    )
                )
            )
        return np.concatenate(out)

    def _binding(self, start: int, rows: int):
        """An I/O binding with the KV-cache views of buffer rows [start, start + rows) bound as both
        the past and the present of every layer."""
        key = (start, rows)
        binding = self._bindings.get(key)
        if binding is not None:
            self._bindings.move_to_end(key)
            return binding
        binding = self.session.io_binding()
        from_numpy = self._ort.OrtValue.ortvalue_from_numpy
        for i in range(self.config.num_layers):
            for kind, buffers in (("key", self.keys), ("value", self.values)):
                view = from_numpy(buffers[i][start : start + rows])
                binding.bind_ortvalue_input(f"past_{kind}_{i}", view)
                binding.bind_ortvalue_output(f"present_{kind}_{i}", view)
        self._bindings[key] = binding
        if len(self._bindings) > _BINDING_CACHE_SIZE:
            self._bindings.popitem(last=False)
        return binding

    # -- which buffer rows a step uses -------------------------------------------------------
    def _place(self, batch: StepBatch) -> int:
        """Makes the batch's slots occupy a contiguous range of buffer rows; returns its start."""
        rows = batch.rows
        held = self._row_of_slot[batch.slots]
        low = int(held.min())
        if int(held.max()) - low + 1 == rows:
            return low
        # the window that already holds the most of the batch needs the fewest swaps
        starts = np.clip(np.concatenate([held, held - rows + 1]), 0, self.num_slots - rows)
        inside = [int(((held >= s) & (held < s + rows)).sum()) for s in starts]
        start = int(starts[int(np.argmax(inside))])
        in_batch = np.zeros(self.num_slots, bool)
        in_batch[held] = True
        free_rows = [r for r in range(start, start + rows) if not in_batch[r]]
        needed = dict(zip(held.tolist(), batch.cached_lengths.tolist()))
        for row in held.tolist():
            if start <= row < start + rows:
                continue
            self._swap_rows(row, free_rows.pop(), needed[row])
        return start

    def _swap_rows(self, a: int, b: int, length_a: int) -> None:
        """Swaps the cache contents (first tokens only) and owners of buffer rows a and b."""
        length_b = int(self._row_length[b])
        for buffers in (self.keys, self.values):
            for cache in buffers:
                held_b = cache[b, :, :length_b].copy()
                cache[b, :, :length_a] = cache[a, :, :length_a]
                cache[a, :, :length_b] = held_b
        slot_a, slot_b = self._slot_of_row[a], self._slot_of_row[b]
        self._slot_of_row[a], self._slot_of_row[b] = slot_b, slot_a
        self._row_of_slot[slot_a], self._row_of_slot[slot_b] = b, a
        self._row_length[a], self._row_length[b] = length_b, length_a
        self.row_moves += 1
