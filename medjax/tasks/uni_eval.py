"""UNI's evaluation of a frozen tile encoder (Chen et al., "Towards a general-purpose foundation model for
computational pathology", Nat. Med. 2024): tile-level kNN (k = 20) and linear-probe balanced accuracy on
labelled tiles ("ROI-level tasks"), and an ABMIL slide classifier on bags of tile features ("slide-level
tasks"), laid out like the paper's supplementary tables.

    results = evaluate_uni(feature_fn, config)       # feature_fn(images (b, H, W, 3) float32, ImageNet-normalised) -> (b, D)
    print(uni_results_table("uni_vitl16", [("step 125k", results)]))

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

import csv
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medjax.data.readers.image_folder import ImageFolderSource
from medjax.data.transforms.image import normalize_imagenet, resize
from medjax.errors import MedjaxInputError
from medjax.data.readers.text_io import open_text
from medjax.data.tiling.coords import read_coords, tile_slide
from medjax.data.tiling.tissue import PRESETS
from medjax.data.readers.wsi import SLIDE_EXTENSIONS
from medjax.data.pipelines.wsi_tiles import WSITileSource
from medjax.metrics.chance import AUC_CHANCE, CHANCE_SUFFIX, balanced_accuracy_chance, weighted_f1_chance
from medjax.metrics.fewshot import bootstrap_ci, fewshot_evaluate
from medjax.metrics.knn import knn_evaluate, knn_predict
from medjax.metrics.linear_probe import linear_probe_evaluate
from medjax.models.uni import uni_fields_from_params, uni_model
from medjax.tasks.uni_slide_classification import slide_level_eval

FeatureFn = Callable[[np.ndarray], Any]
# UNI ViT-L/16 in the paper (Chen et al. 2024, balanced accuracy), per benchmark the evaluation recognises; the table
# prints a target only when the data is that benchmark (issue #19: no paper number beside other data).
PAPER_TARGETS = {"crc100k": "CRC-100K (ROI, kNN k = 20) balanced accuracy 0.925"}
CRC100K_TRAIN = "NCT-CRC-HE-100K"  # CRC-100K's training folder (Kather et al. 2019); its test folder CRC-VAL-HE-7K


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


def tile_transform(image_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 tile (H, W, 3) -> float32 (image_size, image_size, 3): bilinear resize + ImageNet normalisation."""
    return lambda tile: normalize_imagenet(resize(tile, image_size))


def extract_features(feature_fn: FeatureFn, tiles: Iterable[np.ndarray], batch_size: int) -> np.ndarray:
    """Features (N, D) float32 of the images from `tiles` (each (H, W, 3) float32, ImageNet-normalised), in
    order. Every call of `feature_fn` gets a full batch of `batch_size` (the last one padded), so a jitted
    feature_fn compiles once; results are fetched a few batches late, so the accelerator keeps working while
    the host reads the next tiles."""
    if batch_size < 1:
        raise MedjaxInputError(f"extract_features: batch_size must be >= 1, got {batch_size}")
    out, batch, pending = [], [], []

    def fetch(keep: int):
        while len(pending) > keep:
            features, rows = pending.pop(0)
            features = np.asarray(features, np.float32)
            if features.ndim != 2 or features.shape[0] != batch_size:
                raise MedjaxInputError(f"feature_fn must map (b, H, W, 3) to (b, D); got {features.shape} for b = {batch_size}")
            out.append(features[:rows])

    def flush():
        rows = len(batch)
        images = np.stack(batch + [batch[-1]] * (batch_size - rows)).astype(np.float32)
        pending.append((feature_fn(images), rows))  # dispatched asynchronously by a jitted feature_fn
        batch.clear()
        fetch(keep=2)

    for image in tiles:
        batch.append(np.asarray(image))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    fetch(keep=0)
    if not out:
        raise MedjaxInputError("extract_features: no tiles")
    return np.concatenate(out)


