"""CT volumes from NIfTI: RAS orientation, isotropic resampling, HU windowing (CLIP-Driven Universal
Model, Liu et al., ICCV 2023, arXiv 2301.00785, and its code: RAS, 1.5 mm spacing, HU clipped to
[-175, 250] and scaled to [0, 1]).

`load_ct(path)` equals MONAI's `LoadImage` -> `Orientation("RAS")` -> `Spacing(pixdim,
mode="bilinear")` -> `ScaleIntensityRange(a_min, a_max, 0, 1, clip=True)` on the same file, the
original's preprocessing (MONAI >= 1.0 defaults: border padding, align_corners=False, float64
resampling, output grid from `compute_shape_offset`). The output grid rule, as MONAI's:
- the target spacing replaces the column norms of the RAS affine, keeping its rotation (the
  Cholesky split of `zoom_affine(diagonal=False)`); an axis already within 1e-3 mm of the target
  keeps its own spacing;
- the input corner voxels (0 and n-1 on each axis) mapped into the new voxel grid span
  `ptp`; the output shape is `round(ptp + 1)` (numpy's round, halves to even);
- the new origin is the world position of the input corner that is smallest in every output
  axis (for an axis-aligned RAS image: voxel (0, 0, 0)); an oblique image without such a corner is
  centred on the input instead;
- values are sampled at `inv(A_in) @ A_out @ j`, linearly (labels: nearest, halves to even) with
  coordinates clamped to the volume (border padding); when the new grid equals the old one within
  1e-3 the data are returned unresampled.

Volumes are float32 indexed [x, y, z] with x towards the patient's right, y anterior, z superior
(nibabel's RAS+ world); labels uint8. Every bad input raises `CTDataError` naming the file.

Label on air (`load_ct_pair`, `check_label_on_body`): a label whose organs lie where the image is air
is a mismatched pair (the wrong image, a flipped or shifted label, an image stored without its
rescale slope/intercept). On the resampled grid, before the HU window (which would clip air and fat
alike to 0), the voxels labelled with a solid-organ / vessel / tumour class are counted; if more than
AIR_LABEL_FRACTION (50%) of them are below AIR_HU (-900 HU: air is -1000, lung parenchyma about -850
to -700, fat -100, soft tissue 0 to 100), the pair is refused, naming both files, the fraction and the
class most affected. The lungs (classes 16, 17) are air-filled and are not counted; a pair with only
lung labels is not checked. Pass `check_air=False` to skip the check.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from medjax.errors import MedjaxInputError

DEFAULT_SPACING = (1.5, 1.5, 1.5)  # mm, the paper's isotropic resampling
DEFAULT_HU_RANGE = (-175.0, 250.0)  # HU window of the paper, scaled to [0, 1]
AFFINE_TOL = 1e-3  # MONAI's AFFINE_TOL: spacing / grid equality tolerance (mm)
LABEL_AFFINE_TOL = 1e-3  # a label's affine must equal its image's within this (mm)
AIR_HU = -900.0  # below this a voxel is air (module docstring: label on air)
AIR_LABEL_FRACTION = 0.5  # more labelled voxels than this on air: a mismatched image/label pair
AIR_FILLED_CLASSES = (16, 17)  # right / left lung (ct_templates): labelled air, not checked


class CTDataError(MedjaxInputError):
    """A CT file is missing or malformed; the message names the file and what was expected."""


def _open_nifti(path: str) -> tuple[nib.Nifti1Image, tuple[int, int, int], np.ndarray]:
    """(lazy image, spatial shape, affine) of a NIfTI file, every bad case a CTDataError naming it."""
    if not os.path.isfile(path):
        raise CTDataError(f"{path}: file not found")
    try:
        image = nib.load(path)
    except Exception as e:  # nibabel raises ImageFileError, HeaderDataError, OSError, ...
        raise CTDataError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise CTDataError(f"{path}: a {type(image).__name__}, expected a NIfTI-1/2 image (.nii or .nii.gz)")
    affine = np.asarray(image.affine, dtype=np.float64)
    _check_affine(affine, path)
    return image, _spatial_shape(image.shape, path), affine


def read_nifti(path: str, dtype: np.dtype | type | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The voxel array (scaling applied, as `dtype` if given, else nibabel's; trailing singleton axes
    dropped) and the 4x4 voxel->world affine (nibabel's `img.affine`: sform, else qform, else the
    pixdims) of a NIfTI file."""
    image, shape, affine = _open_nifti(path)
    try:
        data = np.asanyarray(image.dataobj) if dtype is None else np.asarray(image.dataobj, dtype=dtype)
    except Exception as e:  # truncated or corrupt payload
        raise CTDataError(f"{path}: cannot read the voxel data ({type(e).__name__}: {e})") from e
    return data.reshape(shape), affine


