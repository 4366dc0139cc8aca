"""Features of tiles from a frozen encoder for UNI's evaluation (Chen et al., Nat. Med. 2024): tiles read and
transformed as UNI's eval transform (resize to `image_size`, ImageNet normalisation), batched through a
`feature_fn` (images (b, H, W, 3) float32 -> (b, D)); CLAM-layout feature bags written by `python -m medjax.extract`;
the feature function of a converted UNI encoder (its CLS feature)."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax.data.transforms.image import normalize_imagenet, resize
from medjax.errors import MedjaxInputError
from medjax.models.uni import uni_fields_from_params, uni_model

FeatureFn = Callable[[np.ndarray], Any]


def tile_transform(image_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 tile (H, W, 3) -> float32 (image_size, image_size, 3): bilinear resize + ImageNet normalisation."""
    return lambda tile: normalize_imagenet(resize(tile, image_size))


def extract_features(feature_fn: FeatureFn, tiles: Iterable[np.ndarray], batch_size: int) -> np.ndarray:
    """Features (N, D) float32 of the images from `tiles` (each (H, W, 3) float32, ImageNet-normalised), in
    order. Every call of `feature_fn` gets a full batch of `batch_size` (the last one padded), so a jitted
    feature_fn compiles once; results are fetched a few batches late, so the accelerator keeps working while
    the host reads the next tiles."""
    if batch_size < 1:
        raise MedjaxInputError(f"extract_features: batch_size must be >= 1, got {batch_size}")
    out, batch, pending = [], [], []

    def fetch(keep: int):
        while len(pending) > keep:
            features, rows = pending.pop(0)
            features = np.asarray(features, np.float32)
            if features.ndim != 2 or features.shape[0] != batch_size:
                raise MedjaxInputError(f"feature_fn must map (b, H, W, 3) to (b, D); got {features.shape} for b = {batch_size}")
            out.append(features[:rows])

    def flush():
        rows = len(batch)
        images = np.stack(batch + [batch[-1]] * (batch_size - rows)).astype(np.float32)
        pending.append((feature_fn(images), rows))  # dispatched asynchronously by a jitted feature_fn
        batch.clear()
        fetch(keep=2)

    for image in tiles:
        batch.append(np.asarray(image))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    fetch(keep=0)
    if not out:
        raise MedjaxInputError("extract_features: no tiles")
    return np.concatenate(out)


def source_images(source: Sequence[dict], image_size: int, threads: int = 4) -> Iterable[np.ndarray]:
    """The transformed images of a tile source in order, read by `threads` threads (a window at a time)."""
    transform = tile_transform(image_size)
    load = lambda i: transform(source[i]["image"])  # noqa: E731
    window = max(threads, 1) * 16
    with ThreadPoolExecutor(max(threads, 1)) as pool:
        for start in range(0, len(source), window):
            yield from pool.map(load, range(start, min(start + window, len(source))))


def source_features(feature_fn: FeatureFn, source: Sequence[dict], settings) -> np.ndarray:
    """Features (N, D) of a tile source's images, read and batched as `settings` (a `uni_eval` block) says."""
    return extract_features(feature_fn, source_images(source, settings.image_size, settings.read_threads),
                            settings.batch_size)


def read_feature_bags(features_dir: str, slide_ids: Sequence[str], where: str) -> list[np.ndarray]:
    """Per slide the (N, D) float32 `features` of `<features_dir>/h5_files/<slide_id>.h5` (CLAM's
    extract_features_fp layout, `python -m medjax.extract`); a missing file is an error naming `where`."""
    import h5py

    bags = []
    for sid in slide_ids:
        path = os.path.join(features_dir, "h5_files", f"{sid}.h5")
        if not os.path.isfile(path):
            raise MedjaxInputError(f"{where}: slide {sid!r} has no features file {path} (run python -m medjax.extract)")
        with h5py.File(path, "r") as handle:
            if "features" not in handle:
                raise MedjaxInputError(f"{path}: no dataset 'features' (expected CLAM's layout: features, coords)")
            bags.append(np.asarray(handle["features"][()], np.float32))
    return bags


def uni_feature_fn(params: Any, *, dtype: Any = jnp.float32, **overrides) -> FeatureFn:
    """feature_fn of UNI's encoder (`medjax.models.uni.UNIEncoder`) for params converted by `medjax.convert.uni`
    ({"encoder": ...}, optionally under "params", as `medjax.checkpoint.restore_params` returns them): images
    -> the 1024-d CLS feature. The architecture is read off the params' shapes; `overrides` replace fields."""
    params = nn.unbox(params.get("params", params))
    if "encoder" not in params:
        raise MedjaxInputError(f"uni_feature_fn: expected converted UNI params with an 'encoder' subtree, got keys "
                         f"{sorted(params)}")
    model = uni_model(dtype=dtype, **{**uni_fields_from_params(params), **overrides})
    apply = jax.jit(lambda p, images: model.apply({"params": p}, images).astype(jnp.float32))
    params = jax.device_put({"encoder": params["encoder"]})  # converted DINOv2 heads are not part of the feature
    return lambda images: apply(params, jnp.asarray(images))
