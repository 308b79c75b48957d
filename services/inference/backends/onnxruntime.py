"""ONNX Runtime (CPU) backend: the default that runs everywhere.

It runs `decoder_cpu.onnx` (services/modelstore/onnx_cpu_export.py) on packed steps: the rows of a
step (decode rows of one token and prefill chunks alike) go in as one run of tokens with no padding,
and meshserve's PackedAttention reads each segment's cache by its slot number and writes the new keys
and values into it. The backend owns the cache: one key and one value buffer per layer for all slots,
bound once with I/O binding as both `past_*` and `present_*`, so nothing of the cache is copied in a
step and any set of slots can share a step in any order.

Keys are stored in PackedAttention's layout, blocks of 16 positions each held dimension-major
([slots, kv_heads, capacity / 16, head_dim, 16]); values as [slots, kv_heads, capacity, head_dim];
both of the element type the graph declares (float16 in the quantized precisions, float32 in fp32).
"""

from __future__ import annotations

import mmap

import numpy as np

from services.inference.backends import ort_ops
from services.inference.backends.base import DecoderBackend, StepBatch
from services.modelstore.decoder_contract import KEY_BLOCK
from services.modelstore.layout import ModelDirectory


def token_paged_zeros(shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    """Zeros whose memory the kernel commits a small page at a time, as positions are first written,
    so a KV cache of many slots x the whole context costs what its tokens take (a slot's positions of
    one head are contiguous: 16 positions to a 4 KiB page here). np.zeros maps lazily too, but NumPy
    asks for transparent huge pages on large arrays, and one 2 MiB page commits a row's whole context
    of a layer at its first token: 32 slots took 3 GB of 2,048-token rows holding 100 tokens each."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    memory = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(memory, dtype, count=int(np.prod(shape))).reshape(shape)


CACHE_DTYPES = {"tensor(float16)": np.float16, "tensor(float)": np.float32}
"""decoder_cpu.onnx's past_*/present_* element types, as ONNX Runtime names them, and NumPy's."""


class OnnxRuntimeBackend(DecoderBackend):
    """Runs the CPU decoder with the KV cache updated in place in host memory."""

    name = "onnxruntime"

    def __init__(self, model: ModelDirectory, num_slots: int, max_context: int, intra_op_threads: int = 0) -> None:
        super().__init__(model, num_slots, max_context)
        import onnxruntime as ort

        decoder = model.manifest["files"].get("decoder_cpu")
        if decoder is None or ort_ops.DOMAIN not in model.manifest.get("custom_ops", []):
            raise RuntimeError(
                f"{model.path} was prepared by an older meshserve (its CPU decoder is not the packed one): "
                "run `meshserve prepare-model` again"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.register_custom_ops_library(str(ort_ops.library_path()))
        self.session = ort.InferenceSession(str(model.path / decoder), options, providers=["CPUExecutionProvider"])
        # int4's MatMulNBits takes another kernel for a single row than for many, so a decode row's logits
        # change when prefill tokens share its GEMM (by tenths of a logit, tests/integration/test_mixed_steps.py);
        # the other precisions' projections compute each row alike whatever the step
        self.mixed_steps = model.manifest.get("precision") != "int4"
        c = self.config
        # whole key blocks: a slot's capacity rounds up to a multiple of the block
        self.capacity = -(-max_context // KEY_BLOCK) * KEY_BLOCK
        key_shape = (num_slots, c.num_kv_heads, self.capacity // KEY_BLOCK, c.head_dim, KEY_BLOCK)
        value_shape = (num_slots, c.num_kv_heads, self.capacity, c.head_dim)
        self.cache_dtype = CACHE_DTYPES[next(i.type for i in self.session.get_inputs() if i.name == "past_key_0")]
        self.keys = [token_paged_zeros(key_shape, self.cache_dtype) for _ in range(c.num_layers)]
        self.values = [token_paged_zeros(value_shape, self.cache_dtype) for _ in range(c.num_layers)]
        self._binding = self.session.io_binding()
        from_numpy = ort.OrtValue.ortvalue_from_numpy
        for i in range(c.num_layers):
            for kind, buffers in (("key", self.keys), ("value", self.values)):
                cache = from_numpy(buffers[i])
                self._binding.bind_ortvalue_input(f"past_{kind}_{i}", cache)
                self._binding.bind_ortvalue_output(f"present_{kind}_{i}", cache)

    @property
    def kv_cache_bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))

    # -- one step ---------------------------------------------------------------------------
    def forward(self, batch: StepBatch) -> np.ndarray:
        rows = batch.rows
        if len(np.unique(batch.slots)) != rows:
            raise ValueError(f"a step lists a slot more than once: {batch.slots.tolist()}")
        lengths = batch.new_lengths.astype(np.int64)
        if int((batch.cached_lengths + lengths).max()) > self.max_context:
            raise ValueError("a row runs past its slot's context")
        real = np.arange(batch.seq)[None, :] < lengths[:, None]
        input_ids = np.ascontiguousarray(batch.input_ids[real], np.int64)  # row after row, padding dropped
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        n = batch.logits_indices.shape[1]
        logits_indices = (starts[:, None] + batch.logits_indices).reshape(-1).astype(np.int64)
        logits = np.empty((rows * n, self.config.vocab_size), np.float32)
        binding = self._binding
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("seg_slots", np.ascontiguousarray(batch.slots, np.int64))
        binding.bind_cpu_input("seg_cached", np.ascontiguousarray(batch.cached_lengths, np.int64))
        binding.bind_cpu_input("seg_lengths", lengths)
        binding.bind_cpu_input("logits_indices", logits_indices)
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        return logits.reshape(rows, n, -1)

    def copy_prefix(self, src_slot: int, dst_slot: int, length: int) -> None:
        blocks = -(-length // KEY_BLOCK)  # whole blocks: positions past `length` are rewritten before use
        for keys, values in zip(self.keys, self.values):
            keys[dst_slot, :, :blocks] = keys[src_slot, :, :blocks]
            values[dst_slot, :, :length] = values[src_slot, :, :length]

    def slot_cache(self, layer: int, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """The keys and values [kv_heads, max_context, head_dim] that `slot` holds in `layer` (the keys
        a copy out of their block layout, the values a view)."""
        blocked = self.keys[layer][slot]  # [kv_heads, blocks, head_dim, 16]
        keys = blocked.transpose(0, 1, 3, 2).reshape(blocked.shape[0], self.capacity, -1)
        return keys[:, : self.max_context], self.values[layer][slot, :, : self.max_context]
