import numpy as np

from medjax.checkpoint import merge_params


def test_merge_params_takes_matching_leaves_and_names_the_rest():
    params = {"a": {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}, "c": np.zeros(4, np.float32)}
    source = {"a": {"w": np.ones((2, 3)), "b": np.ones(5)}}
    merged, skipped = merge_params(params, source)
    np.testing.assert_array_equal(merged["a"]["w"], np.ones((2, 3)))
    assert merged["a"]["w"].dtype == np.float32
    np.testing.assert_array_equal(merged["a"]["b"], np.zeros(3))
    np.testing.assert_array_equal(merged["c"], np.zeros(4))
    assert sorted(skipped) == ["a/b (shape (5,) vs (3,))", "c (missing)"]
