"""Issue #15 (reliability), item 1: one image reader for every family (`medjax.data.read_image`).

Tiny images are written in real formats (PNG, TIFF, JPEG) by PIL or, for 16-bit colour PNG which
PIL cannot write, by a minimal PNG encoder below."""
import csv
import json
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from medjax.data import read_image
from medjax.data.errors import DataError
from medjax.data.transforms.image import circle_crop, resize

RAMP16 = np.array([[0, 1, 128, 129, 257], [1000, 32767, 32768, 65534, 65535]], np.uint16)


def _expected8(values):
    return np.round(np.asarray(values, np.float64) * 255 / 65535).astype(np.uint8)


def _gray3(values):
    return np.repeat(np.asarray(values, np.uint8)[..., None], 3, axis=-1)


def _png16_rgb(path, rgb16):
    """A 16-bit-per-channel RGB PNG (colour type 2, bit depth 16), filter 0 on every row."""
    h, w, _ = rgb16.shape

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16bit_gray_png_is_scaled_not_clipped(tmp_path):
    path = str(tmp_path / "g16.png")
    Image.fromarray(RAMP16).save(path)
    assert Image.open(path).mode == "I;16"
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (2, 5, 3)
    np.testing.assert_array_equal(out, _gray3(_expected8(RAMP16)))
    assert out[1, 2, 0] == 128 and out[1, 4, 0] == 255 and out[0, 4, 0] == 1  # mid-grey stays mid-grey


def test_16bit_big_endian_and_32bit_integer_images(tmp_path):
    big = Image.frombytes("I;16B", (5, 2), RAMP16.astype(">u2").tobytes())
    path = str(tmp_path / "g16b.tif")
    big.save(path)
    np.testing.assert_array_equal(read_image(path), _gray3(_expected8(RAMP16)))
    path = str(tmp_path / "i32.tif")
    Image.fromarray(RAMP16.astype(np.int32)).save(path)
    assert Image.open(path).mode == "I"
    np.testing.assert_array_equal(read_image(path), _gray3(_expected8(RAMP16)))
    bad = str(tmp_path / "i32_big.tif")
    Image.fromarray(np.array([[0, 70000]], np.int32)).save(bad)
    with pytest.raises(DataError, match=r"i32_big\.tif: .*outside the 16-bit range"):
        read_image(bad)
    flt = str(tmp_path / "f.tif")
    Image.fromarray(np.ones((2, 2), np.float32)).save(flt)
    with pytest.raises(DataError, match=r"f\.tif: 32-bit float image"):
        read_image(flt)


def test_16bit_colour_png_within_one_of_exact_scaling(tmp_path):
    rgb16 = np.stack([RAMP16, RAMP16[::-1], np.full_like(RAMP16, 40000)], axis=-1)
    path = str(tmp_path / "rgb16.png")
    _png16_rgb(path, rgb16)
    out = read_image(path)
    assert out.shape == (2, 5, 3)
    assert np.abs(out.astype(int) - _expected8(rgb16)).max() <= 1


def test_gray_bilevel_and_rgb(tmp_path):
    gray = np.array([[0, 17, 128, 255]], np.uint8)
    Image.fromarray(gray).save(tmp_path / "l.png")
    np.testing.assert_array_equal(read_image(tmp_path / "l.png"), _gray3(gray))
    Image.fromarray(np.array([[0, 255, 255, 0]], np.uint8)).convert("1").save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    np.testing.assert_array_equal(read_image(tmp_path / "b.png"), _gray3([[0, 255, 255, 0]]))
    rgb = np.arange(24, dtype=np.uint8).reshape(2, 4, 3) * 10
    Image.fromarray(rgb).save(tmp_path / "c.png")
    np.testing.assert_array_equal(read_image(str(tmp_path / "c.png")), rgb)


def test_palette_with_and_without_transparency(tmp_path):
    index = np.array([[0, 1], [2, 1]], np.uint8)
    palette = [10, 20, 30, 200, 0, 0, 0, 250, 5]
    for name, kwargs in (("p.png", {}), ("pt.png", {"transparency": 1})):
        im = Image.fromarray(index, "L").convert("P")
        im.putpalette(palette + [0] * (768 - len(palette)))
        im.putdata(index.ravel().tolist())
        im.save(tmp_path / name, **kwargs)
        assert Image.open(tmp_path / name).mode == "P"
        # transparent entries keep their palette colour (alpha dropped, documented)
        np.testing.assert_array_equal(read_image(tmp_path / name),
                                      np.array(palette, np.uint8).reshape(3, 3)[index])


def test_alpha_is_dropped_keeping_the_stored_colour(tmp_path):
    rgba = np.array([[[200, 100, 50, 0], [1, 2, 3, 128], [9, 8, 7, 255]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgba[..., :3])
    la = np.array([[[40, 0], [90, 255]]], np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert Image.open(tmp_path / "la.png").mode == "LA"
    np.testing.assert_array_equal(read_image(tmp_path / "la.png"), _gray3(la[..., 0]))


def test_cmyk(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]]], np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "k.tif")
    out = read_image(tmp_path / "k.tif")
    np.testing.assert_array_equal(out, [[[255, 255, 255], [0, 255, 255], [0, 0, 0]]])


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_exif_orientation_is_applied(tmp_path, ext):
    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:8, :16] = 255  # white block in the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    path = str(tmp_path / f"o.{ext}")
    Image.fromarray(stored).save(path, exif=exif, **({"quality": 95} if ext == "jpg" else {}))
    out = read_image(path)
    assert out.shape == (32, 16, 3)
    expected = np.rot90(stored, k=-1)
    assert np.abs(out.astype(int) - expected).max() <= (0 if ext == "png" else 40)
    assert out[:16, 8:].mean() > 200 and out[16:, :].mean() < 30  # the block is now top-right


def test_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.png: image file .*nope\.png not found"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match=r"junk\.png is not a readable image"):
        read_image(tmp_path / "junk.png")


def test_fundus_dataset_reads_16bit_images_scaled(tmp_path):
    from medjax.data.readers.fundus_genome import FundusGenomeDataset

    disk = np.zeros((24, 30), np.uint16)
    yy, xx = np.mgrid[:24, :30]
    disk[(yy - 12) ** 2 + (xx - 15) ** 2 <= 100] = 40000
    os.makedirs(tmp_path / "img")
    Image.fromarray(disk).save(tmp_path / "img" / "a.png")
    with open(tmp_path / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([["participant_id", "eye", "image_path"], ["p0", "left", "img/a.png"]])
    ds = FundusGenomeDataset(str(tmp_path), image_size=8, genotypes=None)
    image = ds[0]["image"]
    expected = resize(circle_crop(_gray3(_expected8(disk))), 8)
    np.testing.assert_array_equal(image, expected)
    assert image.max() == 156  # round(40000 / 257), not clipped to 255


def test_image_report_dataset_reads_16bit_images_scaled(tmp_path):
    from medjax.data.readers.image_report import ImageReportDataset

    Image.fromarray(RAMP16).save(tmp_path / "x.png")
    with open(tmp_path / "m.jsonl", "w") as f:
        f.write(json.dumps({"image": "x.png", "captions": ["A report."]}) + "\n")
    ds = ImageReportDataset(str(tmp_path / "m.jsonl"))
    np.testing.assert_array_equal(np.asarray(ds[0]["image"]), _gray3(_expected8(RAMP16)))
