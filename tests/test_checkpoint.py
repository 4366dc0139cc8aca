import numpy as np
import pytest

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


def test_save_params_round_trip(tmp_path):
    """Converted weights written by save_params come back through restore_params (what init=, --params and
    evaluate read), and a second save to the same place is refused rather than mixing two trees."""
    from medjax import checkpoint as checkpoint_lib

    params = {"encoder": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, "bias": np.ones(3, np.float32)}
    checkpoint_lib.save_params(str(tmp_path / "converted"), params)
    restored = checkpoint_lib.restore_params(str(tmp_path / "converted"))
    np.testing.assert_array_equal(restored["encoder"]["kernel"], params["encoder"]["kernel"])
    np.testing.assert_array_equal(restored["bias"], params["bias"])
    with pytest.raises(FileExistsError, match="already exists"):
        checkpoint_lib.save_params(str(tmp_path / "converted"), params)