def source_images(source: Sequence[dict], image_size: int, threads: int = 4) -> Iterable[np.ndarray]:
    """The transformed images of a tile source in order, read by `threads` threads (a window at a time)."""
    transform = tile_transform(image_size)
    load = lambda i: transform(source[i]["image"])  # noqa: E731
    window = max(threads, 1) * 16
    with ThreadPoolExecutor(max(threads, 1)) as pool:
        for start in range(0, len(source), window):
            yield from pool.map(load, range(start, min(start + window, len(source))))


def source_features(feature_fn: FeatureFn, source: Sequence[dict], settings) -> np.ndarray:
    return extract_features(feature_fn, source_images(source, settings.image_size, settings.read_threads),
                            settings.batch_size)


# ---- data -----------------------------------------------------------------------------------------------

def _read_csv(path: str, required: tuple[str, ...]) -> list[dict]:
    with open_text(path, f"CSV ({','.join(required)})") as handle:
        reader = csv.DictReader(handle)
        missing = set(required) - set(reader.fieldnames or ())
        if missing:
            raise MedjaxInputError(f"{path}: missing column(s) {sorted(missing)}; expected {','.join(required)}")
        return list(reader)


def _split_flags(rows: list[dict], path: str) -> np.ndarray | None:
    """True for test rows from a `split` column (train / val / test), None without one."""
    if not rows or "split" not in rows[0]:
        return None
    values = [row["split"].strip().lower() for row in rows]
    bad = sorted(set(values) - {"train", "val", "test"})
    if bad:
        raise MedjaxInputError(f"{path}: column 'split' must hold train, val or test, got {bad}")
    return np.array([v == "test" for v in values])


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True for held-out rows: per class, a seeded shuffle and the first floor(fraction * count) rows."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        test[rows[:int(fraction * len(rows))]] = True
    return test


def _slides_dir(root: str) -> str:
    return os.path.join(root, "slides") if os.path.isdir(os.path.join(root, "slides")) else root


def _slide_path(root: str, row: dict, path: str) -> str:
    if row.get("file"):
        candidate = os.path.join(root, row["file"])
        if os.path.isfile(candidate):
            return candidate
        raise MedjaxInputError(f"{path}: slide file {row['file']!r} of {row['slide_id']} not found under {root}")
    for ext in SLIDE_EXTENSIONS:
        candidate = os.path.join(_slides_dir(root), row["slide_id"] + ext)
        if os.path.isfile(candidate):
            return candidate
    raise MedjaxInputError(f"{path}: no slide {row['slide_id']!r} in {_slides_dir(root)} (extensions {SLIDE_EXTENSIONS})")


def _bag_source(root: str, slide_rows: list[dict], slides_csv: str, settings, work_dir: str) -> WSITileSource:
    """Every tissue tile of each slide (coords from `<root>/coords`, else tiled into `work_dir`)."""
    paths, index, coords, levels, sizes = [], [], [], [], []
    rng = np.random.default_rng(settings.abmil.seed)
    for s, row in enumerate(slide_rows):
        path = _slide_path(root, row, slides_csv)
        h5 = os.path.join(root, "coords", f"{row['slide_id']}.h5")
        if not os.path.isfile(h5):
            result = tile_slide(path, work_dir, patch_size=settings.patch_size, magnification=settings.magnification,
                                params=PRESETS[settings.tiling_preset or ("demo" if settings.is_demo else "default")])
            if result.status != "ok":
                raise MedjaxInputError(f"{path}: no tissue tiles for the ABMIL bag ({result.message})")
            h5 = result.h5_path
        xy, attrs = read_coords(h5)
        if settings.abmil.max_tiles and len(xy) > settings.abmil.max_tiles:
            xy = xy[np.sort(rng.choice(len(xy), settings.abmil.max_tiles, replace=False))]
        paths.append(path)
        index.append(np.full(len(xy), s, np.int32))
        coords.append(xy)
        levels.append(int(attrs["patch_level"]))
        sizes.append(int(attrs["patch_size"]))
    return WSITileSource(paths, np.concatenate(index), np.concatenate(coords), levels, sizes,
                         tile_size=settings.patch_size, allow_edge_tiles=True)


# ---- evaluation -----------------------------------------------------------------------------------------

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


