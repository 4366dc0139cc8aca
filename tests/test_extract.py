"""python -m medjax.extract: CLAM's extract_features_fp layout (h5_files/ + pt_files/), the same features as the
encoder applied to the same tiles read and transformed by hand, and resumption per slide."""
import os
import shutil

import flax.linen as nn
import h5py
import jax
import numpy as np
import pytest
import torch
from PIL import Image

from medjax import checkpoint
from medjax.data.readers.wsi import open_slide
from medjax.data.tiling.coords import read_coords
from medjax.extract import main
from medjax.models.uni import uni_model

TINY = dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, layerscale_init=0.5)
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


@pytest.fixture(scope="module")
def setup(demo_roots, tmp_path_factory):
    root = demo_roots("wsi")
    model = uni_model(**TINY, scan=False)
    params = nn.unbox(model.init(jax.random.key(3), np.zeros((1, 32, 32, 3), np.float32))["params"])
    params_dir = checkpoint.save_params(str(tmp_path_factory.mktemp("uni_params") / "p"), jax.device_get(params))
    return root, model, params, params_dir


def _reference(model, params, slide_path, coords, attrs):
    """Tiles read as the coords file says, PIL bilinear resize to 32 (torchvision Resize on PIL), ImageNet-normalised."""
    size, level = int(attrs["patch_size"]), int(attrs["patch_level"])
    with open_slide(slide_path) as slide:
        tiles = [np.asarray(Image.fromarray(slide.read_region(tuple(xy), level, (size, size))).resize(
            (32, 32), Image.Resampling.BILINEAR), np.float32) / 255.0 for xy in coords]
    images = (np.stack(tiles) - MEAN) / STD
    return np.asarray(model.apply({"params": params}, images))


def test_extract_writes_clam_files_with_the_encoders_features_and_resumes(setup, tmp_path, capsys):
    root, model, params, params_dir = setup
    coords_dir = tmp_path / "coords"
    shutil.copytree(os.path.join(root, "coords"), coords_dir)
    shutil.copy(coords_dir / "demo_000.h5", coords_dir / "demo_copy.h5")  # a second slide: the same file, renamed
    slides = tmp_path / "slides"
    shutil.copytree(os.path.join(root, "slides"), slides)
    shutil.copy(slides / "demo_000.tif", slides / "demo_copy.tif")
    out = tmp_path / "feats"
    argv = ["--exp", "uni_vitl16", "--variant", "tiny", "--params", params_dir, "--slides", str(slides),
            "--coords", str(coords_dir), "--out", str(out), "--batch-size", "8", "--threads", "2"]
    assert main(argv) == 0
    assert "extracted 2 slides" in capsys.readouterr().out

    coords, attrs = read_coords(str(coords_dir / "demo_000.h5"))
    expected = _reference(model, params, str(slides / "demo_000.tif"), coords, attrs)
    with h5py.File(out / "h5_files" / "demo_000.h5", "r") as handle:
        features, stored = handle["features"][()], handle["coords"][()]
        assert handle["coords"].attrs["patch_size"] == attrs["patch_size"]
    assert features.dtype == np.float32 and features.shape == (len(coords), 32) and len(coords) > 8  # 3 batches
    np.testing.assert_array_equal(stored, coords)
    np.testing.assert_allclose(features, expected, atol=1e-5)
    assert np.std(features[:, 0]) > 1e-3  # tiles differ
    pt = torch.load(out / "pt_files" / "demo_000.pt")
    np.testing.assert_array_equal(pt.numpy(), features)

    # Resume: a finished slide is skipped, one whose files are gone is done again.
    os.remove(out / "h5_files" / "demo_copy.h5")
    mtime = os.path.getmtime(out / "h5_files" / "demo_000.h5")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "extracted 1 slides" in printed and "skipped 1 done before" in printed
    assert os.path.getmtime(out / "h5_files" / "demo_000.h5") == mtime
    with h5py.File(out / "h5_files" / "demo_copy.h5", "r") as handle:
        np.testing.assert_allclose(handle["features"][()], expected, atol=1e-5)
    assert not [name for name in os.listdir(out / "h5_files") if name.endswith(".partial")]


def test_extract_names_a_coordinates_file_without_its_slide(setup, tmp_path, capsys):
    root, _, _, params_dir = setup
    coords_dir = tmp_path / "coords"
    coords_dir.mkdir()
    shutil.copy(os.path.join(root, "coords", "demo_000.h5"), coords_dir / "missing_slide.h5")
    code = main(["--exp", "uni_vitl16", "--variant", "tiny", "--params", params_dir, "--slides",
                 os.path.join(root, "slides"), "--coords", str(coords_dir), "--out", str(tmp_path / "f")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "missing_slide.h5" in err[0] and "no slide 'missing_slide'" in err[0]


def test_abmil_reads_the_extracted_feature_files(tmp_path):
    from medjax.errors import MedjaxInputError
    from medjax.inference.slide_features import write_features
    from medjax.tasks.uni_tile_features import read_feature_bags

    rng = np.random.default_rng(0)
    written = {}
    for sid, n in (("a", 5), ("b", 9)):
        written[sid] = rng.normal(size=(n, 4)).astype(np.float32)
        write_features(str(tmp_path), sid, written[sid], np.zeros((n, 2), np.int64), {"patch_size": 256})
    bags = read_feature_bags(str(tmp_path), ["b", "a"], "slides.csv")
    np.testing.assert_array_equal(bags[0], written["b"])
    np.testing.assert_array_equal(bags[1], written["a"])
    with pytest.raises(MedjaxInputError, match=r"slides.csv: slide 'c' has no features file .*h5_files/c\.h5"):
        read_feature_bags(str(tmp_path), ["c"], "slides.csv")
