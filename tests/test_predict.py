"""`python -m medjax.predict`: a CT NIfTI in, one label NIfTI out on the input's own grid."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from medjax import predict
from medjax.data.readers.ct import save_nifti

SHAPE = (30, 26, 20)


def lps_affine(spacing, origin=(40.0, 30.0, -20.0)):
    """Voxel axes pointing left, posterior, superior (DICOM order): x and y flipped from RAS."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = origin
    return affine


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    hu = np.full(SHAPE, -1000, np.int16)  # air around a soft-tissue body with a dense block
    hu[4:26, 3:23, 2:18] = 40
    hu[8:14, 6:12, 5:10] = 200
    path = str(root / "ct.nii.gz")
    save_nifti(path, hu, lps_affine((2.0, 1.8, 3.0)))
    return root, path, hu


@pytest.fixture(scope="module")
def tiny_params(tmp_path_factory):
    from medjax import config as config_lib
    from medjax.checkpoint import save_params
    from medjax.models import universal as universal_lib
    from medjax.tasks.base import model_config

    config = config_lib.get_config("universal_swin", "tiny")
    model = universal_lib.universal_from_config(model_config(config))
    window = tuple(config.data.crop_size)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *window, 1), jnp.float32)))
    rng = np.random.default_rng(0)  # random weights without compiling init
    params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), shapes["params"])
    return save_params(str(tmp_path_factory.mktemp("params") / "tiny"), params)


def test_round_trip_keeps_the_input_grid(ct_file, tiny_params):
    root, path, _ = ct_file
    out = str(root / "out" / "label.nii.gz")
    rc = predict.main(["--exp", "universal_swin", "--variant", "tiny", "--params", tiny_params, "--input", path,
                       "--out", out, "--per-class"])
    assert rc == 0
    source, written = nib.load(path), nib.load(out)
    assert written.shape == SHAPE
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    label = np.asarray(written.dataobj)
    assert label.dtype == np.uint8 and label.max() <= 32
    per_class = sorted(f for f in os.listdir(root / "out") if f.startswith("label_"))
    assert len(per_class) == 32 and "label_liver.nii.gz" in per_class
    liver = nib.load(str(root / "out" / "label_liver.nii.gz"))
    assert liver.shape == SHAPE and set(np.unique(np.asarray(liver.dataobj))) <= {0, 1}
    # tiny / demo write only the classes the demo labels (eval.classes): never the untrained left lung (17)
    from medjax.data.demo.ct import labelled_classes
    assert set(np.unique(label)) - {0} <= set(labelled_classes())
    assert not np.asarray(nib.load(str(root / "out" / "label_left_lung.nii.gz")).dataobj).any()


def test_label_lands_on_the_input_voxels(ct_file):
    """A fake model marking voxels brighter than soft tissue as liver: at the training spacing (1.5 mm)
    on an LPS file the label read back must be exactly those voxels of the input."""
    root, _, _ = ct_file
    hu = np.full((20, 18, 12), -1000, np.int16)
    hu[3:17, 2:16, 1:11] = 40
    hu[4:9, 10:14, 2:6] = 300
    path = str(root / "lps15.nii.gz")
    save_nifti(path, hu, lps_affine((1.5, 1.5, 1.5)))

    def masks_fn(volume):
        masks = np.zeros(volume.shape + (32,), bool)
        masks[..., 5] = volume > 0.9  # 300 HU scales to 1.0, 40 HU to 0.51
        return masks

    out = str(root / "lps15_label.nii")
    predict.segment_file(path, out, masks_fn, spacing=(1.5, 1.5, 1.5), hu_range=(-175.0, 250.0))
    label = np.asarray(nib.load(out).dataobj)
    np.testing.assert_array_equal(label, np.where(hu == 300, 6, 0))


def test_bad_inputs_name_the_file(ct_file, tiny_params, capsys):
    root, path, _ = ct_file
    missing = str(root / "missing.nii.gz")
    assert predict.main(["--exp", "universal_swin", "--variant", "tiny", "--params", tiny_params, "--input", missing,
                         "--out", str(root / "x.nii.gz")]) == 2
    assert missing in capsys.readouterr().err
    assert predict.main(["--exp", "universal_swin", "--variant", "tiny", "--params", tiny_params, "--input", path,
                         "--out", str(root / "x.png")]) == 2
    assert "x.png" in capsys.readouterr().err
    not_nifti = root / "notes.nii.gz"
    not_nifti.write_text("not a volume")
    assert predict.main(["--exp", "universal_swin", "--variant", "tiny", "--params", tiny_params, "--input",
                         str(not_nifti), "--out", str(root / "y.nii.gz")]) == 2
    assert str(not_nifti) in capsys.readouterr().err
    assert predict.main(["--exp", "universal_swin", "--variant", "tiny", "--params", str(root / "nothing"),
                         "--input", path, "--out", str(root / "z.nii.gz")]) == 2
    assert "nothing" in capsys.readouterr().err


def test_variant_defaults_to_the_training_workdirs_config(tiny_params, tmp_path):
    """A training workdir's config.json gives the variant, as for evaluate (issue #23)."""
    import json
    import shutil

    workdir = str(tmp_path / "run")
    shutil.copytree(tiny_params, workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"variant": "tiny", "exp": "universal_swin"}, f)
    assert predict.saved_variant(workdir) == "tiny" and predict.saved_variant(tiny_params) is None
