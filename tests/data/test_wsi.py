"""Pyramidal TIFF reading (levels, regions, microns per pixel, layouts, errors), the Grain tile source and
DINOv2's multi-crop augmentation."""
import csv
import os
import pickle

import grain
import numpy as np
import pytest
import tifffile
from PIL import Image

from medjax.data.readers import wsi
from medjax.data.transforms.image import IMAGENET_MEAN, IMAGENET_STD
from medjax.data.pipelines.global_batches import global_batch_dataset
from medjax.data.tiling.coords import tile_geometry, write_coords
from medjax.data.readers.wsi import SlideError, TiffSlide, open_slide
from medjax.data.readers.wsi_write import downsample_mean, write_pyramidal_tiff
from medjax.data.pipelines.wsi_tiles import (DinoMultiCrop, WSITileSource, color_jitter, gaussian_blur, hsv_to_rgb,
                                    random_resized_crop_box, rgb_to_hsv)


def texture(height, width, seed=0):
    """A smooth random RGB texture (so that resampling is checkable) with some fine detail."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.int16)
    return np.clip(smooth + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    """(path, level-0 pixels) of a 900 x 700 pyramid with levels 1, 4, 16 and 128-px tiles."""
    path = str(tmp_path_factory.mktemp("wsi") / "slide.tif")
    image = texture(700, 900)
    write_pyramidal_tiff(path, image, mpp=0.5, tile=128)
    return path, image


def test_levels_and_microns_per_pixel(pyramid, tmp_path):
    path, _ = pyramid
    with open_slide(path) as slide:
        assert isinstance(slide, TiffSlide) and slide.slide_id == "slide"
        assert slide.level_dimensions == ((900, 700), (225, 175), (57, 44))
        assert slide.level_downsamples[:2] == (1.0, 4.0) and slide.level_downsamples[2] == pytest.approx(15.85, 0.01)
        assert slide.mpp == pytest.approx(0.5) and slide.compression == "ADOBE_DEFLATE"
        assert wsi.best_level_for_downsample(slide, 64) == 2 and wsi.best_level_for_downsample(slide, 3.9) == 0
    small = texture(64, 64)
    aperio = str(tmp_path / "aperio.svs")  # no resolution tags: the Aperio description gives the mpp
    write_pyramidal_tiff(aperio, small, mpp=None, downsamples=(1, 2), tile=32,
                         description="Aperio Image Library v12.0.15\n64x64 |AppMag = 40|MPP = 0.2520|Filename = x")
    with open_slide(aperio, backend="tifffile") as slide:
        assert slide.mpp == pytest.approx(0.252)
    for unit, expected in (("nm", 0.5), ("um", 500.0)):
        ome = str(tmp_path / f"ome_{unit}.tif")
        tifffile.imwrite(ome, small, photometric="rgb", metadata=None,
                         description=f'<OME><Pixels PhysicalSizeX="500" PhysicalSizeXUnit="{unit}"/></OME>')
        with TiffSlide(ome) as slide:
            assert slide.mpp == pytest.approx(expected)
    inch = str(tmp_path / "inch.tif")
    tifffile.imwrite(inch, small, photometric="rgb", resolution=(50800, 50800), resolutionunit="INCH", metadata=None)
    with TiffSlide(inch) as slide:
        assert slide.mpp == pytest.approx(0.5)  # 25400 um / 50800 px
    plain = str(tmp_path / "plain.tif")
    tifffile.imwrite(plain, small, photometric="rgb", metadata=None)
    with TiffSlide(plain) as slide:
        assert slide.mpp is None


def block_mean(image, factor):
    """Reference: the mean of factor x factor blocks, rounded half up (numpy, independent of the reader)."""
    h, w = image.shape[0] // factor, image.shape[1] // factor
    blocks = image[:h * factor, :w * factor].reshape(h, factor, w, factor, 3).astype(np.float64)
    return np.floor(blocks.mean(axis=(1, 3)) + 0.5).astype(np.uint8)


def test_region_at_level_k_equals_level0_downsampled(pyramid):
    path, image = pyramid
    with open_slide(path) as slide:
        # Level 0: an arbitrary region across tile boundaries.
        np.testing.assert_array_equal(slide.read_region((100, 60), 0, (300, 200)), image[60:260, 100:400])
        for level, factor in ((1, 4), (2, 16)):
            x, y = 128, 64  # a level-0 corner on the level's grid, 160 x 96 level-0 pixels
            size = (160 // factor, 96 // factor)
            region = slide.read_region((x, y), level, size)
            expected = block_mean(image[y:y + size[1] * factor, x:x + size[0] * factor], factor)
            # The demo / writer's downsampling is this block mean; the reader returns it unchanged.
            np.testing.assert_array_equal(region, expected)
        # Outside the slide: white glass.
        edge = slide.read_region((850, 650), 0, (100, 100))
        np.testing.assert_array_equal(edge[:50, :50], image[650:, 850:])
        assert (edge[50:] == 255).all() and (edge[:, 50:] == 255).all()


def test_downsample_mean_handles_partial_edge_blocks():
    image = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
    out = downsample_mean(image, 4)
    assert out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out[0, 0], np.floor(image[:4, :4].reshape(-1, 3).mean(0) + 0.5))
    np.testing.assert_array_equal(out[1, 1], np.floor(image[4:, 4:].reshape(-1, 3).mean(0) + 0.5))


@pytest.mark.parametrize("layout", ["strips", "planar", "gray", "rgba"])
def test_other_tiff_layouts_read_as_rgb(tmp_path, layout):
    image = texture(150, 110, seed=1)
    path = str(tmp_path / f"{layout}.tif")
    if layout == "strips":
        tifffile.imwrite(path, image, photometric="rgb", rowsperstrip=16, compression="zlib", metadata=None)
        expected = image
    elif layout == "planar":
        tifffile.imwrite(path, image.transpose(2, 0, 1), photometric="rgb", planarconfig="separate", tile=(32, 32),
                         metadata=None)
        expected = image
    elif layout == "gray":
        tifffile.imwrite(path, image[..., 0], photometric="minisblack", tile=(32, 32), metadata=None)
        expected = np.repeat(image[..., :1], 3, axis=-1)
    else:
        alpha = np.full((150, 110, 1), 255, np.uint8)
        alpha[:, :10] = 0  # transparent columns read as white
        tifffile.imwrite(path, np.concatenate([image, alpha], -1), photometric="rgb", extrasamples="unassalpha",
                         tile=(32, 32), metadata=None)
        expected = image.copy()
        expected[:, :10] = 255
    with TiffSlide(path) as slide:
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (110, 150)), expected)
        np.testing.assert_array_equal(slide.read_region((37, 45), 0, (50, 70)), expected[45:115, 37:87])


def test_unreadable_slides_are_named(tmp_path, monkeypatch):
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"not a tiff at all" * 10)
    with pytest.raises(SlideError, match=r"garbage\.tif: not a readable TIFF"):
        open_slide(str(garbage))
    with pytest.raises(SlideError, match=r"missing\.tif: slide file not found"):
        open_slide(str(tmp_path / "missing.tif"))
    deep = str(tmp_path / "deep.tif")
    tifffile.imwrite(deep, np.zeros((8, 8, 3), np.uint16), photometric="rgb", metadata=None)
    with pytest.raises(SlideError, match=r"deep\.tif: level 0 is uint16 .* expected 8-bit gray, RGB or RGBA"):
        open_slide(deep)
    monkeypatch.setattr(wsi, "_openslide_available", lambda: False)
    with pytest.raises(SlideError, match=r"case\.mrxs: \.mrxs slides need OpenSlide"):
        open_slide(str(tmp_path / "case.mrxs"))
    ok = str(tmp_path / "ok.tif")
    tifffile.imwrite(ok, np.zeros((8, 8, 3), np.uint8), photometric="rgb", metadata=None)
    with TiffSlide(ok) as slide:
        with pytest.raises(SlideError, match=r"ok\.tif: region size \(0, 5\) must be positive"):
            slide.read_region((0, 0), 0, (0, 5))
        with pytest.raises(SlideError, match=r"ok\.tif: level 1 requested; the slide has levels 0\.\.0"):
            slide.read_region((0, 0), 1, (2, 2))


@pytest.fixture(scope="module")
def tile_dirs(tmp_path_factory):
    """Slides at 20x and 40x of the same texture with coordinate files written by the tiler's writer."""
    root = tmp_path_factory.mktemp("source")
    slides, coords = root / "slides", root / "coords"
    slides.mkdir(), coords.mkdir()
    image = texture(512, 768, seed=2)
    write_pyramidal_tiff(str(slides / "a20.tif"), image, mpp=0.5, tile=128)
    big = np.asarray(Image.fromarray(image).resize((1536, 1024), Image.Resampling.BICUBIC))
    write_pyramidal_tiff(str(slides / "b40.tif"), big, mpp=0.25, tile=128)
    for name, xy in (("a20", [(0, 0), (256, 256), (512, 0)]), ("b40", [(512, 0), (1024, 512)])):
        with open_slide(str(slides / f"{name}.tif")) as slide:
            write_coords(str(coords / f"{name}.h5"), np.array(xy), tile_geometry(slide, 256, 20.0), slide)
    return str(slides), str(coords), image, big


