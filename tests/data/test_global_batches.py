"""A source smaller than one global batch still trains: the stream runs on over epochs (issue #23)."""
from __future__ import annotations

import numpy as np
import pytest

from medjax.data.pipelines.global_batches import global_batch_dataset


def test_source_smaller_than_a_batch_repeats_each_epoch_in_a_fresh_order():
    source = [{"x": np.int32(i)} for i in range(5)]
    batches = iter(global_batch_dataset(source, global_batch=8, seed=0, transform=lambda e, rng: e))
    stream = np.concatenate([next(batches)["x"] for _ in range(5)])  # 40 positions = 8 epochs of 5
    epochs = stream.reshape(8, 5)
    assert all(sorted(e) == [0, 1, 2, 3, 4] for e in epochs)  # every epoch is a permutation of the source
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled per epoch
    with pytest.raises(ValueError, match="no examples"):
        global_batch_dataset([], global_batch=8, seed=0, transform=lambda e, rng: e)
    with pytest.raises(ValueError, match="5 examples x 1 epochs, fewer than one global batch of 8"):
        global_batch_dataset(source, global_batch=8, seed=0, transform=lambda e, rng: e, num_epochs=1)
