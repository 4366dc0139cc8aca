"""UNI's evaluation of a frozen tile encoder (Chen et al., "Towards a general-purpose foundation model for
computational pathology", Nat. Med. 2024): tile-level kNN (k = 20) and linear-probe balanced accuracy on
labelled tiles ("ROI-level tasks"), and an ABMIL slide classifier on bags of tile features ("slide-level
tasks"), laid out like the paper's supplementary tables.

    results = evaluate_uni(feature_fn, config)       # feature_fn(images (b, H, W, 3) float32, ImageNet-normalised) -> (b, D)
    print(uni_results_table("uni_vitl16", [("step 125k", results)]))   # medjax.tasks.uni_eval_table

Here: the config block, the tile-level metrics (kNN, few-shot, linear probe) and the run over the data; the tiles'
features (and a converted UNI's feature_fn) are `medjax.tasks.uni_tile_features`, the CSVs, splits and ABMIL
bags `medjax.tasks.uni_eval_data`, the ABMIL classifier `medjax.tasks.uni_slide_classification`.

Data (`uni_eval.dir`, else `data.dir`, else the WSI demo of `python -m medjax.data make-demo --kind wsi`):
- `tile_labels.csv`: `slide_id,x,y,label[,split]`, level-0 corners of `patch_size` tiles at `magnification`;
  with a `split` column (train / val / test; val joins train, as UNI's `combine_trainval`) that split is
  used, else a stratified random split holding out `test_fraction` of each class (seeded; our choice, the
  demo has no official split);
- slides in `slides/` (or the directory itself), found by slide id;
- `slides.csv` (optional): `slide_id,label[,file][,split]`, slide labels for ABMIL. Bags are every tissue
  tile of a slide (CLAM's recipe: `<dir>/coords/<slide_id>.h5` when `python -m medjax.data tile` wrote
  them, else tiled now); with a `split` column train / test, else stratified k-fold cross-validation over
  slides with predictions pooled over folds (medjax.tasks.uni_slide_classification).
Tiles are read at 20x, resized to `image_size` (UNI's eval transform: Resize 224 + CenterCrop 224 of a
256-px tile) and ImageNet-normalised.
"""
from __future__ import annotations

import os
import tempfile

import ml_collections
import numpy as np

from medjax.data.pipelines.wsi_tiles import WSITileSource
from medjax.data.readers.image_folder import ImageFolderSource
from medjax.errors import MedjaxInputError
from medjax.metrics.chance import AUC_CHANCE, balanced_accuracy_chance, weighted_f1_chance
from medjax.metrics.fewshot import bootstrap_ci, fewshot_evaluate
from medjax.metrics.knn import knn_evaluate, knn_predict
from medjax.metrics.linear_probe import linear_probe_evaluate
from medjax.tasks.uni_eval_data import read_csv_rows, slide_bag_source, slides_dir, split_flags, stratified_holdout
from medjax.tasks.uni_eval_table import CRC100K_TRAIN
from medjax.tasks.uni_slide_classification import slide_level_eval
from medjax.tasks.uni_tile_features import FeatureFn, read_feature_bags, source_features


