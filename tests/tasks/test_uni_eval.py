"""UNI evaluation (kNN, linear probe, ABMIL) on a small WSI demo, feature extraction, the converted-UNI
feature function and the paper-layout table."""
import csv
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from medjax.data.demo.wsi import make_wsi_demo
from medjax.errors import MedjaxInputError
from medjax.models.uni import uni_fields_from_params, uni_model
from medjax.tasks.uni_eval import evaluate_uni, uni_eval_config
from medjax.tasks.uni_eval_data import split_flags, stratified_holdout
from medjax.tasks.uni_eval_table import uni_results_table
from medjax.tasks.uni_tile_features import extract_features, uni_feature_fn
from medjax.tasks.uni_slide_classification import stratified_folds


@pytest.fixture(scope="module")
def wsi_demo(tmp_path_factory):
    """4 slides (2 with tumour), 2048 px wide at 20x: ~40 labelled tiles and ~100 tissue tiles; ~2 s."""
    return make_wsi_demo(str(tmp_path_factory.mktemp("uni_eval_demo")), num_slides=4, size=2048, seed=0)


@jax.jit
def colour_features(images):
    """A stand-in encoder: channel means / stds and the fraction of dark (nuclear) pixels, 16-d."""
    grid = images[:, ::4, ::4].mean(-1)  # (b, h, w)
    thresholds = jnp.array([-1.0, -0.5, 0.0, 0.5])
    dark = (grid[..., None] < thresholds).mean((1, 2))  # (b, 4)
    stats = [images.mean((1, 2)), images.std((1, 2)), dark, grid.std((1, 2))[:, None] * jnp.ones((1, 5))]
    return jnp.concatenate(stats, axis=-1)


def small_config(data_dir, **eval_overrides):
    block = dict(image_size=32, batch_size=16, knn=dict(k=5), tiling_preset="demo",
                 abmil=dict(epochs=4, hidden_dim=32, attention_dim=16, lr=1e-3))
    block.update(eval_overrides)
    return ml_collections.ConfigDict(dict(data=dict(dir=data_dir), uni_eval=block))


def test_evaluate_uni_on_the_wsi_demo(wsi_demo):
    results = evaluate_uni(colour_features, small_config(wsi_demo))
    with open(os.path.join(wsi_demo, "tile_labels.csv")) as handle:
        labels = np.array([int(row["label"]) for row in csv.DictReader(handle)])
    expected_test = stratified_holdout(labels, 0.3, 0).sum()
    assert results["tiles/test"] == expected_test and results["tiles/train"] == len(labels) - expected_test
    assert results["knn/k"] == 5 and results["abmil/slides"] == 4
    for key in ("knn/balanced_acc", "knn/weighted_f1", "linear/balanced_acc", "linear/weighted_f1",
                "abmil/balanced_acc", "abmil/auc"):
        assert 0.0 <= results[key] <= 1.0, key
    # Stroma, tumour and lymphocyte tiles differ in colour and nuclear density: kNN separates them.
    assert results["knn/balanced_acc"] >= 0.8
    assert results["knn/balanced_acc_ci_low"] <= results["knn/balanced_acc"] <= results["knn/balanced_acc_ci_high"]
    assert 0.0 < results["fewshot/1shot/balanced_acc"] <= 1.0 and "fewshot/1shot/balanced_acc_std" in results
    table = uni_results_table("uni_vitl16", [("demo", results)])
    chance = 1 / len(np.unique(labels[stratified_holdout(labels, 0.3, 0)]))  # 1 / tissue classes in the test tiles
    assert results["knn/balanced_acc_chance"] == results["linear/balanced_acc_chance"] == chance
    ci = f"[{results['knn/balanced_acc_ci_low']:.3f}, {results['knn/balanced_acc_ci_high']:.3f}]"
    assert f"| ROI: tile classes (tile_labels.csv) | Balanced acc. | {results['knn/balanced_acc']:.3f} {ci} (chance " \
           f"{chance:.3f}) | {results['linear/balanced_acc']:.3f} (chance {chance:.3f}) | – |" in table
    assert f"| Slide: slide label (slides.csv) | AUC | – | – | {results['abmil/auc']:.3f} (chance 0.500) |" in table
    one_shot = f"{results['fewshot/1shot/balanced_acc']:.3f} ± {results['fewshot/1shot/balanced_acc_std']:.3f}"
    assert "| Few-shot (SimpleShot) | 1 per class | 2 per class |" in table and f"| demo balanced acc. | {one_shot} |" in table
    # issue #19: no paper target beside numbers on other data (here a labelled WSI directory that is not a benchmark)
    assert "0.925" not in table and "No paper targets" in table