def read_nifti_header(path: str) -> tuple[tuple[int, int, int], np.ndarray]:
    """(spatial shape, affine) of a NIfTI file without reading its voxels."""
    return _open_nifti(path)[1:]


def _spatial_shape(shape: Sequence[int], path: str) -> tuple[int, int, int]:
    squeezed = tuple(shape)
    while len(squeezed) > 3 and squeezed[-1] == 1:
        squeezed = squeezed[:-1]
    if len(squeezed) != 3 or min(squeezed) < 1:
        raise CTDataError(f"{path}: image has shape {tuple(shape)}; expected a 3D volume (X, Y, Z) "
                          "(trailing axes of size 1 are allowed)")
    return squeezed  # type: ignore[return-value]


def _check_affine(affine: np.ndarray, path: str) -> None:
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise CTDataError(f"{path}: affine {affine.tolist()} is not a finite 4x4 matrix")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise CTDataError(f"{path}: affine {affine.tolist()} is singular (a zero voxel size or collapsed axes)")


def reorient_to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip/transpose the voxel axes so they point right, anterior, superior (the closest axes for
    an oblique affine, `nibabel.io_orientation`), and the matching affine (MONAI `Orientation("RAS")`)."""
    ornt = nib.orientations.ornt_transform(nib.io_orientation(affine), nib.orientations.axcodes2ornt("RAS"))
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return data, affine
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)
    return nib.orientations.apply_orientation(data, ornt), new_affine


def spacing_grid(shape: Sequence[int], affine: np.ndarray,
                 spacing: Sequence[float]) -> tuple[tuple[int, int, int], np.ndarray]:
    """The (shape, affine) of the grid MONAI's `Spacing(pixdim=spacing)` resamples onto (see the module
    docstring): MONAI `zoom_affine(diagonal=False)` + `compute_shape_offset(scale_extent=False)`."""
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (3,) or not (spacing > 0).all():
        raise ValueError(f"spacing must be three positive numbers (mm), got {spacing.tolist()}")
    linear = affine[:3, :3]
    current = np.sqrt((linear * linear).sum(axis=0))
    target = np.where(np.abs(current - spacing) <= AFFINE_TOL, current, spacing)
    upper = np.linalg.cholesky(linear.T @ linear).T  # linear = rotation @ upper (upper: zooms + shears)
    rotation = linear @ np.linalg.inv(upper)
    out_affine = np.eye(4)
    out_affine[:3, :3] = rotation @ np.diag(np.sign(np.diag(upper)) * target)

    in_shape = np.asarray(shape, dtype=np.float64)
    corners = np.stack(np.meshgrid(*[(0.0, n - 1.0) for n in in_shape], indexing="ij")).reshape(3, -1)
    corners = np.concatenate([corners, np.ones((1, corners.shape[1]))])
    in_out = np.linalg.solve(out_affine, affine) @ corners  # input corners in output voxel units
    out_shape = np.round(np.ptp(in_out[:3], axis=1) + 1.0)
    world = affine @ corners
    offset = None
    for i in range(corners.shape[1]):  # a corner that is the smallest along every output axis
        if np.allclose(np.min(in_out[:3] - in_out[:3, i:i + 1], axis=1), 0.0, rtol=AFFINE_TOL):
            offset = world[:3, i]
            break
    if offset is None:  # oblique: centre the output grid on the input
        offset = linear @ (in_shape / 2.0) + affine[:3, 3] - out_affine[:3, :3] @ (out_shape / 2.0)
    out_affine[:3, 3] = offset
    return tuple(int(n) for n in out_shape), out_affine  # type: ignore[return-value]


def resample(data: np.ndarray, affine: np.ndarray, dst_shape: Sequence[int], dst_affine: np.ndarray, *,
             order: int) -> np.ndarray:
    """`data` (voxel->world `affine`) sampled on the grid (`dst_shape`, `dst_affine`): trilinear
    (order 1, float32 out) or nearest (order 0, halves to even, dtype kept), coordinates clamped to
    the volume (MONAI `SpatialResample`, border padding, align_corners=False). The same grid within
    1e-3 returns `data` unchanged."""
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order}")
    dst_shape = tuple(int(n) for n in dst_shape)
    xform = np.linalg.solve(affine, dst_affine)  # destination voxel -> source voxel
    same_grid = dst_shape == tuple(data.shape) and (
        np.allclose(affine, dst_affine, atol=AFFINE_TOL) or np.allclose(xform, np.eye(4), atol=AFFINE_TOL))
    if same_grid:
        return data.astype(np.float32, copy=False) if order == 1 else data
    linear, shift = xform[:3, :3], xform[:3, 3]
    axis_aligned = np.count_nonzero(linear - np.diag(np.diag(linear))) == 0
    if order == 1 and axis_aligned:  # separable: one 1D linear interpolation per axis, float32
        out = data.astype(np.float32, copy=False)
        for axis in range(3):
            coord = np.clip(linear[axis, axis] * np.arange(dst_shape[axis]) + shift[axis], 0, data.shape[axis] - 1)
            low = np.floor(coord).astype(np.intp)
            weight = (coord - low).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
            below = np.take(out, low, axis=axis)
            above = np.take(out, np.minimum(low + 1, data.shape[axis] - 1), axis=axis)
            above -= below
            above *= weight
            below += above
            out = below
        return out
    if order == 1:
        out = ndimage.affine_transform(data.astype(np.float64, copy=False), linear, offset=shift,
                                       output_shape=dst_shape, order=1, mode="nearest", prefilter=False)
        return out.astype(np.float32)
    if axis_aligned:  # separable: one rounded index vector per axis
        index = [np.clip(np.rint(np.diag(linear)[a] * np.arange(dst_shape[a]) + shift[a]), 0, data.shape[a] - 1)
                 .astype(np.intp) for a in range(3)]
        return data[np.ix_(*index)]
    out = np.empty(dst_shape, dtype=data.dtype)
    grid_yz = np.stack(np.meshgrid(np.arange(dst_shape[1]), np.arange(dst_shape[2]), indexing="ij")).reshape(2, -1)
    limit = np.asarray(data.shape)[:, None] - 1
    for x in range(dst_shape[0]):  # one slab at a time bounds the memory of the coordinates
        points = np.concatenate([np.full((1, grid_yz.shape[1]), x), grid_yz])
        coords = np.clip(np.rint(linear @ points + shift[:, None]), 0, limit).astype(np.intp)
        out[x] = data[coords[0], coords[1], coords[2]].reshape(dst_shape[1:])
    return out


def scale_intensity(volume: np.ndarray, hu_range: Sequence[float]) -> np.ndarray:
    """HU clipped to `hu_range` and mapped linearly to [0, 1], float32 (MONAI `ScaleIntensityRange`
    with b_min=0, b_max=1, clip=True)."""
    low, high = (float(v) for v in hu_range)
    if not high > low:
        raise ValueError(f"hu_range must be (low, high) with low < high, got {tuple(hu_range)}")
    scaled = (volume.astype(np.float32, copy=False) - np.float32(low)) / np.float32(high - low)
    return np.clip(scaled, 0.0, 1.0, out=scaled)


def _load_ct_hu(path: str, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(HU volume float32 on the resampled RAS grid, its affine): `load_ct` before the HU window."""
    volume, affine = read_nifti(path, np.float32)  # MONAI LoadImage's dtype
    if not np.isfinite(volume).all():
        bad = np.argwhere(~np.isfinite(volume))
        raise CTDataError(f"{path}: {len(bad)} non-finite voxel(s) (NaN/inf), first at voxel {bad[0].tolist()}")
    volume, affine = reorient_to_ras(volume, affine)
    shape, new_affine = spacing_grid(volume.shape, affine, spacing)
    return resample(volume, affine, shape, new_affine, order=1), new_affine