def uni_eval_config() -> ml_collections.ConfigDict:
    """The `uni_eval` config block (an experiment adds it as `c.uni_eval = uni_eval_config()`)."""
    return ml_collections.ConfigDict(dict(
        dir="",  # labelled WSI data (module doc); "" = data.dir, else the WSI demo
        image_size=224, batch_size=64,  # UNI eval transform: 224 px, ImageNet mean/std
        patch_size=256, magnification=20.0,  # UNI: 256 px tiles at 20x
        tiling_preset="",  # slides without coords/: CLAM's preset; "" = "default", "demo" on the WSI demo
        is_demo=False,  # set when dir falls back to the WSI demo
        # ROI benchmarks in ImageFolder layout (e.g. CRC-100K: roi_train=.../NCT-CRC-HE-100K,
        # roi_test=.../CRC-VAL-HE-7K): the tile-level metrics on those instead of tile_labels.csv
        roi_train="", roi_test="",
        features_dir="",  # `python -m medjax.extract` output (h5_files/<slide_id>.h5): ABMIL bags read from it
        test_fraction=0.3, split_seed=0,  # when tile_labels.csv has no split column (our choice)
        read_threads=4,
        knn=dict(k=20, voting="majority", temperature=0.07, center=True),  # UNI: k = 20, centred + L2-normalised
        linear=dict(max_iter=1000, penalty="uni"),
        # UNI eval_fewshot: SimpleShot over k = 1..32 labelled tiles per class; repeats our choice
        fewshot=dict(enabled=True, shots=(1, 2, 4, 8, 16, 32), repeats=100, seed=0),
        bootstrap=dict(samples=1000, seed=0),  # 95% CI of the kNN balanced accuracy (percentile bootstrap)  # UNI: L-BFGS, 1000 iterations, C = D * classes / 100
        # ABMIL = CLAM's gated attention (Attn_Net_Gated, size "small": FC 512, attention 256, dropout 0.25);
        # attention_dim=384 is CLAM's size "big", the width UNI's Methods report (medjax.models.abmil)
        abmil=dict(enabled=True, hidden_dim=512, attention_dim=256, dropout=0.25, epochs=20, lr=1e-4,
                   weight_decay=1e-5, folds=5, seed=0, max_tiles=0,  # max_tiles > 0: seeded subset per bag
                   ordinal=False),  # True: slide labels are ordered grades (PANDA ISUP): + quadratic kappa
    ))


