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
from PIL import Image

from medjax.data.tiling import coords as tiling
from medjax.data.demo.wsi import TISSUE_CLASSES, make_wsi_demo
from medjax.data.tiling.tissue import (PRESETS, TissueParams, close_mask, filter_components, otsu_threshold, rgb_to_saturation,
                                      tissue_contours)
from medjax.data.tiling.contours import find_components
from medjax.data.readers.wsi import SlideError, list_slides, open_slide
from medjax.data.readers.wsi_write import write_pyramidal_tiff

GLASS, PINK = (240, 240, 240), (230, 150, 200)
# Level-0 rectangles (x0, y0, x1, y1) of the 20x (0.5 um/px) layout; edges on the 16-px mask grid.
RECT_A = (256, 256, 1152, 768)  # 3.5 x 2 tiles of 256
RECT_B = (1280, 768, 2048, 1536)  # 3 x 3 tiles in the bottom-right corner
HOLE_B = (1552, 1040, 1776, 1264)  # covers all 4 test points of the tile at (1536, 1024)
SPECK = (256, 1280, 320, 1344)  # 1/16 tile: removed by the area filter
PARAMS = TissueParams(min_tissue_area=1.0, min_hole_area=0.125)  # in 512 x 512 level-0 patches
# CLAM's grid per region from its bounding box corner (one 16-px mask pixel late: OpenCV's closing offset), a
# tile kept when a point at +-64 px from its centre is in the region: A gives 4 x 2 tiles, B 3 x 3 less the one
# over the hole.
EXPECTED_20X = sorted([(x + 16, y + 16) for y in (256, 512) for x in (256, 512, 768, 1024)] +
                      [(x + 16, y + 16) for y in (768, 1024, 1280) for x in (1280, 1536, 1792) if (x, y) != (1536, 1024)],
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
    np.testing.assert_array_equal(close_mask(gap, 4), np.ones((8, 9), bool))
    # OpenCV's closing with an even square moves what stays open one pixel right and down (cv2 5.x).
    wide = np.ones((8, 12), bool)
    wide[:, 4:9] = False
    np.testing.assert_array_equal(close_mask(wide, 4), np.roll(wide, 1, axis=1))
    blob = np.zeros((12, 12), bool)
    blob[4:8, 4:9] = True
    np.testing.assert_array_equal(close_mask(blob, 4), np.roll(blob, (1, 1), axis=(0, 1)))


def test_area_filters_in_reference_patches():
    mask = np.zeros((40, 60), bool)
    mask[5:35, 5:30] = True  # a region with two holes
    mask[10:20, 10:20] = False  # a large hole: kept
    mask[25:27, 10:12] = False  # a 2 x 2 hole: its contour area (of the pixels around it) is 3, under a_h
    mask[2:4, 50:52] = True  # a speck (contour area 1): dropped
    mask[20:30, 40:55] = True  # a 10 x 15 region (contour area 9 * 14 = 126)
    components = find_components(mask)
    kept = filter_components(components, TissueParams(min_tissue_area=1.0, min_hole_area=0.1), reference_area=100)
    assert len(kept) == 2 and [len(holes) for _, holes in kept] == [1, 0]
    kept = filter_components(components, TissueParams(min_tissue_area=1.3, min_hole_area=0.1, max_holes=0), 100)
    assert len(kept) == 1 and kept[0][1] == ()  # the 126-px region is under 130; max_holes 0 keeps no hole


def test_tissue_contours_of_the_rectangle_slide(slides):
    with open_slide(os.path.join(slides, "rect20.tif")) as slide:
        tissue = tissue_contours(slide, PARAMS)
    assert tissue.level == 2 and tissue.downsample == (16.0, 16.0) and tissue.foreground.shape == (96, 128)
    assert len(tissue.contours) == 2  # the speck is gone
    boxes = sorted(tiling.bounding_rect(c) for c in tissue.contours)
    # Mask-pixel centres at level 0, one mask pixel (16 px) late: OpenCV's closing offset.
    (ax, ay, aw, ah), (bx, by, bw, bh) = boxes
    assert (ax, ay, ax + aw - 1, ay + ah - 1) == (RECT_A[0] + 16, RECT_A[1] + 16, RECT_A[2], RECT_A[3])
    assert (bx, by) == (RECT_B[0] + 16, RECT_B[1] + 16)
    assert [len(h) for h in tissue.holes] == [0, 1] or [len(h) for h in tissue.holes] == [1, 0]


def test_tile_coordinates_at_20x_and_40x(slides, tmp_path):
    out = str(tmp_path)
    result = tiling.tile_slide(os.path.join(slides, "rect20.tif"), out, params=PARAMS)
    assert result.status == "ok" and result.num_tiles == len(EXPECTED_20X)
    coords, attrs = tiling.read_coords(result.h5_path)
    np.testing.assert_array_equal(sorted(map(tuple, coords.tolist()), key=lambda p: (p[1], p[0])), EXPECTED_20X)
    assert (attrs["patch_size"], attrs["patch_level"], attrs["target_patch_size"]) == (256, 0, 256)
    assert attrs["use_padding"] == 1  # edge tiles kept (CLAM): WSITileSource.from_coords_dir accepts them
    # The same tissue at 40x: 512 level-0 pixels per tile, read at level 0 (CLAM's patch_size), coords x 2.
    result = tiling.tile_slide(os.path.join(slides, "rect40.tiff"), out, params=PARAMS)
    with h5py.File(os.path.join(out, "rect40.h5"), "r") as handle:
        dataset = handle["coords"]
        assert dataset.dtype == np.int64 and dataset.shape == (len(EXPECTED_20X), 2)
        # twice the 20x corners, less the closing offset at 20x plus the one at 40x (16 level-0 px each)
        got = sorted(map(tuple, dataset[()].tolist()), key=lambda p: (p[1], p[0]))
        np.testing.assert_array_equal(got, 2 * np.array(EXPECTED_20X) - 16)
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
    args = parser.parse_args(["--slides", slides, "--out", out, "--min-tissue-area", "1", "--min-hole-area", "0.125",
                              "--save-mask", "--stitch"])
    assert tiling.run_tile(args) == 1  # some slides failed
    with open(os.path.join(out, tiling.REPORT_NAME)) as handle:
        report = {row["slide_id"]: row for row in csv.DictReader(handle)}
    assert sorted(report) == ["blank", "no_mpp", "no_pyramid", "rect20", "rect40", "truncated"]
    assert report["no_pyramid"]["status"] == "empty"  # segmented on level 0; its tissue is under a_t = 1
    assert report["rect20"]["status"] == "ok" and int(report["rect20"]["num_tiles"]) == len(EXPECTED_20X)
    assert report["rect40"]["status"] == "ok"
    for name, status, words in (("truncated", "error", "truncated"),
                                ("no_mpp", "error", "no microns per pixel"), ("blank", "empty", "empty tissue mask")):
        assert report[name]["status"] == status and words in report[name]["message"]
        assert os.path.join(slides, f"{name}.tif") in report[name]["message"]
    assert sorted(os.listdir(out)) == ["masks", "rect20.h5", "rect40.h5", "stitches", tiling.REPORT_NAME]
    # Previews at the mask level (16x): contours drawn in green and the hole in blue; the stitch shows exactly the
    # kept tiles' footprints (16 x 16 thumbnail pixels each) of the thumbnail.
    mask = np.asarray(Image.open(os.path.join(out, "masks", "rect20.png")))
    assert mask.shape == (96, 128, 3)
    assert ((mask == (0, 255, 0)).all(-1)).sum() > 100 and ((mask == (0, 0, 255)).all(-1)).sum() > 20
    stitch = np.asarray(Image.open(os.path.join(out, "stitches", "rect20.png")))
    footprint = np.zeros((96, 128), bool)
    for x, y in EXPECTED_20X:
        footprint[y // 16:y // 16 + 16, x // 16:x // 16 + 16] = True
    assert ((stitch > 0).any(-1) == footprint).all()
    # every slide that was segmented, empty ones too (a failed slide has none)
    assert sorted(os.listdir(os.path.join(out, "masks"))) == ["blank.png", "no_pyramid.png", "rect20.png", "rect40.png"]


def test_bad_slides_raise_or_warn_with_the_slide_name(slides, tmp_path):
    with pytest.raises(SlideError, match=r"truncated\.tif: truncated file: segment \d+ of level 0"):
        open_slide(os.path.join(slides, "truncated.tif"))
    # A slide without a pyramid is segmented on level 0 (CLAM's get_best_level_for_downsample(64) = 0).
    result = tiling.tile_slide(os.path.join(slides, "no_pyramid.tif"), str(tmp_path), patch_size=64,
                               params=TissueParams(min_tissue_area=0.01, min_hole_area=0.01, median_size=3))
    assert result.status == "ok" and result.num_tiles > 4
    with pytest.raises(SlideError, match=r"no_mpp\.tif: no microns per pixel"):
        tiling.tile_slide(os.path.join(slides, "no_mpp.tif"), str(tmp_path))
    with pytest.warns(tiling.SlideWarning, match=r"no_mpp\.tif: no microns per pixel; assuming 0.5"):
        result = tiling.tile_slide(os.path.join(slides, "no_mpp.tif"), str(tmp_path), default_mpp=0.5)
    assert result.status == "empty"  # CLAM's default a_t = 100 reference patches: more than the whole slide
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
    results = tiling.tile_slides(list_slides(os.path.join(demo, "slides")), str(tmp_path), params=PRESETS["demo"])
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
