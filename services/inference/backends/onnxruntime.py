"""ONNX Runtime (CPU) backend: the default that runs everywhere."""

from __future__ import annotations

import logging

import numpy as np

from services.inference.backends.base import DecoderBackend, StepBatch
from services.modelstore.layout import ModelDirectory

log = logging.getLogger(__name__)


class OnnxRuntimeBackend(DecoderBackend):
    """Keeps the KV cache in host memory, one [slots, kv_heads, max_context, head_dim] array per
    layer and kind; each step gathers the rows' cached prefixes into the graph's past inputs."""

    name = "onnxruntime"

    def __init__(self, model: ModelDirectory, num_slots: int, max_context: int, intra_op_threads: int = 0) -> None:
        super().__init__(model, num_slots, max_context)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model.decoder_path), options, providers=["CPUExecutionProvider"])
        c = self.config
        shape = (num_slots, c.num_kv_heads, max_context, c.head_dim)
        # np.zeros maps pages lazily: memory is committed only as slots fill up
        self.keys = [np.zeros(shape, np.float32) for _ in range(c.num_layers)]
        self.values = [np.zeros(shape, np.float32) for _ in range(c.num_layers)]
        self._output_names = [o.name for o in self.session.get_outputs()]

    def forward(self, batch: StepBatch) -> np.ndarray:
        c = self.config
        past = batch.past
        feed: dict[str, np.ndarray] = {
            "input_ids": batch.input_ids,
            "position_ids": batch.position_ids(),
            "attention_bias": batch.attention_bias(),
            "logits_indices": batch.logits_indices,
        }
        slots = batch.slots
        for i in range(c.num_layers):
            feed[f"past_key_{i}"] = self.keys[i][slots, :, :past]
            feed[f"past_value_{i}"] = self.values[i][slots, :, :past]
        outputs = dict(zip(self._output_names, self.session.run(self._output_names, feed)))
        for row in range(batch.rows):
            slot, start, n = int(slots[row]), int(batch.cached_lengths[row]), int(batch.new_lengths[row])
            for i in range(c.num_layers):
                self.keys[i][slot, :, start : start + n] = outputs[f"new_key_{i}"][row, :, :n]
                self.values[i][slot, :, start : start + n] = outputs[f"new_value_{i}"][row, :, :n]
        return outputs["logits"]