def _settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Defaults updated with `config.uni_eval` (unknown keys are an error); `dir` resolved."""
    settings = uni_eval_config()
    settings.lock()
    block = config.get("uni_eval") if hasattr(config, "get") else None
    if block is not None:
        try:
            settings.update(block.to_dict() if hasattr(block, "to_dict") else dict(block))
        except (KeyError, AttributeError) as error:
            raise MedjaxInputError(f"config.uni_eval: {error}; known keys are those of uni_eval_config()") from error
    if not settings.dir and not settings.roi_train:  # ROI benchmarks need no WSI data
        data_dir = config.get("data", {}).get("dir", "") if hasattr(config, "get") else ""
        if data_dir:
            settings.dir = data_dir
        else:
            from medjax.data.demo import ensure_demo
            settings.dir = ensure_demo("wsi")
            settings.is_demo = True
    return settings


def tile_level_eval(features: np.ndarray, labels: np.ndarray, test: np.ndarray, settings) -> dict[str, float]:
    """kNN and linear-probe metrics (`knn/...`, `linear/...`) on the train / test rows of tile features."""
    train = ~test
    if not test.any() or not train.any():
        raise MedjaxInputError(f"UNI eval: need train and test tiles, got {train.sum()} train and {test.sum()} test")
    num_classes = int(labels.max()) + 1
    knn = settings.knn
    k = min(int(knn.k), int(train.sum()))  # fewer train tiles than k (tiny sets): all of them
    results = {f"knn/{name}": v for name, v in knn_evaluate(
        features[train], labels[train], features[test], labels[test], k=k, num_classes=num_classes,
        center=knn.center, voting=knn.voting, temperature=knn.temperature).items()}
    results["knn/k"] = float(k)
    if settings.bootstrap.samples:
        predictions, _ = knn_predict(features[train], labels[train], features[test], k=k, num_classes=num_classes,
                                     center=knn.center, voting=knn.voting, temperature=knn.temperature)
        low, high = bootstrap_ci(labels[test], predictions, samples=int(settings.bootstrap.samples),
                                 seed=int(settings.bootstrap.seed))
        results |= {"knn/balanced_acc_ci_low": low, "knn/balanced_acc_ci_high": high}
    if settings.fewshot.enabled:
        results |= {f"fewshot/{name}": v for name, v in fewshot_evaluate(
            features[train], labels[train], features[test], labels[test], shots=tuple(settings.fewshot.shots),
            repeats=int(settings.fewshot.repeats), seed=int(settings.fewshot.seed)).items()}
    results |= {f"linear/{name}": v for name, v in linear_probe_evaluate(
        features[train], labels[train], features[test], labels[test], num_classes=num_classes,
        max_iter=settings.linear.max_iter, penalty=settings.linear.penalty).items()}
    for probe in ("knn", "linear"):  # what an input-blind classifier scores on the test tiles (metrics.chance)
        results[f"{probe}/balanced_acc_chance"] = balanced_accuracy_chance(labels[test])
        results[f"{probe}/weighted_f1_chance"] = weighted_f1_chance(labels[test])
    return results | {"tiles/train": float(train.sum()), "tiles/test": float(test.sum())}


def roi_level_eval(feature_fn: FeatureFn, settings) -> dict[str, float]:
    """kNN / linear probe / few-shot on ROI images in ImageFolder layout (`uni_eval.roi_train`, `roi_test`; labels
    numbered by the train set's sorted class names)."""
    if not settings.roi_test:
        raise MedjaxInputError(f"uni_eval.roi_train={settings.roi_train!r} needs uni_eval.roi_test (the test images, "
                               "ImageFolder layout, e.g. CRC-VAL-HE-7K)")
    train = ImageFolderSource(settings.roi_train)
    test = ImageFolderSource(settings.roi_test, classes=train.classes)
    features = np.concatenate([source_features(feature_fn, train, settings), source_features(feature_fn, test, settings)])
    labels = np.concatenate([train.labels, test.labels]).astype(np.int64)
    is_test = np.arange(len(labels)) >= len(train)
    results = tile_level_eval(features, labels, is_test, settings)
    if os.path.basename(os.path.normpath(settings.roi_train)) == CRC100K_TRAIN:
        results["data/crc100k"] = 1.0  # the paper's ROI benchmark: the table prints its target
    return results


def evaluate_uni(feature_fn: FeatureFn, config: ml_collections.ConfigDict) -> dict[str, float]:
    """UNI's tile-level (kNN, linear probe) and slide-level (ABMIL) metrics of `feature_fn` (module doc);
    `config` is an experiment config whose optional `uni_eval` block overrides `uni_eval_config()`."""
    settings = _settings(config)
    if settings.roi_train:
        return roi_level_eval(feature_fn, settings)
    root = settings.dir
    labels_csv = os.path.join(root, "tile_labels.csv")
    if not os.path.isfile(labels_csv):
        raise MedjaxInputError(f"uni_eval.dir {root!r}: no tile_labels.csv (slide_id,x,y,label[,split]); point "
                         "uni_eval.dir at labelled WSI data or leave it empty for the demo")
    source = WSITileSource.from_labels_csv(labels_csv, slides_dir(root), patch_size=settings.patch_size,
                                           magnification=settings.magnification)
    labels = source.labels.astype(np.int64)
    test = split_flags(read_csv_rows(labels_csv, ("slide_id", "x", "y", "label")), labels_csv)
    if test is None:
        test = stratified_holdout(labels, settings.test_fraction, settings.split_seed)
    results = tile_level_eval(source_features(feature_fn, source, settings), labels, test, settings)

    slides_csv = os.path.join(root, "slides.csv")
    if settings.abmil.enabled and os.path.isfile(slides_csv):
        rows = read_csv_rows(slides_csv, ("slide_id", "label"))
        try:
            slide_labels = np.array([int(row["label"]) for row in rows], np.int64)
        except ValueError as error:
            raise MedjaxInputError(f"{slides_csv}: column 'label' must hold integers ({error})") from error
        if settings.features_dir:
            bags = read_feature_bags(settings.features_dir, [row["slide_id"] for row in rows], slides_csv)
        else:
            with tempfile.TemporaryDirectory(prefix="medjax-uni-bags-") as work_dir:
                bag_source = slide_bag_source(root, rows, slides_csv, settings, work_dir)
                features = source_features(feature_fn, bag_source, settings)
            bags = [features[bag_source.slide_index == s] for s in range(len(rows))]
        results |= slide_level_eval(bags, slide_labels, split_flags(rows, slides_csv), settings, slides_csv)
        results |= {"abmil/balanced_acc_chance": balanced_accuracy_chance(slide_labels), "abmil/auc_chance": AUC_CHANCE}
    if settings.is_demo:
        results["data/demo"] = 1.0  # synthetic tiles: the table prints no paper targets beside these numbers
    return results