def read_feature_bags(features_dir: str, slide_ids: Sequence[str], where: str) -> list[np.ndarray]:
    """Per slide the (N, D) float32 `features` of `<features_dir>/h5_files/<slide_id>.h5` (CLAM's
    extract_features_fp layout, `python -m medjax.extract`); a missing file is an error naming `where`."""
    import h5py

    bags = []
    for sid in slide_ids:
        path = os.path.join(features_dir, "h5_files", f"{sid}.h5")
        if not os.path.isfile(path):
            raise MedjaxInputError(f"{where}: slide {sid!r} has no features file {path} (run python -m medjax.extract)")
        with h5py.File(path, "r") as handle:
            if "features" not in handle:
                raise MedjaxInputError(f"{path}: no dataset 'features' (expected CLAM's layout: features, coords)")
            bags.append(np.asarray(handle["features"][()], np.float32))
    return bags


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
    source = WSITileSource.from_labels_csv(labels_csv, _slides_dir(root), patch_size=settings.patch_size,
                                           magnification=settings.magnification)
    labels = source.labels.astype(np.int64)
    test = _split_flags(_read_csv(labels_csv, ("slide_id", "x", "y", "label")), labels_csv)
    if test is None:
        test = stratified_holdout(labels, settings.test_fraction, settings.split_seed)
    results = tile_level_eval(source_features(feature_fn, source, settings), labels, test, settings)

    slides_csv = os.path.join(root, "slides.csv")
    if settings.abmil.enabled and os.path.isfile(slides_csv):
        rows = _read_csv(slides_csv, ("slide_id", "label"))
        try:
            slide_labels = np.array([int(row["label"]) for row in rows], np.int64)
        except ValueError as error:
            raise MedjaxInputError(f"{slides_csv}: column 'label' must hold integers ({error})") from error
        if settings.features_dir:
            bags = read_feature_bags(settings.features_dir, [row["slide_id"] for row in rows], slides_csv)
        else:
            with tempfile.TemporaryDirectory(prefix="medjax-uni-bags-") as work_dir:
                bag_source = _bag_source(root, rows, slides_csv, settings, work_dir)
                features = source_features(feature_fn, bag_source, settings)
            bags = [features[bag_source.slide_index == s] for s in range(len(rows))]
        results |= slide_level_eval(bags, slide_labels, _split_flags(rows, slides_csv), settings, slides_csv)
        results |= {"abmil/balanced_acc_chance": balanced_accuracy_chance(slide_labels), "abmil/auc_chance": AUC_CHANCE}
    if settings.is_demo:
        results["data/demo"] = 1.0  # synthetic tiles: the table prints no paper targets beside these numbers
    return results


# ---- the converted UNI model ------------------------------------------------------------------------------

def uni_feature_fn(params: Any, *, dtype: Any = jnp.float32, **overrides) -> FeatureFn:
    """feature_fn of UNI's encoder (`medjax.models.uni.UNIEncoder`) for params converted by `medjax.convert.uni`
    ({"encoder": ...}, optionally under "params", as `medjax.checkpoint.restore_params` returns them): images
    -> the 1024-d CLS feature. The architecture is read off the params' shapes; `overrides` replace fields."""
    params = nn.unbox(params.get("params", params))
    if "encoder" not in params:
        raise MedjaxInputError(f"uni_feature_fn: expected converted UNI params with an 'encoder' subtree, got keys "
                         f"{sorted(params)}")
    model = uni_model(dtype=dtype, **{**uni_fields_from_params(params), **overrides})
    apply = jax.jit(lambda p, images: model.apply({"params": p}, images).astype(jnp.float32))
    params = jax.device_put({"encoder": params["encoder"]})  # converted DINOv2 heads are not part of the feature
    return lambda images: apply(params, jnp.asarray(images))


# ---- the paper's table ------------------------------------------------------------------------------------