def test_tile_source_reads_resizes_and_pickles_without_handles(tile_dirs):
    slides, coords, image, big = tile_dirs
    source = WSITileSource.from_coords_dir(slides, coords, tile_size=256)
    assert len(source) == 5 and source.slide_paths == [os.path.join(slides, "a20.tif"), os.path.join(slides, "b40.tif")]
    first = source[1]
    assert first["slide"] == 0 and list(first["coords"]) == [256, 256]
    np.testing.assert_array_equal(first["image"], image[256:512, 256:512])
    # 40x: 512 level-0 pixels read (CLAM's patch_size at patch_level 0) and resized to 256.
    tile = source[4]
    expected = np.asarray(Image.fromarray(big[512:1024, 1024:1536]).resize((256, 256), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(tile["image"], expected)
    assert tile["image"].shape == (256, 256, 3) and tile["slide"] == 1
    # Same tissue: the 40x tile resized to 20x is close to the 20x tile.
    assert np.abs(tile["image"].astype(int) - image[256:512, 512:768]).mean() < 6
    clone = pickle.loads(pickle.dumps(source))  # after slides were opened: no handle travels
    assert "_local" not in source.__getstate__()
    np.testing.assert_array_equal(clone[4]["image"], tile["image"])
    source.close()
    with pytest.raises(IndexError):
        source[5]


def test_tile_source_with_labels_and_errors(tile_dirs, tmp_path):
    slides, coords, image, _ = tile_dirs
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as handle:
        csv.writer(handle).writerows([("slide_id", "x", "y", "label"), ("b40", 0, 0, 2), ("a20", 256, 0, 1)])
    source = WSITileSource.from_labels_csv(str(labels), slides)
    assert len(source) == 2 and source[1]["label"] == 1 and source[0]["label"] == 2
    np.testing.assert_array_equal(source[1]["image"], image[0:256, 256:512])
    assert source[0]["image"].shape == (256, 256, 3)
    (tmp_path / "bad.csv").write_text("slide_id,x,y,label\na20,1.5,0,1\n")
    with pytest.raises(ValueError, match=r"bad\.csv: line 2: x, y and label must be integers"):
        WSITileSource.from_labels_csv(str(tmp_path / "bad.csv"), slides)
    (tmp_path / "gone.csv").write_text("slide_id,x,y,label\nzz,0,0,1\n")
    with pytest.raises(ValueError, match=r"gone\.csv: no slide 'zz'"):
        WSITileSource.from_labels_csv(str(tmp_path / "gone.csv"), slides)


def test_multi_crop_shapes_determinism_in_a_grain_pipeline(tile_dirs):
    slides, coords, _, _ = tile_dirs
    source = WSITileSource.from_coords_dir(slides, coords)
    augment = DinoMultiCrop()
    out = augment(source[0], np.random.default_rng([0, 0]))
    assert out["global_crops"].shape == (2, 224, 224, 3) and out["local_crops"].shape == (8, 96, 96, 3)
    assert out["global_crops"].dtype == np.float32 and "image" not in out and out["slide"] == 0
    again = augment(source[0], np.random.default_rng([0, 0]))
    np.testing.assert_array_equal(out["local_crops"], again["local_crops"])
    other = augment(source[0], np.random.default_rng([0, 1]))
    assert not np.array_equal(out["global_crops"], other["global_crops"])
    # Through medjax's Grain pipeline: per-element seeds, batches of stacked crops.
    ds = global_batch_dataset(source, global_batch=2, seed=3, transform=augment, num_epochs=1, prefetch_threads=2)
    assert isinstance(ds, grain.IterDataset)
    batch = next(iter(ds))
    assert batch["global_crops"].shape == (2, 2, 224, 224, 3) and batch["local_crops"].shape == (2, 8, 96, 96, 3)
    np.testing.assert_array_equal(next(iter(ds))["local_crops"], batch["local_crops"])


def test_multi_crop_without_random_colour_is_the_normalised_resized_crop():
    colour = np.array([200, 120, 40], np.uint8)
    image = np.broadcast_to(colour, (64, 80, 3)).copy()
    plain = DinoMultiCrop(global_size=16, local_size=8, num_local=3, jitter_prob=0.0, grayscale_prob=0.0,
                          blur_probs=(0.0, 0.0, 0.0), solarize_prob=0.0)
    out = plain({"image": image}, np.random.default_rng(0))
    expected = (colour / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(out["global_crops"], np.broadcast_to(expected, (2, 16, 16, 3)), atol=1e-6)
    np.testing.assert_allclose(out["local_crops"], np.broadcast_to(expected, (3, 8, 8, 3)), atol=1e-6)
    # Solarize always, no normalisation: values >= 128/255 are inverted.
    solar = DinoMultiCrop(global_size=8, local_size=8, num_local=1, jitter_prob=0.0, grayscale_prob=0.0,
                          blur_probs=(0.0, 0.0, 0.0), solarize_prob=1.0, normalize=False)
    out = solar({"image": image}, np.random.default_rng(0))
    np.testing.assert_allclose(out["global_crops"][0, 0, 0], colour / 255.0, atol=1e-6)
    np.testing.assert_allclose(out["global_crops"][1, 0, 0], [55 / 255, 120 / 255, 40 / 255], atol=1e-6)
    gray = DinoMultiCrop(global_size=8, local_size=8, num_local=1, jitter_prob=0.0, grayscale_prob=1.0,
                         blur_probs=(0.0, 0.0, 0.0), solarize_prob=0.0, normalize=False)
    luma = (0.2989 * 200 + 0.587 * 120 + 0.114 * 40) / 255
    np.testing.assert_allclose(gray({"image": image}, np.random.default_rng(0))["local_crops"], luma, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        plain({"image": image.astype(np.float32)}, np.random.default_rng(0))


def test_colour_operations_by_hand():
    red = np.array([[[1.0, 0.0, 0.0]]], np.float32)
    h, s, v = rgb_to_hsv(red)
    assert (h[0, 0], s[0, 0], v[0, 0]) == (0.0, 1.0, 1.0)
    np.testing.assert_allclose(hsv_to_rgb(np.mod(h + 1 / 3, 1.0), s, v), [[[0.0, 1.0, 0.0]]], atol=1e-6)
    rng = np.random.default_rng(0)
    image = rng.random((6, 7, 3)).astype(np.float32)
    np.testing.assert_allclose(hsv_to_rgb(*rgb_to_hsv(image)), image, atol=1e-6)
    # Gaussian blur keeps constants and sums; jitter stays in [0, 1].
    np.testing.assert_allclose(gaussian_blur(np.full((12, 12, 3), 0.3, np.float32), 1.5), 0.3, atol=1e-6)
    blurred = gaussian_blur(image, 1.0)
    assert blurred.std() < image.std()
    jittered = color_jitter(rng, image, 0.4, 0.4, 0.2, 0.1)
    assert jittered.min() >= 0 and jittered.max() <= 1 and not np.allclose(jittered, image)
    for _ in range(50):
        top, left, h, w = random_resized_crop_box(rng, 100, 80, (0.32, 1.0))
        assert 0 <= top and top + h <= 100 and 0 <= left and left + w <= 80
        assert 0.3 <= h * w / 8000 <= 1.0 and 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    assert random_resized_crop_box(rng, 10, 100, (0.9, 1.0)) == (0, 43, 10, 13)  # the centre-crop fallback
