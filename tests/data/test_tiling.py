"""Tissue mask, tile grid, CLAM's HDF5 layout, the `tile` command and the bad-slide paths, on synthetic
slides with known tissue rectangles; and the WSI demo maker."""
import argparse
import csv
import os
import shutil
import time

import h5py
import numpy as np
import pytest

from medjax.data.tiling import coords as tiling
from medjax.data.demo.wsi import TISSUE_CLASSES, make_wsi_demo
from medjax.data.tiling.tissue import TissueParams, close_binary, label_tissue, otsu_threshold, rgb_to_saturation, tissue_mask
from medjax.data.readers.wsi import SlideError, list_slides, open_slide
from medjax.data.readers.wsi_write import write_pyramidal_tiff

GLASS, PINK = (240, 240, 240), (230, 150, 200)
# Level-0 rectangles (x0, y0, x1, y1) of the 20x (0.5 um/px) layout; edges on the 16-px mask grid.
RECT_A = (256, 256, 1152, 768)  # 3.5 x 2 tiles of 256
RECT_B = (1280, 768, 2048, 1536)  # 3 x 3 tiles in the bottom-right corner
HOLE_B = (1552, 1040, 1776, 1264)  # covers all 4 test points of the tile at (1536, 1024)
SPECK = (256, 1280, 320, 1344)  # 1/16 tile: removed by the area filter
PARAMS = TissueParams(min_hole_area=0.5)
# CLAM's grid per region from its bounding box corner, a tile kept when a point at +-64 px from its
# centre is in the region: A gives 4 x 2 tiles, B 3 x 3 less the one over the hole.
EXPECTED_20X = sorted([(x, y) for y in (256, 512) for x in (256, 512, 768, 1024)] +
                      [(x, y) for y in (768, 1024, 1280) for x in (1280, 1536, 1792) if (x, y) != (1536, 1024)],
                      key=lambda p: (p[1], p[0]))