def _cell(results: dict, key: str) -> str:
    """The value, its 95% bootstrap CI where the evaluation gave one (`<key>_ci_low` / `_ci_high`) and its chance
    level (`<key>_chance`)."""
    if key not in results:
        return "–"
    chance = results.get(key + CHANCE_SUFFIX)
    ci = f" [{results[key + '_ci_low']:.3f}, {results[key + '_ci_high']:.3f}]" if key + "_ci_low" in results else ""
    return f"{results[key]:.3f}{ci}" + (f" (chance {chance:.3f})" if chance is not None else "")


def _fewshot_lines(columns: list[tuple[str, dict[str, float]]]) -> list[str]:
    """UNI's few-shot layout (`eval_fewshot`, Fig. 2 / Extended Data): SimpleShot balanced accuracy, mean +- std over
    the repeated draws, per labelled tiles per class."""
    shots = sorted({int(key.split("/")[1][:-4]) for _, results in columns for key in results
                    if key.startswith("fewshot/") and key.endswith("shot/balanced_acc")})
    if not shots:
        return []
    lines = ["", "| Few-shot (SimpleShot) | " + " | ".join(f"{k} per class" for k in shots) + " |",
             "|---|" + "---|" * len(shots)]
    for label, results in columns:
        cells = [f"{results[f'fewshot/{k}shot/balanced_acc']:.3f} ± {results[f'fewshot/{k}shot/balanced_acc_std']:.3f}"
                 if f"fewshot/{k}shot/balanced_acc" in results else "–" for k in shots]
        lines.append(f"| {label} balanced acc. | " + " | ".join(cells) + " |")
    return lines


def uni_results_table(exp: str, columns: list[tuple[str, dict[str, float]]]) -> str:
    """Markdown in the layout of UNI's supplementary tables: rows = task x metric, per evaluated checkpoint
    the columns kNN (k = 20) / linear probe / ABMIL."""
    rows = [("ROI: tile classes (tile_labels.csv)", "Balanced acc.", "balanced_acc"),
            ("ROI: tile classes (tile_labels.csv)", "Weighted F1", "weighted_f1"),
            ("Slide: slide label (slides.csv)", "Balanced acc.", "balanced_acc"),
            ("Slide: slide label (slides.csv)", "AUC", "auc")]
    if any("abmil/quadratic_kappa" in results for _, results in columns):  # ordinal slide labels (PANDA)
        rows.append(("Slide: slide label (slides.csv)", "Quadratic kappa", "quadratic_kappa"))
    header = "| Task | Metric | " + " | ".join(f"{label} kNN | {label} Linear | {label} ABMIL"
                                             for label, _ in columns) + " |"
    lines = [f"UNI evaluation of {exp} (Chen et al., Nat. Med. 2024, supplementary-table layout)", "",
             header, "|---|---|" + "---|" * (3 * len(columns))]
    for task, metric, key in rows:
        slide = task.startswith("Slide")
        cells = []
        for _, results in columns:
            cells += ["–", "–", _cell(results, f"abmil/{key}")] if slide else \
                [_cell(results, f"knn/{key}"), _cell(results, f"linear/{key}"), "–"]
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    lines += _fewshot_lines(columns)
    counts = columns[0][1] if columns else {}
    lines += ["", f"kNN: k = {int(counts.get('knn/k', 20))} [95% bootstrap CI]; linear: L-BFGS logistic regression; "
              f"ABMIL: CLAM's gated attention MIL. Tiles: "
              f"{int(counts.get('tiles/train', 0))} train / {int(counts.get('tiles/test', 0))} test; slides: "
              f"{int(counts.get('abmil/slides', 0))}."]
    if any(results.get("data/demo") for _, results in columns):  # issue #19: no paper targets beside demo numbers
        lines.append("Demo data (synthetic tiles of three tissue classes): not comparable with the paper's benchmarks, "
                     "whose numbers need the paper's data.")
    elif columns and all(results.get("data/crc100k") for _, results in columns):
        lines.append(f"UNI ViT-L/16 in the paper: {PAPER_TARGETS['crc100k']}.")
    else:
        lines.append("No paper targets: this data is not one of the paper's benchmarks (the table prints UNI's for "
                     f"CRC-100K, {CRC100K_TRAIN} / CRC-VAL-HE-7K).")
    return "\n".join(lines)