def test_extract_features_pads_to_one_batch_shape():
    calls = []

    def feature_fn(images):
        calls.append(images.shape)
        return images.reshape(len(images), -1)[:, :3] * 2.0

    images = [np.full((4, 4, 3), i, np.float32) for i in range(7)]
    features = extract_features(feature_fn, iter(images), batch_size=3)
    assert calls == [(3, 4, 4, 3)] * 3
    np.testing.assert_array_equal(features, 2.0 * np.repeat(np.arange(7.0)[:, None], 3, axis=1))
    with pytest.raises(ValueError, match="no tiles"):
        extract_features(feature_fn, [], 4)


def test_uni_feature_fn_on_converted_params():
    fields = dict(image_size=16, patch_size=8, width=16, depth=2, num_heads=2, mlp_ratio=2.0, layerscale_init=1e-5)
    model = uni_model(**fields)
    images = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), images))
    params = jax.tree.map(np.asarray, variables["params"])  # host arrays, as restore_params returns them
    read = {**fields, "mlp_dim": 32, "mlp_activation": "gelu", "num_register_tokens": 0, "no_embed_class": False}
    assert uni_fields_from_params(params) == {**read, "scan": False}
    features = uni_feature_fn({"params": params})(images)
    assert features.shape == (2, 16)
    # the scanned layout (encoder/blocks, layer on axis 0) is read off the params as well
    from medjax.nn.transformer import stack_layers

    scanned = stack_layers(params)
    assert uni_fields_from_params(scanned) == {**read, "scan": True}
    np.testing.assert_allclose(uni_feature_fn({"params": scanned})(images), features, atol=1e-5)
    # the same computation jitted separately (a persistent-cache hit): the wrapper adds nothing
    np.testing.assert_allclose(features, jax.jit(model.apply)(variables, images), atol=1e-5)
    with pytest.raises(ValueError, match="encoder"):
        uni_feature_fn({"student": {}})


def test_splits():
    labels = np.array([0] * 10 + [1] * 4 + [2] * 1)
    test = stratified_holdout(labels, 0.3, seed=0)
    assert [int(test[labels == c].sum()) for c in range(3)] == [3, 1, 0]
    np.testing.assert_array_equal(test, stratified_holdout(labels, 0.3, seed=0))
    folds = stratified_folds(labels, 2, seed=0)
    assert [int((folds[labels == 0] == f).sum()) for f in range(2)] == [5, 5]
    flags = split_flags([{"split": "train"}, {"split": "val"}, {"split": "Test"}], "x.csv")
    assert flags.tolist() == [False, False, True]
    assert split_flags([{"label": "1"}], "x.csv") is None
    with pytest.raises(ValueError, match="x.csv: column 'split'"):
        split_flags([{"split": "holdout"}], "x.csv")


def test_bad_configs(tmp_path):
    with pytest.raises(ValueError, match="no tile_labels.csv"):
        evaluate_uni(colour_features, small_config(str(tmp_path)))
    with pytest.raises(ValueError, match="config.uni_eval"):
        evaluate_uni(colour_features, small_config(str(tmp_path), knn_neighbours=3))
    assert uni_eval_config().knn.k == 20 and uni_eval_config().linear.max_iter == 1000


def test_roi_benchmark_in_imagefolder_layout(tmp_path):
    """CRC-100K's layout: train NCT-CRC-HE-100K/<CLASS>/*.tif, test CRC-VAL-HE-7K/<CLASS>/*.tif."""
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = {"ADI": (245, 240, 240), "LYM": (60, 40, 140), "TUM": (180, 70, 150)}
    for split, count in (("NCT-CRC-HE-100K", 6), ("CRC-VAL-HE-7K", 3)):
        for name, colour in colours.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (48, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / name / f"{name}-{i}.tif")
    config = small_config("", roi_train=str(tmp_path / "NCT-CRC-HE-100K"), roi_test=str(tmp_path / "CRC-VAL-HE-7K"))
    results = evaluate_uni(colour_features, config)
    assert results["tiles/train"] == 18 and results["tiles/test"] == 9
    assert results["knn/balanced_acc"] == 1.0 and results["linear/balanced_acc"] == 1.0  # colours separate
    # CRC-100K's folders: the paper's benchmark, so the table prints UNI's target for it
    assert "UNI ViT-L/16 in the paper: CRC-100K (ROI, kNN k = 20) balanced accuracy 0.925" in \
        uni_results_table("uni_vitl16", [("demo", results)])
    assert results["fewshot/1shot/balanced_acc"] == 1.0 and "abmil/slides" not in results
    (tmp_path / "CRC-VAL-HE-7K" / "STR").mkdir()
    with pytest.raises(MedjaxInputError, match=r"CRC-VAL-HE-7K: class directories \['STR'\] are not among"):
        evaluate_uni(colour_features, config)
