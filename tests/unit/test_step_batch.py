import numpy as np

from services.inference.backends.base import StepBatch
from services.modelstore.decoder_contract import MASK_VALUE


def test_attention_bias_masks_other_rows_padding_and_the_future():
    # row 0: 2 cached tokens + 3 new; row 1: 4 cached + 1 new (padded to 3)
    batch = StepBatch(
        slots=np.array([0, 1]),
        input_ids=np.zeros((2, 3), np.int64),
        cached_lengths=np.array([2, 4]),
        new_lengths=np.array([3, 1]),
        logits_indices=np.array([[2], [0]]),
    )
    bias = batch.attention_bias()
    assert bias.shape == (2, 3, 4 + 3)
    allowed = bias == 0
    # row 0, query 0: its 2 cached tokens, not the padding of the past (2..3), itself only among new
    assert allowed[0, 0].tolist() == [True, True, False, False, True, False, False]
    assert allowed[0, 2].tolist() == [True, True, False, False, True, True, True]
    # row 1, query 0: all 4 cached, itself
    assert allowed[1, 0].tolist() == [True, True, True, True, True, False, False]
    assert set(np.unique(bias)) == {0.0, np.float32(MASK_VALUE)}
    assert batch.position_ids().tolist() == [[2, 3, 4], [4, 5, 6]]
