"""TaskBase.load_pretrained: leaves of the same path and shape are taken, the rest logged, and a source of
which nothing fits is an error (not a silent start from scratch)."""
import types

import numpy as np
import pytest

from medjax.tasks.base import TaskBase


def _task():
    lines = []
    return types.SimpleNamespace(log=lines.append), lines


def test_takes_matching_leaves_and_logs_the_rest():
    task, lines = _task()
    params = {"encoder": {"kernel": np.zeros((2, 3), np.float32)}, "head": {"kernel": np.zeros((3, 4), np.float32)}}
    pretrained = {"encoder": {"kernel": np.full((2, 3), 7.0)}, "decoder": {"kernel": np.ones((5,))}}
    merged = TaskBase.load_pretrained(task, params, pretrained)
    np.testing.assert_array_equal(merged["encoder"]["kernel"], np.full((2, 3), 7.0))
    np.testing.assert_array_equal(merged["head"]["kernel"], np.zeros((3, 4)))
    assert merged["encoder"]["kernel"].dtype == np.float32
    assert len(lines) == 1 and "1 of 2 params" in lines[0] and "head/kernel (missing)" in lines[0]


def test_a_source_of_which_nothing_fits_is_an_error():
    task, _ = _task()
    params = {"encoder": {"kernel": np.zeros((2, 3), np.float32)}}
    with pytest.raises(ValueError, match=r"none of the 1 params fit.*encoder/kernel \(shape \(3, 2\)"):
        TaskBase.load_pretrained(task, params, {"encoder": {"kernel": np.zeros((3, 2))}})