def load_ct(path: str, *, spacing: Sequence[float] = DEFAULT_SPACING,
            hu_range: Sequence[float] = DEFAULT_HU_RANGE) -> tuple[np.ndarray, np.ndarray]:
    """(volume float32 [x, y, z] in [0, 1], RAS affine of the resampled grid) of a CT NIfTI file."""
    volume, affine = _load_ct_hu(path, spacing)
    return scale_intensity(volume, hu_range), affine


def check_label_on_body(hu: np.ndarray, label: np.ndarray, image_path: str, label_path: str) -> None:
    """CTDataError when more than AIR_LABEL_FRACTION of the voxels labelled with a non-lung class
    have HU < AIR_HU (module docstring); `hu` and `label` on the same grid."""
    checked = (label > 0) & ~np.isin(label, AIR_FILLED_CLASSES)
    total = int(np.count_nonzero(checked))
    if total == 0:
        return
    air = checked & (hu < AIR_HU)
    on_air = int(np.count_nonzero(air))
    if on_air <= AIR_LABEL_FRACTION * total:
        return
    per_class = np.bincount(label[air], minlength=256)
    worst = int(np.argmax(per_class))
    raise CTDataError(
        f"{label_path}: {on_air} of {total} labelled voxels ({100 * on_air / total:.0f}%; lungs not counted) lie "
        f"where its image {image_path} is air (< {AIR_HU:g} HU), more than {100 * AIR_LABEL_FRACTION:.0f}%: the "
        f"label does not belong to this image, is flipped or shifted, or the image lacks its HU rescaling "
        f"(class {worst}: {int(per_class[worst])} voxels on air; image HU range "
        f"[{float(hu.min()):g}, {float(hu.max()):g}])")


