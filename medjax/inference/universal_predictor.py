"""The one whole-volume predictor of the CLIP-Driven Universal Model (Liu et al., ICCV 2023, arXiv
2301.00785; the original's `test.py` / `pred_pseudo.py`), used by the task's `evaluate`, `medjax.predict` and
`universal_eval.predict_masks`: sliding windows of the training crop size (96^3), overlap 0.5, Gaussian
weighting (`medjax.inference.sliding_window`), sigmoid > 0.5, then the original's post-processing
(`medjax.inference.postprocess`); settings from an experiment's `data.crop_size` and `eval` block."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from medjax.inference.postprocess import organ_post_process
from medjax.inference.sliding_window import sliding_window_inference
from medjax.ontology import universal_classes

ALL_CLASSES = tuple(range(1, universal_classes.NUM_CLASSES + 1))
_WHERE = "medjax/inference/universal_predictor.py"


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
    """Sliding-window and thresholding settings (defaults: the paper's)."""
    window: tuple = (96, 96, 96)  # the training crop size; None or <= 0 on an axis: the volume's size
    overlap: float = 0.5
    mode: str = "gaussian"  # importance weighting of the windows: "gaussian" or "constant"
    sigma_scale: float = 0.125
    batch_size: int = 4  # windows per forward pass (MONAI sw_batch_size); the result does not depend on it
    threshold: float = 0.5  # sigmoid probability above which a voxel is in the class
    post_process: bool = True  # the original's organ_post_process

    def __post_init__(self):
        for field, where, ok, expected in (
                ("overlap", "config eval.overlap, predict --overlap", 0.0 <= self.overlap < 1.0, "in [0, 1)"),
                ("batch_size", "config eval.sw_batch_size, predict --batch-size", self.batch_size >= 1, ">= 1"),
                ("threshold", "config eval.threshold", 0.0 <= self.threshold < 1.0, "in [0, 1)")):
            if not ok:
                raise ValueError(f"{_WHERE}: {field} ({where}) must be {expected}, got {getattr(self, field)}")

    @classmethod
    def from_config(cls, config, **overrides: Any) -> "InferenceSettings":
        """The settings of a Universal Model experiment config; `overrides` replace single fields."""
        e = config.eval
        settings = dict(window=tuple(int(s) for s in config.data.crop_size), overlap=float(e.overlap),
                        batch_size=int(e.sw_batch_size), threshold=float(e.threshold),
                        post_process=bool(e.post_process))
        return cls(**{**settings, **overrides})


@dataclasses.dataclass(frozen=True)
class UniversalPredictor:
    """A preprocessed volume (X, Y, Z) or (X, Y, Z, 1) -> per-class probabilities or masks.

    `apply_fn(*args, windows)` maps windows (b, wx, wy, wz, 1) to logits (b, wx, wy, wz, 32); `args` go
    through the jit as arguments, e.g. `UniversalPredictor(model.apply, (variables,), settings)` with
    `variables = {"params": ..., "constants": {"organ_embedding": class text embeddings}}`. The model
    compiles once per window/batch shape for an equal `apply_fn` (`sliding_window.compiled_forward`)."""
    apply_fn: Callable
    args: tuple
    settings: InferenceSettings = InferenceSettings()

    def logits(self, volume: Any) -> jax.Array:
        """float32 (X, Y, Z, 32) blended window logits, on device."""
        volume = jnp.asarray(volume)
        if volume.ndim == 3:
            volume = volume[..., None]
        if volume.ndim != 4 or volume.shape[-1] != 1:
            raise ValueError(f"{_WHERE}: volume must be (X, Y, Z) or (X, Y, Z, 1), got shape {volume.shape}")
        s = self.settings
        return sliding_window_inference(self.apply_fn, volume, *self.args, window=s.window, overlap=s.overlap,
                                        mode=s.mode, sigma_scale=s.sigma_scale, batch_size=s.batch_size)

    def probabilities(self, volume: Any) -> np.ndarray:
        """float32 (X, Y, Z, 32) sigmoid probabilities per class."""
        return np.asarray(jax.device_get(jax.nn.sigmoid(self.logits(volume))))

    def masks(self, volume: Any, classes: Iterable[int] = ALL_CLASSES) -> np.ndarray:
        """bool (X, Y, Z, 32): probability > threshold (on device), then, with `post_process`, the
        original's post-processing for the 1-based `classes` (unlisted classes empty); without it the
        thresholded masks of every class."""
        masks = np.asarray(jax.device_get(jax.nn.sigmoid(self.logits(volume)) > self.settings.threshold))
        return organ_post_process(masks, classes) if self.settings.post_process else masks


def predict_masks(apply_fn: Callable, volume: np.ndarray, *args: Any, classes: Iterable[int] = ALL_CLASSES,
                  window: Sequence[int] = (96, 96, 96), overlap: float = 0.5, mode: str = "gaussian",
                  sigma_scale: float = 0.125, batch_size: int = 4, threshold: float = 0.5) -> np.ndarray:
    """bool (X, Y, Z, 32) post-processed masks of one preprocessed volume: `UniversalPredictor(apply_fn,
    args, InferenceSettings(...)).masks(volume, classes)`."""
    settings = InferenceSettings(window=tuple(window), overlap=overlap, mode=mode, sigma_scale=sigma_scale,
                                 batch_size=batch_size, threshold=threshold)
    return UniversalPredictor(apply_fn, args, settings).masks(volume, classes)
