"""The one Universal Model predictor: settings from the experiment config, probabilities, masks with and
without post-processing, and the task / `predict_masks` going through it."""
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import config as config_lib
from medjax.inference import universal_eval
from medjax.inference.universal_predictor import InferenceSettings, UniversalPredictor, predict_masks


def liver_logits(scale, x):
    """A "model": liver logit +scale where the voxel is 1, -scale where 0; every other class -5."""
    logits = jnp.full(x.shape[:4] + (32,), -5.0)
    return logits.at[..., 5].set(scale * (2 * x[..., 0] - 1))


def volume_with_stray_voxel():
    volume = np.zeros((12, 12, 12), np.float32)
    volume[2:8, 2:8, 2:8] = 1.0
    volume[11, 11, 11] = 1.0  # a second, one-voxel liver component
    return volume


def test_settings_come_from_the_experiment_config():
    config = config_lib.get_config("universal_swin", "tiny", ["eval.overlap=0.25", "eval.threshold=0.4"])
    settings = InferenceSettings.from_config(config, batch_size=3)
    assert settings == InferenceSettings(window=(32, 32, 32), overlap=0.25, mode="gaussian", sigma_scale=0.125,
                                         batch_size=3, threshold=0.4, post_process=True)
    with pytest.raises(ValueError, match=r"overlap \(config eval.overlap, .*\) must be in \[0, 1\), got 1.0"):
        InferenceSettings(overlap=1.0)
    with pytest.raises(ValueError, match=r"batch_size \(config eval.sw_batch_size, .*\) must be >= 1, got 0"):
        InferenceSettings.from_config(config, batch_size=0)


def test_probabilities_and_masks():
    volume = volume_with_stray_voxel()
    settings = InferenceSettings(window=(8, 8, 8), batch_size=2, threshold=0.5)
    predictor = UniversalPredictor(liver_logits, (jnp.float32(2.0),), settings)
    probs = predictor.probabilities(volume)
    assert probs.shape == (12, 12, 12, 32) and probs.dtype == np.float32
    # every window gives the same per-voxel logit, so the blend is exact: sigmoid(+-2), sigmoid(-5)
    np.testing.assert_allclose(probs[..., 5], np.where(volume > 0, 1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(2.0))),
                               rtol=1e-5)
    np.testing.assert_allclose(probs[..., 0], 1 / (1 + np.exp(5.0)), rtol=1e-5)
    masks = predictor.masks(volume, classes=(6,))
    box = np.zeros(volume.shape, bool)
    box[2:8, 2:8, 2:8] = True
    np.testing.assert_array_equal(masks[..., 5], box)  # the stray voxel removed: the liver's largest component
    assert masks.sum() == box.sum()
    raw = UniversalPredictor(liver_logits, (jnp.float32(2.0),),
                             InferenceSettings(window=(8, 8, 8), batch_size=2, post_process=False)).masks(volume)
    np.testing.assert_array_equal(raw[..., 5], volume > 0)
    assert raw.sum() == 6 ** 3 + 1
    high = UniversalPredictor(liver_logits, (jnp.float32(2.0),),
                              InferenceSettings(window=(8, 8, 8), batch_size=2, threshold=0.9)).masks(volume)
    assert not high.any()  # sigmoid(2) = 0.88 < 0.9
    assert not UniversalPredictor(liver_logits, (jnp.float32(0.0),), settings).masks(volume).any()  # 0.5: not > 0.5
    assert universal_eval.predict_masks is predict_masks  # the old import path keeps working
    np.testing.assert_array_equal(predict_masks(liver_logits, volume, jnp.float32(2.0), classes=(6,), window=(8, 8, 8),
                                                batch_size=2), masks)
    with pytest.raises(ValueError, match=r"volume must be \(X, Y, Z\) or \(X, Y, Z, 1\), got shape \(12, 12\)"):
        predictor.masks(np.zeros((12, 12)))