def check_label_grid(label_path: str, image_path: str) -> None:
    """CTDataError unless a label's stored shape and affine equal its image's (affine within
    LABEL_AFFINE_TOL); reads the headers only."""
    shape, affine = read_nifti_header(label_path)
    ref_shape, ref_affine = read_nifti_header(image_path)
    if shape != ref_shape:
        raise CTDataError(f"{label_path}: label shape {shape} does not match its image {image_path} shape {ref_shape}")
    if not np.allclose(affine, ref_affine, atol=LABEL_AFFINE_TOL, rtol=0):
        raise CTDataError(f"{label_path}: label affine {np.round(affine, 4).tolist()} does not match its image "
                          f"{image_path} affine {np.round(ref_affine, 4).tolist()} (tolerance {LABEL_AFFINE_TOL} mm)")


def load_ct_label(path: str, *, spacing: Sequence[float] = DEFAULT_SPACING,
                  reference: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(label uint8 [x, y, z], affine) of a label NIfTI file on the grid `load_ct` gives its image
    (nearest-neighbour resampling keeps the label values). With `reference` (the image's path) the
    label's stored shape and affine must equal the image's."""
    if reference is not None:
        check_label_grid(path, reference)
    data, affine = read_nifti(path)
    label = _label_values(data, path)
    label, affine = reorient_to_ras(label, affine)
    shape, new_affine = spacing_grid(label.shape, affine, spacing)
    return resample(label, affine, shape, new_affine, order=0), new_affine


def _label_values(data: np.ndarray, path: str) -> np.ndarray:
    if data.dtype in (np.uint8, np.bool_):
        return data.astype(np.uint8, copy=False)
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            bad = np.argwhere(~finite)
            raise CTDataError(f"{path}: {len(bad)} non-finite label voxel(s), first at voxel {bad[0].tolist()}")
        if not (data == np.round(data)).all():
            raise CTDataError(f"{path}: label values must be integers (class indices), found fractional values")
    elif data.dtype.kind not in "iub":
        raise CTDataError(f"{path}: label voxels have dtype {data.dtype}; expected integer class indices")
    low, high = data.min(), data.max()
    if low < 0 or high > 255:
        raise CTDataError(f"{path}: label values span [{low}, {high}]; expected class indices in [0, 255]")
    return data.astype(np.uint8)


def load_ct_pair(image_path: str, label_path: str, *, spacing: Sequence[float] = DEFAULT_SPACING,
                 hu_range: Sequence[float] = DEFAULT_HU_RANGE,
                 check_air: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(volume float32, label uint8, affine) of an image and its label on the same resampled RAS grid;
    with `check_air`, a label whose organs lie on air is refused (`check_label_on_body`)."""
    label, label_affine = load_ct_label(label_path, spacing=spacing, reference=image_path)
    volume, affine = _load_ct_hu(image_path, spacing)
    if volume.shape != label.shape or not np.allclose(affine, label_affine, atol=LABEL_AFFINE_TOL):
        raise CTDataError(f"{label_path}: resampled label grid {label.shape} differs from its image {image_path} "
                          f"grid {volume.shape}")
    if check_air:
        check_label_on_body(volume, label, image_path, label_path)
    return scale_intensity(volume, hu_range), label, affine


def save_nifti(path: str, data: np.ndarray, affine: np.ndarray) -> None:
    """Write `data` [x, y, z] with voxel->world `affine` as NIfTI-1 (.nii or .nii.gz); the affine is
    stored as both sform and qform (code 1, scanner), so readers using either get it back."""
    image = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    nib.save(image, path)
