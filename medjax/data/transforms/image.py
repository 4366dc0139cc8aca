"""Per-image fundus transforms in numpy/PIL (MRM, Yang et al., ICCV 2023, Sec. 4.1).

MRM reuses ContIG's (Taleb et al., CVPR 2022) fundus pipeline: crop to the circular field of
view, resize, then for training RandomRotation(20) + RandomHorizontalFlip, and ImageNet mean/std
normalisation. Images are uint8 (H, W, 3) arrays; random choices come from a passed
`np.random.Generator`, so a seeded pipeline is reproducible in any worker process.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array((0.485, 0.456, 0.406), dtype=np.float32)
IMAGENET_STD = np.array((0.229, 0.224, 0.225), dtype=np.float32)


def _check_uint8_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 3)):
        raise ValueError(f"{name} must be uint8 (H, W) or (H, W, 3), got {image.dtype} {image.shape}")
    return image


def circle_crop(image: np.ndarray, *, threshold: float = 10.0) -> np.ndarray:
    """Crop a fundus photograph to its circular field of view.

    The field of view is the set of pixels whose channel mean exceeds `threshold`; the output is
    the square of side D = max(bounding-box height, width) centred on the bounding box (so a
    circle clipped at the top and bottom of the photo keeps its full diameter; parts outside the
    photo are black), with everything outside the inscribed circle set to 0. An all-black image
    is treated as all field of view. (ContIG found the circle with a Hough transform and cropped
    its bounding square; this threshold version needs no OpenCV.)
    """
    image = _check_uint8_image(image)
    gray = image.mean(axis=-1) if image.ndim == 3 else image.astype(np.float32)
    rows = np.flatnonzero((gray > threshold).any(axis=1))
    cols = np.flatnonzero((gray > threshold).any(axis=0))
    if rows.size == 0:
        rows, cols = np.arange(image.shape[0]), np.arange(image.shape[1])
    r0, r1, c0, c1 = rows[0], rows[-1], cols[0], cols[-1]
    side = int(max(r1 - r0 + 1, c1 - c0 + 1))
    top = int(np.floor((r0 + r1 - (side - 1)) / 2))
    left = int(np.floor((c0 + c1 - (side - 1)) / 2))
    out = np.zeros((side, side) + image.shape[2:], dtype=np.uint8)
    src_r0, src_r1 = max(top, 0), min(top + side, image.shape[0])
    src_c0, src_c1 = max(left, 0), min(left + side, image.shape[1])
    out[src_r0 - top:src_r1 - top, src_c0 - left:src_c1 - left] = image[src_r0:src_r1, src_c0:src_c1]
    centre = (side - 1) / 2
    yy, xx = np.ogrid[:side, :side]
    outside = (yy - centre) ** 2 + (xx - centre) ** 2 > (side / 2) ** 2
    out[outside] = 0
    return out


def resize(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear resize (PIL) to `size` x `size`, or to (height, width) when size is a pair."""
    image = _check_uint8_image(image)
    height, width = (size, size) if isinstance(size, int) else size
    if image.shape[:2] == (height, width):
        return image.copy()
    squeeze = image.ndim == 3 and image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    out = np.asarray(pil.resize((width, height), resample=Image.Resampling.BILINEAR))
    return out[..., None] if squeeze else out


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate counter-clockwise by `degrees` about the image centre; nearest-neighbour, black fill
    (torchvision `RandomRotation` defaults: same size, no expansion)."""
    image = _check_uint8_image(image)
    if degrees % 360 == 0:
        return image.copy()
    squeeze = image.ndim == 3 and image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    fill = 0 if pil.mode == "L" else (0, 0, 0)
    out = np.asarray(pil.rotate(degrees, resample=Image.Resampling.NEAREST, expand=False, fillcolor=fill))
    return out[..., None] if squeeze else out


def random_rotation(image: np.ndarray, degrees: float, rng: np.random.Generator) -> np.ndarray:
    """torchvision RandomRotation(degrees): an angle uniform in [-degrees, degrees]."""
    if degrees < 0:
        raise ValueError(f"rotation degrees must be >= 0, got {degrees}")
    return rotate(image, float(rng.uniform(-degrees, degrees)))


def random_hflip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Mirror left-right with probability p (torchvision RandomHorizontalFlip)."""
    image = np.asarray(image)
    return np.ascontiguousarray(image[:, ::-1]) if rng.random() < p else image


def normalize_imagenet(image_uint8: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float32 (x / 255 - mean) / std with the ImageNet statistics."""
    image = _check_uint8_image(image_uint8)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"ImageNet normalisation needs an RGB (H, W, 3) image, got {image.shape}")
    return ((image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def fundus_train_transform(image_uint8: np.ndarray, rng: np.random.Generator, *, rotation: float = 20.0,
                           hflip: bool = True) -> np.ndarray:
    """Training augmentation of a cropped, resized fundus image: RandomRotation(rotation),
    RandomHorizontalFlip (if hflip), ImageNet normalisation. Returns float32 (H, W, 3)."""
    image = random_rotation(image_uint8, rotation, rng) if rotation > 0 else _check_uint8_image(image_uint8)
    if hflip:
        image = random_hflip(image, rng)
    return normalize_imagenet(image)


def fundus_eval_transform(image_uint8: np.ndarray) -> np.ndarray:
    """Evaluation transform: ImageNet normalisation only. Returns float32 (H, W, 3)."""
    return normalize_imagenet(image_uint8)
