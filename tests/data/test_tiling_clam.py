"""Tiling = CLAM, coordinate for coordinate: `medjax.data tile` against CLAM's `segmentTissue` + `process_contour`
restated with OpenCV itself (cv2, the test extra), on slides with holes, thin tissue and tissue at the slide's edge;
the contour primitives against cv2 on random masks."""
import os

import cv2
import numpy as np
import pytest
from scipy import ndimage

from medjax.data.readers.wsi import best_level_for_downsample, open_slide
from medjax.data.readers.wsi_write import write_pyramidal_tiff
from medjax.data.tiling import coords as tiling
from medjax.data.tiling.contours import contour_area, find_components, point_polygon_test
from medjax.data.tiling.tissue import PRESETS, TissueParams

GLASS, PINK = (240, 240, 240), (200, 110, 170)
PARAMS = TissueParams(min_tissue_area=0.05, min_hole_area=0.02)  # small slides: keep thin tissue and small holes


def clam_reference(path: str, params: TissueParams, tile: int, use_padding: bool = True) -> np.ndarray:
    """CLAM's create_patches_fp on one slide, with cv2 (WholeSlideImage.segmentTissue, _filter_contours,
    scaleContourDim, process_contour with isInContourV3_Easy and isInHoles), our reader for the pixels."""
    with open_slide(path) as slide:
        level = best_level_for_downsample(slide, params.mask_downsample)
        w, h = slide.level_dimensions[level]
        img = slide.read_region((0, 0), level, (w, h))
        w0, h0 = slide.level_dimensions[0]
    scale = (w0 / w, h0 / h)
    img_med = cv2.medianBlur(cv2.cvtColor(img, cv2.COLOR_RGB2HSV)[:, :, 1], params.median_size)
    _, img_otsu = cv2.threshold(img_med, params.saturation_threshold, 255, cv2.THRESH_BINARY)
    if params.close_size > 0:
        img_otsu = cv2.morphologyEx(img_otsu, cv2.MORPH_CLOSE, np.ones((params.close_size,) * 2, np.uint8))
    ref_area = int(params.reference_patch ** 2 / (scale[0] * scale[1]))
    a_t, a_h = params.min_tissue_area * ref_area, params.min_hole_area * ref_area
    contours, hierarchy = cv2.findContours(img_otsu, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:
        return np.zeros((0, 2), np.int64)
    hierarchy = np.squeeze(hierarchy, axis=(0,))[:, 2:]
    kept, kept_holes = [], []
    for idx in np.flatnonzero(hierarchy[:, 1] == -1):
        holes = np.flatnonzero(hierarchy[:, 1] == idx)
        a = cv2.contourArea(contours[idx]) - np.array([cv2.contourArea(contours[i]) for i in holes]).sum()
        if a == 0 or not a_t < a:
            continue
        kept.append(contours[idx])
        hole_list = sorted([contours[i] for i in holes], key=cv2.contourArea, reverse=True)[:params.max_holes]
        kept_holes.append([hole for hole in hole_list if cv2.contourArea(hole) > a_h])
    out = []
    for cont, holes in zip(kept, kept_holes):
        cont = np.array(cont * scale, dtype="int32")
        holes = [np.array(hole * scale, dtype="int32") for hole in holes]
        x0, y0, bw, bh = cv2.boundingRect(cont)
        stop_x, stop_y = (x0 + bw, y0 + bh) if use_padding else (min(x0 + bw, w0 - tile + 1), min(y0 + bh, h0 - tile + 1))
        shift = int(tile // 2 * 0.5)
        results = []
        for x in range(x0, stop_x, tile):
            for y in range(y0, stop_y, tile):
                cx, cy = x + tile // 2, y + tile // 2
                points = [(cx - shift, cy - shift), (cx + shift, cy + shift), (cx + shift, cy - shift), (cx - shift, cy + shift)]
                if not any(cv2.pointPolygonTest(cont, p, False) >= 0 for p in points):
                    continue
                if any(cv2.pointPolygonTest(hole, (x + tile / 2, y + tile / 2), False) > 0 for hole in holes):
                    continue
                results.append((x, y))
        if len(results) > 1:
            out += results
    return np.array(out, np.int64).reshape(-1, 2)


def _slide_pixels(kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.empty((1536, 2048, 3), np.uint8)
    image[...] = GLASS
    yy, xx = np.mgrid[0:1536, 0:2048]
    if kind == "holes":  # a ring and a slab with several holes of different sizes
        r = np.hypot(xx - 600, yy - 700)
        tissue = (r < 520) & (r > 180)
        tissue |= (xx > 1200) & (xx < 1950) & (yy > 150) & (yy < 1300)
        for cx, cy, rad in ((1400, 400, 90), (1700, 900, 140), (1500, 1100, 40), (1800, 300, 25)):
            tissue &= np.hypot(xx - cx, yy - cy) > rad
    elif kind == "thin":  # strands a few mask pixels wide, diagonal and curved, and specks
        tissue = np.abs((xx - yy * 1.3) - 200) < 28
        tissue |= np.abs(np.hypot(xx - 1500, yy - 800) - 500) < 20
        tissue |= np.abs(yy - 300 - 80 * np.sin(xx / 150)) < 16
        for _ in range(12):
            cx, cy = rng.integers(0, 2048), rng.integers(0, 1536)
            tissue |= np.hypot(xx - cx, yy - cy) < rng.integers(10, 60)
    else:  # "edge": blobs cut by the slide's borders and random texture
        noise = ndimage.gaussian_filter(rng.random((96, 128)), 3)
        tissue = np.kron(noise > np.quantile(noise, 0.55), np.ones((16, 16), bool)).astype(bool)
        tissue |= (xx > 1800) | (yy > 1400)
    image[tissue] = PINK
    image[tissue] = np.clip(image[tissue].astype(int) + rng.integers(-25, 25, (int(tissue.sum()), 3)), 0, 255)
    return image


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("clam_slides")
    paths = {}
    for seed, kind in enumerate(("holes", "thin", "edge")):
        paths[kind] = str(root / f"{kind}.tif")
        write_pyramidal_tiff(paths[kind], _slide_pixels(kind, seed), mpp=0.5, compression_level=1)
    # No pyramid: CLAM segments level 0 itself (get_best_level_for_downsample(64) = 0), and so do we
    paths["flat"] = str(root / "flat.tif")
    write_pyramidal_tiff(paths["flat"], _slide_pixels("holes", 3)[200:968, 1000:2024], mpp=0.5, downsamples=(1,),
                         compression_level=1)
    return paths


@pytest.mark.parametrize("kind", ["holes", "thin", "edge", "flat"])
def test_tile_coordinates_equal_clams_with_opencv(slides, kind, tmp_path):
    cases = ((PARAMS, True), (PRESETS["bwh_biopsy"], True), (PARAMS, False)) if kind != "flat" else ((PARAMS, True),)
    for params, padding in cases:
        params = TissueParams(**{**params.__dict__, "min_tissue_area": min(params.min_tissue_area, 0.05),
                                 "min_hole_area": min(params.min_hole_area, 0.02)})
        expected = clam_reference(slides[kind], params, 256, padding)
        result = tiling.tile_slide(slides[kind], str(tmp_path), params=params, use_padding=padding)
        coords = tiling.read_coords(result.h5_path)[0] if result.status == "ok" else np.zeros((0, 2), np.int64)
        assert len(expected) > 4 or params.median_size == 11  # the 11-px median of bwh_biopsy erases thin strands
        assert sorted(map(tuple, coords.tolist())) == sorted(map(tuple, expected.tolist())), (kind, params, padding)
    if kind == "edge":  # padding keeps tiles that cross the slide's edge
        assert (expected[:, 0] + 256 > 2048).any() or (expected[:, 1] + 256 > 1536).any() or padding is False


def test_contours_areas_and_point_tests_equal_opencvs():
    rng = np.random.default_rng(0)
    for trial in range(40):
        h, w = rng.integers(6, 30, 2)
        mask = rng.random((h, w)) < rng.uniform(0.3, 0.7)
        if trial % 2:
            mask = ndimage.binary_closing(mask)
        cv_contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
        ours = find_components(mask)
        if hierarchy is None:
            assert not ours
            continue
        hierarchy = hierarchy[0]
        expected = sorted((sorted(map(tuple, cv_contours[i].reshape(-1, 2).tolist())), cv2.contourArea(cv_contours[i]),
                           sorted(cv2.contourArea(cv_contours[j]) for j in np.flatnonzero(hierarchy[:, 3] == i)))
                          for i in np.flatnonzero(hierarchy[:, 3] == -1))
        got = sorted((sorted(map(tuple, c.outer.tolist())), contour_area(c.outer), sorted(map(contour_area, c.holes)))
                     for c in ours)
        assert got == expected
        points = np.stack(np.meshgrid(np.arange(-1, w + 1), np.arange(-1, h + 1)), -1).reshape(-1, 2)
        for contour in cv_contours:
            reference = [cv2.pointPolygonTest(contour, (int(x), int(y)), False) for x, y in points]
            np.testing.assert_array_equal(point_polygon_test(contour.reshape(-1, 2), points), reference)


def test_presets_are_clams_csv_values():
    assert (PRESETS["default"].min_tissue_area, PRESETS["default"].min_hole_area) == (100, 16)
    tcga = PRESETS["tcga"]
    assert (tcga.saturation_threshold, tcga.median_size, tcga.close_size, tcga.min_tissue_area, tcga.min_hole_area,
            tcga.max_holes) == (8, 7, 4, 16, 4, 8)
    biopsy = PRESETS["bwh_biopsy"]
    assert (biopsy.saturation_threshold, biopsy.median_size, biopsy.close_size, biopsy.max_holes) == (15, 11, 2, 2)
    assert os.path.basename(tiling.__file__) == "coords.py"


def test_jpeg_and_jpeg2000_tiled_slides_decode(tmp_path):
    """SVS / NDPI tiles are JPEG (or JPEG 2000, Aperio 33003/33005): imagecodecs, an install requirement, decodes them."""
    import tifffile

    pixels = _slide_pixels("holes", 0)[:512, :512].copy()
    write_pyramidal_tiff(str(tmp_path / "jpeg.tif"), pixels, mpp=0.5, compression="jpeg", compression_level=95,
                         downsamples=(1, 4))
    tifffile.imwrite(tmp_path / "j2k.tif", pixels, tile=(256, 256), compression="jpeg2000",
                     compressionargs={"level": 100}, photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    for name, tolerance in (("jpeg.tif", 12), ("j2k.tif", 1)):
        with open_slide(str(tmp_path / name)) as slide:
            region = slide.read_region((128, 128), 0, (256, 256)).astype(int)
        assert np.abs(region - pixels[128:384, 128:384]).mean() < tolerance, name
