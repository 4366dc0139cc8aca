"""python -m medjax.predict --exp universal_swin --params DIR --input ct.nii.gz --out OUT.nii.gz
    [--variant V] [--per-class] [--batch-size N] [--overlap F] [--set k=v ...]

Segments a CT with the CLIP-Driven Universal Model (Liu et al., ICCV 2023, arXiv 2301.00785), as the
original's `pred_pseudo.py`: the NIfTI is preprocessed as for training (`medjax.data.transforms.ct_preprocess`: RAS,
the experiment's spacing and HU window, cropped to its foreground), predicted by
`medjax.inference.universal_predictor` (sliding windows of the model's crop size, overlap 0.5, Gaussian
weighting, sigmoid > eval.threshold, post-processing for the `eval.classes`, by default all 32). The class-id label map (0
background, 1..32 in `medjax.ontology.universal_classes.CLASS_NAMES` order; tumours over their organs) is
resampled, nearest neighbour, from the RAS grid back onto the input's own voxel grid and written with the
input's shape and affine. `--per-class` also writes one 0/1 mask per class beside it: OUT_<class>.nii.gz.

--params: a directory written by `medjax.checkpoint.save_params` (e.g. `python -m medjax.convert
universal --out DIR`) or a training workdir (its latest checkpoint).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

import numpy as np

from medjax.cli import EXIT_INPUT_ERROR, entry_point, error_line

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medjax.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", required=True, help="experiment name (universal_swin or universal_unet)")
    p.add_argument("--params", required=True, help="converted weights (save_params dir) or a training workdir")
    p.add_argument("--input", required=True, help="CT volume, NIfTI (.nii or .nii.gz), Hounsfield units")
    p.add_argument("--out", required=True, help="output label NIfTI path (.nii or .nii.gz)")
    p.add_argument("--variant", default=None,
                   help="config variant (must match the params); default: the one saved in a training workdir's "
                        "config.json, as evaluate does")
    p.add_argument("--per-class", action="store_true", help="also write one 0/1 mask per class: OUT_<class>.nii.gz")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows per forward pass (default: eval.sw_batch_size)")
    p.add_argument("--overlap", type=float, default=None, help="window overlap in [0, 1) (default: eval.overlap, 0.5)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    return p


def _stem(path: str) -> tuple[str, str]:
    for suffix in NIFTI_SUFFIXES:
        if path.endswith(suffix):
            return path[: -len(suffix)], suffix
    raise ValueError(f"--out {path}: expected a NIfTI file name ending in .nii or .nii.gz")


def segment_file(input_path: str, out_path: str, masks_fn: Callable[[np.ndarray], np.ndarray], *,
                 spacing: Sequence[float], hu_range: Sequence[float], per_class: bool = False) -> list[str]:
    """Preprocess `input_path` (`medjax.data.transforms.ct_preprocess.preprocess_ct`, as the training cache), predict
    bool (X, Y, Z, 32) masks of its foreground crop with `masks_fn` (e.g. `UniversalPredictor.masks`),
    write the class-id label map on the input's grid to `out_path` (and per-class masks); returns the
    paths written."""
    from medjax.data.readers.ct import read_nifti_header, resample, save_nifti
    from medjax.data.transforms.ct_preprocess import CTPreprocessing, preprocess_ct
    from medjax.inference.postprocess import NUM_CLASSES, merge_labels
    from medjax.inference.universal_eval import CLASS_KEYS

    stem, suffix = _stem(out_path)
    shape, affine = read_nifti_header(input_path)
    pre = preprocess_ct(input_path, preprocessing=CTPreprocessing(spacing, hu_range))
    crop = np.asarray(masks_fn(pre.image))
    if crop.shape != pre.image.shape + (NUM_CLASSES,):
        raise ValueError(f"{input_path}: the model gave masks {crop.shape} for a crop of {pre.image.shape}")
    masks = np.zeros(pre.grid_shape + (NUM_CLASSES,), dtype=bool)
    masks[pre.box] = crop

    def to_input_grid(array: np.ndarray) -> np.ndarray:
        return resample(array, pre.grid_affine, shape, affine, order=0)

    written = [out_path]
    save_nifti(out_path, to_input_grid(merge_labels(masks)), affine)
    if per_class:
        for c in range(1, NUM_CLASSES + 1):
            path = f"{stem}_{CLASS_KEYS[c - 1]}{suffix}"
            save_nifti(path, to_input_grid(masks[..., c - 1].astype(np.uint8)), affine)
            written.append(path)
    return written


@entry_point
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import jax

    from medjax import config as config_lib
    from medjax.checkpoint import CheckpointError
    from medjax.data.readers.ct import CTDataError
    from medjax.evaluate import saved_config
    from medjax.inference.universal_predictor import InferenceSettings, UniversalPredictor

    try:
        _stem(args.out)
        if not os.path.isfile(args.input):
            raise CTDataError(f"{args.input}: --input file not found")
        config = config_lib.run_config(args.exp, saved_config(args.params), args.variant, args.overrides)
        model, variables = load_universal(config, args.params)
        overrides = {k: v for k, v in (("batch_size", args.batch_size), ("overlap", args.overlap)) if v is not None}
        settings = InferenceSettings.from_config(config, **overrides)
        predictor = UniversalPredictor(model.apply, (jax.device_put(variables),), settings)
        written = segment_file(args.input, args.out, _class_masks(predictor, config), spacing=tuple(config.data.spacing),
                               hu_range=tuple(config.data.hu_range), per_class=args.per_class)
    except (config_lib.ConfigError, CTDataError, FileNotFoundError, ValueError, CheckpointError) as err:
        print(error_line(err), file=sys.stderr)
        return EXIT_INPUT_ERROR
    print(f"wrote {written[0]}" + (f" and {len(written) - 1} per-class masks" if len(written) > 1 else ""))
    return 0


def _class_masks(predictor, config) -> Callable[[np.ndarray], np.ndarray]:
    """`predictor.masks` restricted to `eval.classes` (empty: all 32): the classes the weights were trained on.
    A class no training dataset labels never gets a gradient (`medjax.losses.segmentation`), so its untrained
    logits would paint noise over the map: the demo variants, whose five datasets label 18 classes, list them."""
    from medjax.inference.postprocess import NUM_CLASSES

    classes = tuple(int(c) for c in (config.eval.get("classes", ()) or ())) or tuple(range(1, NUM_CLASSES + 1))
    bad = [c for c in classes if not 1 <= c <= NUM_CLASSES]
    if bad:
        raise ValueError(f"config eval.classes: class ids must be 1..{NUM_CLASSES}, got {bad}")
    keep = np.zeros(NUM_CLASSES, bool)
    keep[[c - 1 for c in classes]] = True

    def masks(volume: np.ndarray) -> np.ndarray:
        return np.asarray(predictor.masks(volume, classes)) & keep

    return masks


def saved_variant(params_dir: str) -> str | None:
    """The variant a training workdir was trained with (its `config.json`, as `medjax.evaluate` reads it), or None
    for converted weights."""
    from medjax.evaluate import saved_config

    return saved_config(params_dir).get("variant")


def load_universal(config, params_dir: str):
    """(model, variables) of a Universal Model experiment config and its weights: params from
    `restore_params(params_dir)` (a params tree, or a whole variables tree {"params", "constants"});
    for encoding "word_embedding" the frozen class text embeddings from the tree's "constants", else
    `tasks.universal.class_embedding_constants` (`model.class_embeddings`, or the .npy beside the weights)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from medjax import provenance
    from medjax.checkpoint import params_dir as resolve_params_dir
    from medjax.checkpoint import restore_params
    from medjax.models import universal as universal_lib
    from medjax.tasks.base import model_config
    from medjax.tasks.universal import class_embedding_constants

    if config.get("task") != "universal":
        raise ValueError(f"--exp {config.exp}: medjax.predict segments CT with Universal Model experiments "
                         f"(task 'universal'), this one's task is {config.get('task')!r}")
    model = universal_lib.universal_from_config(model_config(config))
    if not os.path.isdir(params_dir):
        raise FileNotFoundError(f"--params {params_dir}: no such directory (expected converted weights or a "
                                "training workdir)")
    directory = resolve_params_dir(params_dir)
    record = provenance.check_record(directory, config, what="--params")
    tree = restore_params(directory)
    if isinstance(tree, dict) and "params" in tree and set(tree) <= {"params", universal_lib.CONSTANTS, "batch_stats"}:
        variables = dict(tree)  # a whole variables tree (e.g. converted weights with their constants)
    else:
        variables = {"params": tree}
    window = tuple(int(s) for s in config.data.crop_size)
    expected = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *window, 1), jnp.float32)))
    differences = provenance.tree_differences(variables["params"], expected["params"])
    if differences:  # another variant or backbone: refused here rather than as a flax scope error
        raise provenance.mismatch_error(directory, record, config, ", ".join(differences), what="--params")
    if universal_lib.CONSTANTS not in variables:
        variables.update(class_embedding_constants(config.model, params_dir, log=lambda *_: None))
    return model, variables


if __name__ == "__main__":
    sys.exit(main())