def rect_slide_pixels(scale: int = 1) -> np.ndarray:
    """The synthetic slide at `scale` x the 20x layout (2 = the same tissue scanned at 40x)."""
    image = np.empty((1536 * scale, 2048 * scale, 3), np.uint8)
    image[...] = GLASS
    for rect, colour in ((RECT_A, PINK), (RECT_B, PINK), (HOLE_B, GLASS), (SPECK, PINK)):
        x0, y0, x1, y1 = (v * scale for v in rect)
        image[y0:y1, x0:x1] = colour
    return image


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """A slide directory: the rectangle slide at 20x and at 40x, plus every kind of bad slide."""
    root = tmp_path_factory.mktemp("slides")
    write_pyramidal_tiff(str(root / "rect20.tif"), rect_slide_pixels(1), mpp=0.5, compression_level=1)
    write_pyramidal_tiff(str(root / "rect40.tiff"), rect_slide_pixels(2), mpp=0.25, compression_level=1)
    small = rect_slide_pixels(1)[::4, ::4].copy()
    write_pyramidal_tiff(str(root / "no_pyramid.tif"), small, mpp=0.5, downsamples=(1,))
    write_pyramidal_tiff(str(root / "no_mpp.tif"), rect_slide_pixels(1), mpp=None, description="scanner X",
                         compression_level=1)
    blank = np.full((1024, 1024, 3), 241, np.uint8)
    write_pyramidal_tiff(str(root / "blank.tif"), blank, mpp=0.5, downsamples=(1, 4))
    write_pyramidal_tiff(str(root / "truncated.tif"), small, mpp=0.5, downsamples=(1, 4), tile=64)
    with open(root / "truncated.tif", "r+b") as handle:
        handle.truncate(os.path.getsize(root / "truncated.tif") // 2)
    (root / "notes.txt").write_text("not a slide")
    return str(root)


def test_saturation_otsu_and_closing():
    # Saturation and Otsu values are OpenCV 5.0's (cvtColor RGB2HSV, threshold THRESH_OTSU).
    rgb = np.array([[[255, 0, 0], [200, 100, 50], [0, 0, 0], [128, 128, 128], [230, 150, 200], [7, 3, 5]]], np.uint8)
    np.testing.assert_array_equal(rgb_to_saturation(rgb), [[255, 191, 0, 0, 89, 146]])
    values = np.concatenate([np.full(60, 10), np.full(40, 200)]).astype(np.uint8)
    assert otsu_threshold(values) == 10  # the first maximiser of the between-class variance
    gap = np.ones((8, 9), bool)
    gap[:, 4:6] = False  # a 2-px gap closes; the image edges are not eroded
    np.testing.assert_array_equal(close_binary(gap, 4), np.ones((8, 9), bool))
    wide = np.ones((8, 12), bool)
    wide[:, 4:9] = False  # a 5-px gap stays open and in place (OpenCV's closing moves it one pixel right)
    np.testing.assert_array_equal(close_binary(wide, 4), wide)
    blob = np.zeros((12, 12), bool)
    blob[4:8, 4:9] = True
    np.testing.assert_array_equal(close_binary(blob, 4), blob)


def test_label_tissue_keeps_large_regions_and_holes():
    mask = np.zeros((40, 60), bool)
    mask[5:35, 5:30] = True  # 750 px region with two holes
    mask[10:20, 10:20] = False  # a 100-px hole: kept
    mask[25:27, 10:12] = False  # a 4-px hole: filled
    mask[2:4, 50:52] = True  # a 4-px speck: dropped
    mask[20:30, 40:55] = True  # a 150-px region
    labels, regions = label_tissue(mask, min_area=100, min_hole_area=10, max_holes=8)
    # The kept hole goes with the 40 tissue pixels bordering it (OpenCV's hole contour runs through them).
    assert [r.area for r in regions] == [750 - 100 - 4 - 40, 150]
    assert regions[0].hole_areas == (100,) and regions[0].bbox == (5, 5, 30, 35)
    assert (labels[9:21, 10:20] == 0).all() and (labels[10:20, 9:21] == 0).all() and labels[9, 9] == 1
    assert (labels[25:27, 10:12] == 1).all()
    assert labels[2:4, 50:52].max() == 0 and (labels[20:30, 40:55] == 2).all()
    labels, regions = label_tissue(mask, min_area=200, min_hole_area=10, max_holes=0)
    assert len(regions) == 1 and regions[0].hole_areas == () and (labels[10:20, 10:20] == 1).all()


def test_tissue_mask_of_the_rectangle_slide(slides):
    with open_slide(os.path.join(slides, "rect20.tif")) as slide:
        mask = tissue_mask(slide, PARAMS, reference_patch=256)
    assert mask.level == 2 and mask.downsample == (16.0, 16.0) and mask.labels.shape == (96, 128)
    assert len(mask.regions) == 2  # the speck is gone
    a, b = mask.regions
    assert mask.bbox_level0(a) == RECT_A and mask.bbox_level0(b) == RECT_B
    assert len(b.hole_areas) == 1 and 160 < b.hole_areas[0] < 14 * 14  # corners rounded by the median
    expected = np.zeros((96, 128), bool)
    for x0, y0, x1, y1 in (RECT_A, RECT_B):
        expected[y0 // 16:y1 // 16, x0 // 16:x1 // 16] = True
    x0, y0, x1, y1 = HOLE_B  # the hole and the tissue pixels 4-adjacent to it
    expected[y0 // 16 - 1:y1 // 16 + 1, x0 // 16:x1 // 16] = False
    expected[y0 // 16:y1 // 16, x0 // 16 - 1:x1 // 16 + 1] = False
    # The 7 x 7 median blur rounds the corners (within 3 px of them); everywhere else the mask is exact.
    rows, cols = np.mgrid[0:96, 0:128]
    near_corner = np.zeros((96, 128), bool)
    for x0, y0, x1, y1 in (RECT_A, RECT_B, (HOLE_B[0] - 16, HOLE_B[1] - 16, HOLE_B[2] + 16, HOLE_B[3] + 16)):
        for cx in (x0 // 16, x1 // 16 - 1):
            for cy in (y0 // 16, y1 // 16 - 1):
                near_corner |= (abs(rows - cy) <= 3) & (abs(cols - cx) <= 3)
    differ = mask.mask != expected
    assert differ.any() and not differ[~near_corner].any()


def test_tile_coordinates_at_20x_and_40x(slides, tmp_path):
    out = str(tmp_path)
    result = tiling.tile_slide(os.path.join(slides, "rect20.tif"), out, params=PARAMS)
    assert result.status == "ok" and result.num_tiles == len(EXPECTED_20X)
    coords, attrs = tiling.read_coords(result.h5_path)
    np.testing.assert_array_equal(coords, EXPECTED_20X)
    assert (attrs["patch_size"], attrs["patch_level"], attrs["target_patch_size"]) == (256, 0, 256)
    # The same tissue at 40x: 512 level-0 pixels per tile, read at level 0 (CLAM's patch_size), coords x 2.
    result = tiling.tile_slide(os.path.join(slides, "rect40.tiff"), out, params=PARAMS)
    with h5py.File(os.path.join(out, "rect40.h5"), "r") as handle:
        dataset = handle["coords"]
        assert dataset.dtype == np.int64 and dataset.shape == (len(EXPECTED_20X), 2)
        np.testing.assert_array_equal(dataset[()], 2 * np.array(EXPECTED_20X))
        assert dataset.attrs["patch_size"] == 512 and dataset.attrs["patch_level"] == 0
        assert dataset.attrs["patch_size_level0"] == 512 and dataset.attrs["target_patch_size"] == 256
        assert dataset.attrs["name"] == "rect40" and dataset.attrs["mpp"] == 0.25


def test_geometry_picks_the_coarsest_exact_level(slides):
    with open_slide(os.path.join(slides, "rect40.tiff")) as slide:
        g = tiling.tile_geometry(slide, 256, 10.0)  # 10x from 40x: 1024 level-0 px = 256 at level 1 (4x)
        assert (g.patch_level, g.patch_size, g.patch_size_level0) == (1, 256, 1024)
        g = tiling.tile_geometry(slide, 256, 40.0)
        assert (g.patch_level, g.patch_size, g.patch_size_level0) == (0, 256, 256)
    with open_slide(os.path.join(slides, "rect20.tif")) as slide:
        with pytest.raises(SlideError, match="rect20.tif: level 0 is 20x .* below the requested 40x"):
            tiling.tile_geometry(slide, 256, 40.0)
    assert tiling.level0_magnification(0.2520) == 40.0 and tiling.level0_magnification(0.5) == 20.0
    assert tiling.level0_magnification(0.7) == pytest.approx(10 / 0.7)


def test_each_bad_slide_is_named_and_the_others_go_on(slides, tmp_path):
    out = str(tmp_path / "coords")
    parser = argparse.ArgumentParser()
    tiling.add_tile_arguments(parser)
    args = parser.parse_args(["--slides", slides, "--out", out, "--min-hole-area", "0.5"])
    assert tiling.run_tile(args) == 1  # some slides failed
    with open(os.path.join(out, tiling.REPORT_NAME)) as handle:
        report = {row["slide_id"]: row for row in csv.DictReader(handle)}
    assert sorted(report) == ["blank", "no_mpp", "no_pyramid", "rect20", "rect40", "truncated"]
    assert report["rect20"]["status"] == "ok" and int(report["rect20"]["num_tiles"]) == len(EXPECTED_20X)
    assert report["rect40"]["status"] == "ok"
    for name, status, words in (("truncated", "error", "truncated"), ("no_pyramid", "error", "no pyramid"),
                                ("no_mpp", "error", "no microns per pixel"), ("blank", "empty", "empty tissue mask")):
        assert report[name]["status"] == status and words in report[name]["message"]
        assert os.path.join(slides, f"{name}.tif") in report[name]["message"]
    assert sorted(os.listdir(out)) == ["rect20.h5", "rect40.h5", tiling.REPORT_NAME]


def test_bad_slides_raise_or_warn_with_the_slide_name(slides, tmp_path):
    with pytest.raises(SlideError, match=r"truncated\.tif: truncated file: segment \d+ of level 0"):
        open_slide(os.path.join(slides, "truncated.tif"))
    with pytest.raises(SlideError, match=r"no_pyramid\.tif: no pyramid"):
        tiling.tile_slide(os.path.join(slides, "no_pyramid.tif"), str(tmp_path))
    with pytest.raises(SlideError, match=r"no_mpp\.tif: no microns per pixel"):
        tiling.tile_slide(os.path.join(slides, "no_mpp.tif"), str(tmp_path))
    with pytest.warns(tiling.SlideWarning, match=r"no_mpp\.tif: no microns per pixel; assuming 0.5"):
        result = tiling.tile_slide(os.path.join(slides, "no_mpp.tif"), str(tmp_path), default_mpp=0.5)
    assert result.status == "ok" and result.num_tiles == len(EXPECTED_20X) + 1  # default params fill the hole
    with pytest.warns(tiling.SlideWarning, match=r"blank\.tif: empty tissue mask"):
        result = tiling.tile_slide(os.path.join(slides, "blank.tif"), str(tmp_path))
    assert result.status == "empty" and not os.path.exists(tmp_path / "blank.h5")
    with pytest.raises(SlideError, match=r"notes\.txt: unknown slide extension"):
        open_slide(os.path.join(slides, "notes.txt"))


def test_read_coords_rejects_files_without_clam_layout(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as handle:
        handle.create_dataset("coords", data=np.zeros((3, 2), np.int64))
    with pytest.raises(ValueError, match=r"x\.h5: dataset 'coords' lacks the attribute 'patch_size'"):
        tiling.read_coords(str(tmp_path / "x.h5"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_wsi_demo(str(tmp_path_factory.mktemp("wsi_demo")), num_slides=2, size=1024, seed=0)


def test_wsi_demo_slides_labels_and_tiling(demo, tmp_path):
    files = sorted(os.listdir(os.path.join(demo, "slides")))
    assert files == ["demo_000.tif", "demo_001.tif"]
    with open_slide(os.path.join(demo, "slides", "demo_001.tif")) as slide:
        assert slide.mpp == 0.25 and len(slide.level_dimensions) == 3 and slide.level_dimensions[0][0] == 2048
        assert slide.compression == "ADOBE_DEFLATE"
    with open(os.path.join(demo, "slides.csv")) as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["slide_id"], r["magnification"], r["label_name"]) for r in rows] == [
        ("demo_000", "20", "tumor"), ("demo_001", "40", "normal")]
    with open(os.path.join(demo, "tile_labels.csv")) as handle:
        labels = list(csv.DictReader(handle))
    assert labels and {r["label_name"] for r in labels} <= set(TISSUE_CLASSES)
    # Labelled tiles are tissue: stained (saturated) pixels; on a 40x slide they cover 512 level-0 pixels.
    for row in labels[:: max(1, len(labels) // 6)]:
        size = 512 if row["slide_id"] == "demo_001" else 256
        with open_slide(os.path.join(demo, "slides", row["slide_id"] + ".tif")) as slide:
            tile = slide.read_region((int(row["x"]), int(row["y"])), 0, (size, size))
        assert (rgb_to_saturation(tile) > 20).mean() > 0.7
    results = tiling.tile_slides(list_slides(os.path.join(demo, "slides")), str(tmp_path))
    assert [r.status for r in results] == ["ok", "ok"] and all(r.num_tiles > 4 for r in results)
    # Every labelled tile lies in the tissue mask's grid region: glass tiles are never produced.
    coords, _ = tiling.read_coords(results[0].h5_path)
    with open_slide(results[0].path) as slide:
        saturated = [(rgb_to_saturation(slide.read_region(tuple(c), 0, (256, 256))) > 20).mean() for c in coords]
    assert min(saturated) > 0.05


def test_wsi_demo_is_reused_and_fast(demo, tmp_path):
    marker = os.path.join(demo, ".complete")
    before = os.path.getmtime(marker)
    assert make_wsi_demo(demo, num_slides=2, size=1024, seed=0) == demo and os.path.getmtime(marker) == before
    start = time.perf_counter()
    make_wsi_demo(str(tmp_path / "one"), num_slides=1, size=1024, seed=1)
    assert time.perf_counter() - start < 5.0
    shutil.rmtree(tmp_path / "one")
