"""CLIP-Driven Universal Model task: partial-label CT segmentation of 32 classes (Liu et al., ICCV 2023,
arXiv 2301.00785). Training: random crops from `medjax.data.pipelines.ct`, BCE + Dice over each
sample's labelled classes (`medjax.losses.segmentation`). Evaluation: per validation case, the masks of
`medjax.inference.universal_predictor` over the whole preprocessed volume (sliding windows, sigmoid > 0.5,
the original's post-processing), then Dice and NSD per labelled class
(`medjax.metrics.segmentation`), averaged over cases (cases whose ground truth lacks a class are
skipped for it, as the original's `test.py`).

Class text embeddings (`model.encoding`): "word_embedding" (the paper) needs `model.class_embeddings`,
a (32, 512) .npy from `python -m medjax.convert embed-classes` (or, when empty, the
`class_embeddings.npy` beside the `init=` weights, which the converter writes); otherwise an empty path
is an error, never a silent placeholder. "rand_embedding" learns a (32, 256) embedding instead (the demo and tiny
variants, which have no CLIP model at hand).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from medjax.data import demo as demo_lib
from medjax.data.pipelines.ct import CTAugment, CTVolumeCache, ct_train_dataset, read_ct_list
from medjax.data.verify import ct_checks
from medjax.inference.universal_eval import cases_from_cache, evaluate_cases, universal_results_table
from medjax.inference.universal_predictor import InferenceSettings, UniversalPredictor
from medjax.losses.segmentation import partial_label_bce_dice
from medjax.models import universal as universal_lib
from medjax.tasks.base import TaskBase, model_config
from medjax.tasks.common import data_root
from medjax.errors import MedjaxInputError

_WHERE = "medjax/tasks/universal.py"
CLASS_EMBEDDINGS_FILE = "class_embeddings.npy"  # beside converted weights: their frozen text embeddings
INIT_SIZE = 32  # init's spatial size: a multiple of Swin UNETR's 32 and UNet3D's 8 (`init_params`)


def _in_root(root: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(root, path)


def class_embedding_constants(model_cfg, weights_dir: str = "", log=print) -> dict:
    """{"constants": {"organ_embedding": (32, 512)}} for encoding word_embedding, else {} (module docstring):
    from `model.class_embeddings`, else the converter's CLASS_EMBEDDINGS_FILE beside `weights_dir`
    (training's init=, predict's --params)."""
    if model_cfg.encoding != "word_embedding":
        return {}
    path = model_cfg.class_embeddings
    beside = os.path.join(weights_dir, CLASS_EMBEDDINGS_FILE) if weights_dir else ""
    if not path and beside and os.path.isfile(beside):  # written by the weight converter
        log(f"class embeddings: {beside} (beside the weights {weights_dir})")
        path = beside
    if not path:
        raise MedjaxInputError(
            f"{_WHERE}: model.encoding='word_embedding' (the paper's setup) needs model.class_embeddings, the "
            f"(32, 512) CLIP text embeddings as .npy; make them with `python -m medjax.convert "
            f"embed-classes --clip CLIP_DIR --out emb.npy` and pass --set model.class_embeddings=emb.npy, or "
            f"train without text with --set model.encoding=rand_embedding (converted weights bring theirs as "
            f"{CLASS_EMBEDDINGS_FILE} beside them: init= for training, --params for predict)")
    embedding = universal_lib.load_class_embeddings(path, int(model_cfg.num_classes))
    return {universal_lib.CONSTANTS: {"organ_embedding": jnp.asarray(embedding)}}


class UniversalTask(TaskBase):
    def __init__(self, config, log=print, run=None):
        super().__init__(config, log, run)
        self.root = data_root(config.data, log)
        self.model = universal_lib.universal_from_config(model_config(config))
        self.crop_size = tuple(int(s) for s in config.data.crop_size)
        self.constants = class_embedding_constants(config.model, self.run.init, log)
        self.cache_dir = config.data.cache_dir or os.path.join(demo_lib.cache_dir(), "ct_cache")
        self.inference = InferenceSettings.from_config(config)

    def variables(self, params) -> dict:
        return {"params": params, **self.constants}

    # ----- training -----
    def work_per_example(self) -> tuple[int, str]:
        """Voxels of one training crop (96^3 in the paper), for `python -m medjax.bench step` throughput."""
        return int(np.prod(self.crop_size)), "voxels"

    def init_batch(self) -> dict:
        classes = int(self.config.model.num_classes)
        return {"image": np.zeros((self.global_batch, *self.crop_size, 1), np.float32),
                "label": np.zeros((self.global_batch, *self.crop_size, classes), np.uint8),
                "label_mask": np.zeros((self.global_batch, classes), bool)}

    def init_params(self, rng):
        """Params from a forward pass at `INIT_SIZE`^3 (or the crop, if smaller), batch 1: no param of Swin
        UNETR / UNet3D depends on the batch or the spatial size (the Swin bias tables follow the configured
        window), and every param's value comes from `rng` folded with its path, so these are the numbers a
        96^3 crop would give (tests/tasks/test_universal_init.py) while init traces and compiles a graph 27x
        smaller."""
        image = jnp.zeros((1, *(min(s, INIT_SIZE) for s in self.crop_size), 1), jnp.float32)
        return self.model.init({"params": rng}, image)["params"]

    def loss_fn(self, params, batch, rng, train):
        del rng  # no dropout / stochastic depth in the paper's setup
        logits = self.model.apply(self.variables(params), batch["image"], train=train)
        loss_cfg = self.config.loss
        return partial_label_bce_dice(logits, batch["label"], batch["label_mask"], smooth=float(loss_cfg.dice_smooth),
                                      bce_weight=float(loss_cfg.bce_weight), dice_weight=float(loss_cfg.dice_weight))

    def _augment(self) -> CTAugment:
        d = self.config.data
        return CTAugment(crop_size=self.crop_size, pos=float(d.pos), neg=float(d.neg),
                         class_ratios=tuple(float(r) for r in d.class_ratios), rotate90_prob=float(d.rotate90_prob),
                         shift_prob=float(d.shift_prob), shift_offset=float(d.shift_offset),
                         zoom_prob=float(d.zoom_prob), zoom_range=tuple(float(z) for z in d.zoom_range))

    def train_data(self):
        """Training crops (medjax.data.pipelines.ct), every pair's headers and voxel-data sizes checked first
        (data.verify, medjax.data.verify)."""
        d = self.config.data
        train_list = _in_root(self.root, d.train_list)
        self.verify_data(ct_checks(read_ct_list(train_list, self.root, check_headers=False)))
        return ct_train_dataset(
            train_list, root=self.root, cache_dir=self.cache_dir,
            global_batch=self.global_batch, seed=int(self.config.seed), augment=self._augment(),
            spacing=tuple(d.spacing), hu_range=tuple(d.hu_range), process_index=jax.process_index(),
            process_count=jax.process_count(), prefetch_threads=int(d.prefetch_threads),
            check_headers=False, on_bad_example=self.on_bad_example)

    # ----- evaluation -----
    @functools.cached_property
    def eval_cases(self):
        cases = read_ct_list(_in_root(self.root, self.config.data.val_list), self.root, check_headers=False)
        limit = int(self.config.eval.max_cases)
        cases = cases[:limit] if limit > 0 else cases
        self.verify_data(ct_checks(cases))
        return cases

    def predictor(self, params) -> UniversalPredictor:
        """Whole-volume prediction with `params` (medjax.inference.universal_predictor, config eval.*)."""
        return UniversalPredictor(self.model.apply, (self.variables(params),), self.inference)

    def evaluate(self, params) -> dict[str, float]:
        """Dice and NSD per class over the evaluation list (medjax.inference.universal_eval: `dice/<class>`,
        `nsd/<class>`, per dataset `dice/<id>/<class>`, `dice/mean`, `nsd/mean`, `cases`)."""
        d, e = self.config.data, self.config.eval
        cache = CTVolumeCache(self.cache_dir, spacing=tuple(d.spacing), hu_range=tuple(d.hu_range))
        return evaluate_cases(self.predictor(params).masks, cases_from_cache(self.eval_cases, cache),
                              spacing=tuple(d.spacing), nsd_tolerance_mm=float(e.nsd_tolerance_mm))

    def results_table(self, exp: str, columns: list[tuple[str, dict[str, float]]]) -> str:
        """The paper's BTCV (per-organ Dice) and MSD (Dice / NSD per task) layouts, whichever has data."""
        return universal_results_table(exp, columns)
