import numpy as np
import pytest

from medjax.data.transforms import image as T


def _disk_canvas():
    """A radius-10 disk (value 150 + noise-free gradient) centred at (20, 30) on a 50 x 60 black canvas."""
    canvas = np.zeros((50, 60, 3), np.uint8)
    yy, xx = np.mgrid[:50, :60]
    disk = (yy - 20) ** 2 + (xx - 30) ** 2 <= 100
    canvas[disk] = np.stack([100 + yy[disk], 50 + xx[disk], np.full(disk.sum(), 30)], -1)
    return canvas, disk


def test_circle_crop_synthetic_disk():
    canvas, disk = _disk_canvas()
    canvas[10, 20] = (200, 200, 200)  # inside the bounding box, outside the circle: masked away
    out = T.circle_crop(canvas)
    assert out.shape == (21, 21, 3) and out.dtype == np.uint8
    expected = canvas[10:31, 20:41].copy()
    expected[~disk[10:31, 20:41]] = 0
    np.testing.assert_array_equal(out, expected)
    assert out[0, 0].tolist() == [0, 0, 0]


def test_circle_crop_clipped_circle_keeps_full_diameter():
    # A disk of radius 10 centred at row 5 is cut by the top edge: the square keeps side 21 and
    # the rows above the photo are black.
    canvas = np.zeros((30, 40, 3), np.uint8)
    yy, xx = np.mgrid[:30, :40]
    canvas[(yy - 5) ** 2 + (xx - 20) ** 2 <= 100] = 120
    out = T.circle_crop(canvas)
    assert out.shape == (21, 21, 3)
    # bounding box rows 0..15 (height 16), centre 7.5 -> square rows -3..17 (floor); 3 black rows on top.
    assert out[:3].max() == 0
    np.testing.assert_array_equal(out[3:, 10], canvas[0:18, 20])


def test_resize_bilinear():
    image = np.zeros((4, 4, 3), np.uint8)
    image[:, 2:] = 200
    out = T.resize(image, 2)
    assert out.shape == (2, 2, 3)
    # PIL's bilinear filter widens with the scale (antialiasing, as torchvision's Resize on PIL
    # images): output column 0 sits at input x = 1.0, triangle weights 0.75, 0.75, 0.25 on input
    # columns 0, 1, 2 -> 200 * 0.25 / 1.75 = 28.6; column 1 -> 200 * 1.5 / 1.75 = 171.4.
    np.testing.assert_array_equal(out[..., 0], [[29, 171], [29, 171]])
    # Upsampling rows only: columns are untouched, a constant row stays constant.
    np.testing.assert_array_equal(T.resize(image, (8, 4)), np.repeat(image, 2, 0))
    constant = np.full((7, 5, 3), 77, np.uint8)
    np.testing.assert_array_equal(T.resize(constant, 3), np.full((3, 3, 3), 77))


def test_rotation():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    np.testing.assert_array_equal(T.rotate(image, 0.0), image)
    np.testing.assert_array_equal(T.random_rotation(image, 0.0, rng), image)
    np.testing.assert_array_equal(T.rotate(image, 90.0), np.rot90(image))  # counter-clockwise
    # Rotating by 45 degrees leaves the corners black (fill 0), the centre block unchanged.
    rotated = T.rotate(np.full((9, 9, 3), 255, np.uint8), 45.0)
    assert rotated[0, 0].tolist() == [0, 0, 0] and rotated[4, 4].tolist() == [255, 255, 255]


def test_random_rotation_angle_is_seeded():
    image = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    angle = np.random.default_rng(5).uniform(-20, 20)
    np.testing.assert_array_equal(T.random_rotation(image, 20.0, np.random.default_rng(5)), T.rotate(image, angle))


def test_random_hflip():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    np.testing.assert_array_equal(T.random_hflip(image, np.random.default_rng(0), p=1.0), image[:, ::-1])
    np.testing.assert_array_equal(T.random_hflip(image, np.random.default_rng(0), p=0.0), image)
    flips = [T.random_hflip(image, np.random.default_rng(s))[0, 0, 0] != 0 for s in range(200)]
    assert 70 < sum(flips) < 130


def test_normalize_imagenet_known_pixel():
    pixel = np.array([[[255, 0, 128]]], np.uint8)
    out = T.normalize_imagenet(pixel)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225],
                               rtol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        T.normalize_imagenet(pixel.astype(np.float32))


def test_train_and_eval_transforms():
    image = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(T.fundus_eval_transform(image), T.normalize_imagenet(image))
    plain = T.fundus_train_transform(image, np.random.default_rng(0), rotation=0.0, hflip=False)
    np.testing.assert_array_equal(plain, T.normalize_imagenet(image))
    a = T.fundus_train_transform(image, np.random.default_rng(7))
    b = T.fundus_train_transform(image, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    rng = np.random.default_rng(7)
    expected = T.random_hflip(T.random_rotation(image, 20.0, rng), rng)
    np.testing.assert_array_equal(a, T.normalize_imagenet(expected))
    assert a.shape == (16, 16, 3) and a.dtype == np.float32
