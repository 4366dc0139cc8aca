"""Issue #15 (reliability), item 4: WSI tile coordinates outside the slide are refused when the tile
source is built (they would be read as white glass and trained on), naming the `.h5` file and row."""
import csv

import h5py
import numpy as np
import pytest

from medjax.data.tiling.coords import read_coords, tile_geometry, write_coords
from medjax.data.readers.wsi import open_slide
from medjax.data.pipelines.wsi_tiles import TileCoordsError, WSITileSource
from medjax.data.readers.wsi_write import write_pyramidal_tiff


@pytest.fixture()
def slide_dirs(tmp_path):
    """One 768x512 slide at 0.5 um/px (20x): 256-px tiles read at level 0."""
    slides, coords = tmp_path / "slides", tmp_path / "coords"
    slides.mkdir(), coords.mkdir()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 200, (512, 768, 3), dtype=np.uint8)
    write_pyramidal_tiff(str(slides / "s1.tif"), image, mpp=0.5, tile=128)
    return slides, coords


def _coords_file(slide_dirs, xy, dtype=np.int64):
    slides, coords = slide_dirs
    path = str(coords / "s1.h5")
    with open_slide(str(slides / "s1.tif")) as slide:
        write_coords(path, np.zeros((0, 2)), tile_geometry(slide, 256, 20.0), slide)
    with h5py.File(path, "a") as handle:  # replace the dataset keeping CLAM's attributes
        attrs = dict(handle["coords"].attrs)
        del handle["coords"]
        dataset = handle.create_dataset("coords", data=np.asarray(xy, dtype).reshape(-1, 2))
        dataset.attrs.update(attrs)
    return path


def test_coordinates_inside_are_accepted(slide_dirs):
    _coords_file(slide_dirs, [(0, 0), (512, 256), (256, 0)])
    source = WSITileSource.from_coords_dir(str(slide_dirs[0]), str(slide_dirs[1]))
    assert len(source) == 3 and source[1]["image"].shape == (256, 256, 3)


@pytest.mark.parametrize("xy, what", [
    ([(0, 0), (-256, 0)], r"row 1 of dataset 'coords': tile corner \(x, y\) = \[-256, 0\] is outside the slide"),
    ([(0, 0), (256, 0), (0, 600)], r"row 2 .*\[0, 600\] is outside the slide: .*level 0 is 768x512"),
    ([(768, 0)], r"row 0 .*\[768, 0\] is outside the slide"),
    ([(0, 0), (600, 0)], r"row 1 .*\[600, 0\] is reaching past the slide's edge"),
])
def test_coordinates_outside_the_slide_are_refused(slide_dirs, xy, what):
    path = _coords_file(slide_dirs, xy)
    with pytest.raises(TileCoordsError, match=r"s1\.h5: " + what):
        WSITileSource.from_coords_dir(str(slide_dirs[0]), str(slide_dirs[1]))
    assert path.endswith("s1.h5")


def test_nan_and_fractional_coordinates_name_the_file_and_row(slide_dirs):
    _coords_file(slide_dirs, [(0.0, 0.0), (np.nan, 0.0)], np.float64)
    with pytest.raises(ValueError, match=r"s1\.h5: row 1 of dataset 'coords': tile corner .*nan.* is not a pair of "
                                         "integer pixel coordinates"):
        read_coords(str(slide_dirs[1] / "s1.h5"))
    with pytest.raises(ValueError, match=r"s1\.h5: row 1"):
        WSITileSource.from_coords_dir(str(slide_dirs[0]), str(slide_dirs[1]))
    _coords_file(slide_dirs, [(0.0, 0.0), (256.0, 0.0), (3.5, 0.0)], np.float64)
    with pytest.raises(ValueError, match=r"s1\.h5: row 2 .*\[3\.5, 0\.0\]"):
        read_coords(str(slide_dirs[1] / "s1.h5"))
    _coords_file(slide_dirs, [(0.0, 0.0), (256.0, 256.0)], np.float64)  # integral floats are fine
    assert read_coords(str(slide_dirs[1] / "s1.h5"))[0].tolist() == [[0, 0], [256, 256]]


def test_direct_construction_and_labels_csv_are_checked(slide_dirs, tmp_path):
    slides = slide_dirs[0]
    path = str(slides / "s1.tif")
    with pytest.raises(TileCoordsError, match=r"s1\.tif: tile 2 \(row 2 of this slide's coordinates\).*\[0, -1\]"):
        WSITileSource([path], np.zeros(3, np.int32), np.array([(0, 0), (256, 0), (0, -1)]), [0], [256])
    with pytest.raises(ValueError, match=r"tile 1 .*not a pair of integer"):
        WSITileSource([path], np.zeros(2, np.int32), np.array([(0, 0), (np.nan, 1)]), [0], [256])
    with pytest.raises(TileCoordsError, match=r"patch_level 5, but slide .*s1\.tif has levels 0\.\.2"):
        WSITileSource([path], np.zeros(1, np.int32), np.array([(0, 0)]), [5], [256])
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([("slide_id", "x", "y", "label"), ("s1", 0, 0, 1), ("s1", 5000, 0, 2)])
    with pytest.raises(TileCoordsError, match=r"labels\.csv: line 3: tile corner \(x, y\) = \[5000, 0\] is outside"):
        WSITileSource.from_labels_csv(str(labels), str(slides))
