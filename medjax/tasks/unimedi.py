"""UniMedI pretraining (He et al., ECCV 2024): unpaired 2D image-report and 3D volume-report pairs in one batch,
one ViT (`medjax.models.unimedi`).

Loss (Sec. 3): L = w_vl L_vl + w_icl L_icl + w_pcl L_pcl.
- L_vl: CLIP's symmetric InfoNCE with a learnable temperature between the projected image [CLS] and report
  [CLS], over all 2D and 3D samples of the global batch together. 3D samples are encoded as pseudo pairs: the
  volume's T_3D tokens plus the T_2D tokens of its k attentively selected slices (selection by the student
  E_v itself, without gradient).
- L_icl / L_pcl: DINO self-distillation. The teacher (an EMA of the student's `vision` + `dino_head`) sees every
  token; the student sees the same token sets with `distill.mask_ratio` of the patch tokens (2D and 3D, the
  slice tokens too) replaced by the mask token. L_icl: H(P_t, P_s) on [CLS]; L_pcl: the same on the masked
  patch tokens (iBOT). Teacher targets: Sinkhorn-Knopp (DINOv2), so no running center is kept.
  `distill.contrast_on_masked_view`: compute L_vl on the student's masked view instead of a separate unmasked
  forward (cheaper; the paper does not say which it does -- default False: an unmasked forward).

Params: {"student": UniMedI params, "teacher": {"vision", "dino_head"}}; `optim.frozen` keeps the teacher out of
the optimizer and `post_update` moves it by EMA (DINO's cosine momentum 0.996 -> 1).
Batch: "images" (B2, S, S, 3) + "image_input_ids" / "image_attention_mask" (B2, T); "volumes" (B3, D, H, W, 1) +
"volume_input_ids" / "volume_attention_mask" (B3, T); B2 = round(data.fraction_2d * batch), B3 the rest, either
may be 0 (that kind's keys are then absent).
"""
from __future__ import annotations

import functools
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from medjax.data import demo as demo_lib
from medjax.data.errors import DataError
from medjax.data.readers.image_report import ImageReportDataset, load_tokenizer, pick_sentence, tokenize
from medjax.data.pipelines.bad_examples import SKIPPED_KEY
from medjax.data.pipelines.global_batches import global_batch_dataset, process_batch_size
from medjax.data.verify import image_report_checks, volume_report_checks
from medjax.data.readers.volume_report import VolumeReportDataset
from medjax.losses import dino as dino_losses
from medjax.losses.contrastive import clip_contrastive_loss, l2_normalize
from medjax.metrics.classification import macro_auc
from medjax.metrics.retrieval import report_retrieval_recall
from medjax.models import unimedi as unimedi_lib
from medjax.models.dinov2 import DINOHead, ema_update
from medjax.params import merge_params
from medjax.tasks import unimedi_tables
from medjax.tasks.base import TaskBase
from medjax.tasks.common import report_encoder
from medjax.errors import MedjaxInputError


def normalize_pixels(x: np.ndarray) -> np.ndarray:
    """[0, 1] -> [-1, 1], the same for X-ray pixels and CT intensities (our choice: one scale for both
    tokenizers' inputs, since CT slices go through T_2D too)."""
    return (np.asarray(x, np.float32) - 0.5) / 0.5


class ImageExample:
    """Picklable (image-report sample, rng) -> image (S, S, 3) in [-1, 1] (bicubic resize) + report tokens."""

    def __init__(self, tokenizer, image_size: int, max_length: int):
        self.tokenizer, self.image_size, self.max_length = tokenizer, int(image_size), int(max_length)

    def __call__(self, example: dict, rng: np.random.Generator | None = None) -> dict:
        image = example["image"].convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        text = tokenize(self.tokenizer, pick_sentence(example["caption"], None), self.max_length)
        return {"images": normalize_pixels(np.asarray(image, np.float32) / 255.0),
                "image_input_ids": text["input_ids"], "image_attention_mask": text["attention_mask"]}


class VolumeExample:
    """Picklable (volume-report sample, rng) -> volume (D, H, W, 1) in [-1, 1] + report tokens."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, int(max_length)

    def __call__(self, example: dict, rng: np.random.Generator | None = None) -> dict:
        text = tokenize(self.tokenizer, pick_sentence(example["caption"], None), self.max_length)
        return {"volumes": normalize_pixels(example["volume"])[..., None],
                "volume_input_ids": text["input_ids"], "volume_attention_mask": text["attention_mask"]}


def merge_kinds(parts) -> dict:
    """One batch dict from the per-kind batches; with data.on_bad_example=skip each kind carries its per-example
    skip counts, which are concatenated (2D first) so the trainer sums them over the whole batch."""
    merged = {k: v for p in parts for k, v in p.items() if k != SKIPPED_KEY}
    skipped = [p[SKIPPED_KEY] for p in parts if SKIPPED_KEY in p]
    if skipped:
        merged[SKIPPED_KEY] = np.concatenate(skipped)
    return merged


def _zip_batches(*datasets):
    """One iterator of merged batch dicts from per-kind pipelines (each checkpointable; the zip's state is theirs)."""
    import grain.experimental as grain_experimental

    if len(datasets) == 1:
        return datasets[0]
    return grain_experimental.ZipIterDataset(list(datasets)).map(merge_kinds)


def dino_momentum(base: float, total_steps: int):
    """DINO's teacher momentum m(t) = 1 - (1 - base) (cos(pi t / T) + 1) / 2 (Caron et al. 2021, Sec. 3.1)."""
    def schedule(step):
        t = jnp.minimum(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 1.0)
        return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * t) + 1.0) / 2.0
    return schedule


class UniMedITask(TaskBase):
    def __init__(self, config, log=print, run=None):
        super().__init__(config, log, run)
        d, m = config.data, config.model
        self.root = d.dir or demo_lib.ensure_demo("xray_ct_reports", log=log)
        self.tokenizer = load_tokenizer(d.tokenizer or os.path.join(self.root, "tokenizer"))
        fraction = float(d.fraction_2d)
        if not 0.0 <= fraction <= 1.0:
            raise MedjaxInputError(f"data.fraction_2d={fraction} must be in [0, 1]")
        self.batch_2d = int(round(fraction * self.global_batch))
        self.batch_3d = self.global_batch - self.batch_2d
        self.volume_shape = tuple(int(s) for s in m.volume_shape)
        self.k = int(m.num_selected_slices)
        dtype = jnp.dtype(config.dtype)
        self.text_init = m.get("init_text", "")
        text, self._text_variables = report_encoder(m, self.tokenizer, dtype, d.tokenizer or self.root)
        vision = unimedi_lib.UniMedIVision(
            image_size=m.image_size, patch_size=m.patch_size, volume_shape=self.volume_shape,
            volume_patch=tuple(m.volume_patch), width=m.width, depth=m.depth, num_heads=m.num_heads,
            mlp_ratio=m.mlp_ratio, drop_path=m.drop_path, scan=m.get("scan"), remat=m.remat, dtype=dtype)
        h = config.head
        head = DINOHead(h.out_dim, h.hidden_dim, h.bottleneck_dim, h.num_layers, dtype=dtype)
        self.model = unimedi_lib.UniMedI(vision, text, head, embed_dim=m.embed_dim,
                                         init_temperature=config.loss.init_temperature, dtype=dtype)
        self.momentum_fn = dino_momentum(float(config.distill.teacher_momentum), self.run.total_steps)
        self.n2 = (m.image_size // m.patch_size) ** 2
        self.n3 = vision.num_volume_patches

    # ---- shapes ------------------------------------------------------------------------------------------
    def work_per_example(self) -> tuple[int, str]:
        """Encoder tokens per example (2D and 3D mixed by data.fraction_2d), counting the selection forward,
        the student's two views and the teacher's."""
        tokens_2d = 3 * (1 + self.n2)
        tokens_3d = (1 + self.n3) + 3 * (1 + self.n3 + self.k * self.n2)
        share = self.batch_2d / max(self.global_batch, 1)
        return int(round(share * tokens_2d + (1 - share) * tokens_3d)), "tokens"

    def init_batch(self) -> dict:
        t, s = int(self.config.data.max_length), int(self.config.model.image_size)
        batch = {}
        if self.batch_2d:
            batch.update(images=np.zeros((self.batch_2d, s, s, 3), np.float32),
                         image_input_ids=np.zeros((self.batch_2d, t), np.int32),
                         image_attention_mask=np.ones((self.batch_2d, t), np.int32))
        if self.batch_3d:
            batch.update(volumes=np.zeros((self.batch_3d,) + self.volume_shape + (1,), np.float32),
                         volume_input_ids=np.zeros((self.batch_3d, t), np.int32),
                         volume_attention_mask=np.ones((self.batch_3d, t), np.int32))
        return batch

    def init_params(self, rng):
        t, s = int(self.config.data.max_length), int(self.config.model.image_size)
        images = jnp.zeros((1, s, s, 3))
        volumes = jnp.zeros((1,) + self.volume_shape + (1,))
        slabs = jnp.zeros((1, self.k), jnp.int32)
        ids, mask = jnp.zeros((1, t), jnp.int32), jnp.ones((1, t), jnp.int32)
        student = self.model.init({"params": rng, "dropout": rng}, images, volumes, slabs, ids, mask)["params"]
        teacher = {"vision": jax.tree.map(lambda x: x, student["vision"]),
                   "dino_head": jax.tree.map(lambda x: x, student["dino_head"])}
        return {"student": student, "teacher": teacher}

    def initial_params(self, params):
        """The text encoder from `model.init_text` (a local Hugging Face BERT directory, e.g. BioClinicalBERT)."""
        if self._text_variables is None:
            return params
        student = dict(params["student"])
        student["text"], report = merge_params(params["student"]["text"], self._text_variables["params"])
        self.log(f"text encoder from {self.text_init}: {report}")
        return dict(params, student=student)

    # ---- loss -----------------------------------------------------------------------------------------
    def _masks(self, rng, batch_size: int, tokens: int) -> jax.Array:
        return unimedi_lib.random_token_masks(rng, batch_size, tokens, float(self.config.distill.mask_ratio))

    def _forward(self, params, batch, rng, train):
        """(image embeddings, text embeddings, student [CLS] logits, student masked-patch logits, teacher [CLS]
        logits, teacher masked-patch logits, metrics)."""
        model, student = self.model, params["student"]
        teacher = jax.lax.stop_gradient(params["teacher"])
        cfg = self.config.distill
        keys = iter(jax.random.split(rng, 8))
        apply = functools.partial(model.apply, {"params": student})
        cls_full, cls_masked, patches_s, patches_t, cls_teacher, texts = [], [], [], [], [], []
        if self.batch_2d:
            images = batch["images"]
            masks = self._masks(next(keys), images.shape[0], self.n2)
            student_view = apply(images, masks, train=train, rngs={"dropout": next(keys)},
                                 method=unimedi_lib.UniMedI.encode_images)
            teacher_view = model.vision.apply({"params": teacher["vision"]}, images, method=_encode_images_vision)
            full = student_view if cfg.contrast_on_masked_view else apply(
                images, train=train, rngs={"dropout": next(keys)}, method=unimedi_lib.UniMedI.encode_images)
            order = jnp.argsort(~masks, axis=1, stable=True)[:, :self._masked_count(self.n2)] + 1
            cls_full.append(full[:, 0]), cls_masked.append(student_view[:, 0]), cls_teacher.append(teacher_view[:, 0])
            patches_s.append(_take(student_view, order)), patches_t.append(_take(teacher_view, order))
            texts.append(apply(batch["image_input_ids"], batch["image_attention_mask"], train=train,
                               rngs={"dropout": next(keys)}, method=unimedi_lib.UniMedI.text_embedding))
        if self.batch_3d:
            volumes = batch["volumes"]
            slabs, _ = unimedi_lib.select_volume_slices(model, jax.lax.stop_gradient(student), volumes, self.k)
            b3 = volumes.shape[0]
            n_tokens = self.n3 + self.k * self.n2
            masks = self._masks(next(keys), b3, n_tokens)
            volume_masks, slice_masks = masks[:, :self.n3], masks[:, self.n3:]
            student_view = apply(volumes, slabs, volume_masks, slice_masks, train=train, rngs={"dropout": next(keys)},
                                 method=unimedi_lib.UniMedI.encode_volumes)
            teacher_view = model.vision.apply({"params": teacher["vision"]}, volumes, slabs,
                                              method=_encode_volumes_vision)
            full = student_view if cfg.contrast_on_masked_view else apply(
                volumes, slabs, train=train, rngs={"dropout": next(keys)}, method=unimedi_lib.UniMedI.encode_volumes)
            order = jnp.argsort(~masks, axis=1, stable=True)[:, :self._masked_count(n_tokens)] + 1
            cls_full.append(full[:, 0]), cls_masked.append(student_view[:, 0]), cls_teacher.append(teacher_view[:, 0])
            patches_s.append(_take(student_view, order)), patches_t.append(_take(teacher_view, order))
            texts.append(apply(batch["volume_input_ids"], batch["volume_attention_mask"], train=train,
                               rngs={"dropout": next(keys)}, method=unimedi_lib.UniMedI.text_embedding))
        image_embeds = apply(jnp.concatenate(cls_full), method=unimedi_lib.UniMedI.image_embedding)
        text_embeds = jnp.concatenate(texts)
        width = cls_full[0].shape[-1]
        flat = lambda parts: jnp.concatenate([p.reshape(-1, width) for p in parts])  # noqa: E731
        student_rows = jnp.concatenate([jnp.concatenate(cls_masked), flat(patches_s)])
        teacher_rows = jnp.concatenate([jnp.concatenate(cls_teacher), flat(patches_t)])
        student_logits = apply(student_rows, method=unimedi_lib.UniMedI.head)
        teacher_logits = jax.lax.stop_gradient(model.dino_head.apply({"params": teacher["dino_head"]}, teacher_rows))
        n_cls = image_embeds.shape[0]  # the [CLS] rows come first (a microbatch under grad_accum)
        return (image_embeds, text_embeds, student_logits[:n_cls], student_logits[n_cls:], teacher_logits[:n_cls],
                teacher_logits[n_cls:], apply(method=unimedi_lib.UniMedI.temperature_scale))

    def _masked_count(self, tokens: int) -> int:
        return int(round(float(self.config.distill.mask_ratio) * tokens))

    def loss_fn(self, params, batch, rng, train):
        cfg, loss_cfg = self.config.distill, self.config.loss
        (image_embeds, text_embeds, student_cls, student_patches, teacher_cls, teacher_patches,
         scale) = self._forward(params, batch, rng, train)
        vl = clip_contrastive_loss(image_embeds, text_embeds, scale)
        temp, iterations = float(cfg.teacher_temp), int(cfg.sinkhorn_iterations)
        cls_targets = dino_losses.sinkhorn_knopp(teacher_cls, temp, iterations)
        icl = jnp.mean(dino_losses.cross_entropy(cls_targets, student_cls, float(cfg.student_temp)))
        if student_patches.shape[0]:
            patch_targets = dino_losses.sinkhorn_knopp(teacher_patches, temp, iterations)
            pcl = jnp.mean(dino_losses.cross_entropy(patch_targets, student_patches, float(cfg.student_temp)))
        else:
            pcl = jnp.zeros((), jnp.float32)
        loss = loss_cfg.vl_weight * vl + loss_cfg.icl_weight * icl + loss_cfg.pcl_weight * pcl
        sims = l2_normalize(image_embeds) @ l2_normalize(text_embeds).T
        accuracy = jnp.mean(jnp.argmax(sims, axis=1) == jnp.arange(sims.shape[0]))
        return loss, {"vl_loss": vl, "icl_loss": icl, "pcl_loss": pcl, "temperature": 1.0 / scale,
                      "itc_accuracy": accuracy.astype(jnp.float32)}

    def post_update(self, params, metrics, step):
        """EMA of the student's vision encoder and DINO head into the teacher."""
        momentum = self.momentum_fn(step)
        student = params["student"]
        teacher = ema_update(params["teacher"], {"vision": student["vision"], "dino_head": student["dino_head"]},
                             momentum)
        return dict(params, teacher=teacher), dict(metrics, teacher_momentum=momentum)

    # ---- data ---------------------------------------------------------------------------------------
    def _file(self, name: str) -> str:
        path = os.path.join(self.root, name)
        if not os.path.isfile(path):
            raise DataError(f"data.dir={self.root!r}: manifest {path} not found (see the config's data block)")
        return path

    def image_set(self, split: str) -> ImageReportDataset:
        """The 2D split, its images checked at build (data.verify)."""
        dataset = ImageReportDataset(self._file(self.config.data.xray_manifest), split=split, per_caption=False)
        self.verify_data(image_report_checks(dataset))
        return dataset

    def volume_set(self, split: str) -> VolumeReportDataset:
        """The 3D split, every NIfTI header and voxel-data size checked at build (data.verify)."""
        d = self.config.data
        dataset = VolumeReportDataset(self._file(d.ct_manifest), split=split, volume_shape=self.volume_shape,
                                      spacing=tuple(d.spacing), hu_range=tuple(d.hu_range), check_headers=False)
        self.verify_data(volume_report_checks(dataset))
        return dataset

    def train_data(self):
        return self.mixed_batches(jax.process_index(), jax.process_count())

    def mixed_batches(self, process_index: int, process_count: int):
        """This process's share of every global batch: `batch_2d / process_count` image-report and
        `batch_3d / process_count` volume-report samples (the 2D:3D ratio is data.fraction_2d), each kind its own
        seeded `global_batch_dataset` stream (so the processes' shares, in process order, are the global
        batch), zipped into one checkpointable iterator whose state is the two streams' positions."""
        d = self.config.data
        common = dict(seed=int(self.config.seed), process_index=process_index, process_count=process_count,
                      prefetch_threads=int(d.prefetch_threads), on_bad_example=self.on_bad_example)
        parts = []
        for size in (self.batch_2d, self.batch_3d):
            if size:
                process_batch_size(size, process_count)
        if self.batch_2d:
            parts.append(global_batch_dataset(self.image_set(d.split), global_batch=self.batch_2d,
                                              transform=ImageExample(self.tokenizer, self.config.model.image_size,
                                                                     d.max_length), **common))
        if self.batch_3d:
            parts.append(global_batch_dataset(self.volume_set(d.split), global_batch=self.batch_3d,
                                              transform=VolumeExample(self.tokenizer, d.max_length), **common))
        return _zip_batches(*parts)

    # ---- evaluation ---------------------------------------------------------------------------------
    def _embed_fns(self, params):
        student = jax.device_put(nn.unbox(params["student"]))
        model = self.model

        @jax.jit
        def images_fn(p, images):
            cls = model.apply({"params": p}, images, method=unimedi_lib.UniMedI.encode_images)[:, 0]
            return cls, model.apply({"params": p}, cls, method=unimedi_lib.UniMedI.image_embedding)

        @jax.jit
        def volumes_fn(p, volumes):
            slabs, _ = unimedi_lib.select_volume_slices(model, p, volumes, self.k)
            cls = model.apply({"params": p}, volumes, slabs, method=unimedi_lib.UniMedI.encode_volumes)[:, 0]
            return cls, model.apply({"params": p}, cls, method=unimedi_lib.UniMedI.image_embedding)

        @jax.jit
        def text_fn(p, ids, mask):
            return model.apply({"params": p}, ids, mask, method=unimedi_lib.UniMedI.text_embedding)

        return student, images_fn, volumes_fn, text_fn

    def _encode(self, dataset, transform, key: str, fn, student, text_fn):
        size = int(self.run.eval_batch_size)
        feats, embeds, texts = [], [], []
        for start in range(0, len(dataset), size):
            items = [transform(dataset[i]) for i in range(start, min(start + size, len(dataset)))]
            n = len(items)
            items += [items[-1]] * (size - n)
            batch = {k: np.stack([it[k] for it in items]) for k in items[0]}
            cls, emb = fn(student, jnp.asarray(batch[key]))
            prefix = "image" if key == "images" else "volume"
            txt = text_fn(student, jnp.asarray(batch[f"{prefix}_input_ids"]), jnp.asarray(batch[f"{prefix}_attention_mask"]))
            feats.append(np.asarray(cls)[:n]), embeds.append(np.asarray(emb)[:n]), texts.append(np.asarray(txt)[:n])
        return np.concatenate(feats), np.concatenate(embeds), np.concatenate(texts)

    def _zero_shot(self, embeds: np.ndarray, labels: np.ndarray, names, student, text_fn) -> float:
        """Macro AUC of prompt scores: sim(image, "There is a NAME.") - sim(image, "No NAME.")."""
        prompts = [p for name in names for p in (f"There is a {name}.", f"No {name}.")]
        tokens = [tokenize(self.tokenizer, p, int(self.config.data.max_length)) for p in prompts]
        ids = jnp.asarray(np.stack([t["input_ids"] for t in tokens]))
        mask = jnp.asarray(np.stack([t["attention_mask"] for t in tokens]))
        text = np.asarray(l2_normalize(text_fn(student, ids, mask)))
        sims = np.asarray(l2_normalize(jnp.asarray(embeds))) @ text.T
        return _macro_auc_or_nan(labels, sims[:, 0::2] - sims[:, 1::2])

    def _linear_probe(self, train_x, train_y, test_x, test_y, fraction: float) -> dict[str, float]:
        """One logistic-regression probe per label on frozen [CLS] features, trained on `fraction` of the train
        split (seeded): macro AUC and mean accuracy on the test split."""
        from medjax.metrics.linear_probe import fit_linear_probe

        rng = np.random.default_rng(int(self.config.eval.label_seed))
        keep = np.sort(rng.permutation(len(train_x))[:max(2, int(math.ceil(fraction * len(train_x))))])
        scores, correct = [], []
        for c in range(train_y.shape[1]):
            y = train_y[keep, c].astype(np.int64)
            if len(np.unique(y)) < 2:  # a label absent from the subset: constant score
                scores.append(np.full(len(test_x), float(y[0]))), correct.append(test_y[:, c] == y[0])
                continue
            probe = fit_linear_probe(train_x[keep], y, num_classes=2)
            prob = probe.predict_proba(test_x)[:, 1]
            scores.append(prob), correct.append((prob > 0.5) == (test_y[:, c] > 0.5))
        return {"auc": _macro_auc_or_nan(test_y, np.stack(scores, 1)), "accuracy": float(np.mean(np.stack(correct)))}

    def evaluate(self, params) -> dict[str, float]:
        """Image<->report retrieval R@K, zero-shot AUC by prompts and linear-probe AUC / accuracy at each
        `eval.label_fractions` on the eval split, for 2D and 3D (UniMedI Sec. 4 protocols, on our splits)."""
        params = params.get("params", params) if isinstance(params, dict) else params
        student, images_fn, volumes_fn, text_fn = self._embed_fns(params)
        d, e = self.config.data, self.config.eval
        results = {}
        kinds = [("2d", self.image_set, ImageExample(self.tokenizer, self.config.model.image_size, d.max_length),
                  "images", images_fn, self.config.eval.xray_labels),
                 ("3d", self.volume_set, VolumeExample(self.tokenizer, d.max_length), "volumes", volumes_fn,
                  self.config.eval.ct_labels)]
        for name, make, transform, key, fn, label_names in kinds:
            if name == "2d" and not d.xray_manifest or name == "3d" and not d.ct_manifest:
                continue
            test = make(d.eval_split)
            feats, embeds, texts = self._encode(test, transform, key, fn, student, text_fn)
            recall = report_retrieval_recall(embeds, texts, _reports(test, name), ks=(1, 5))
            results.update({f"{name}_{k}": v for k, v in recall.items()})
            labels = _labels(test, name)
            if labels is None:
                continue
            if label_names:
                results[f"{name}_zero_shot_auc"] = self._zero_shot(embeds, labels, list(label_names), student, text_fn)
            train = make(d.split)
            train_labels = _labels(train, name)
            train_feats, _, _ = self._encode(train, transform, key, fn, student, text_fn)
            for fraction in e.label_fractions:
                probe = self._linear_probe(train_feats, train_labels, feats, labels, float(fraction))
                results.update({f"{name}_probe{fraction * 100:g}_{k}": v for k, v in probe.items()})
        return results

    def results_table(self, exp: str, columns) -> str:
        """The paper's layout (`medjax.tasks.unimedi_tables`): linear classification at each label fraction,
        zero-shot AUC, retrieval R@K; one row per evaluated checkpoint."""
        return unimedi_tables.results_table(exp, columns, self.config.eval.label_fractions)


def _labels(dataset, kind: str) -> np.ndarray | None:
    if kind == "3d":
        return np.asarray(dataset.labels, np.float32) if dataset.labels else None
    rows = [dataset.row(i) for i in range(dataset.num_images)]
    if not all("labels" in r for r in rows):
        return None
    return np.asarray([r["labels"] for r in rows], np.float32)


def _macro_auc_or_nan(labels: np.ndarray, scores: np.ndarray) -> float:
    """Macro AUC over the labels that have both classes in the eval split; NaN when none has (a tiny split)."""
    if not any(0 < labels[:, c].sum() < len(labels) for c in range(labels.shape[1])):
        return float("nan")
    return macro_auc(labels, scores)


def _reports(dataset, kind: str) -> list[str]:
    """The (whole) report text of every eval sample, in order."""
    if kind == "3d":
        return [pick_sentence(c, None) for c in dataset.captions]
    return [pick_sentence(dataset.captions[i][0], None) for i in range(dataset.num_images)]


def _take(tokens: jax.Array, index: jax.Array) -> jax.Array:
    """tokens (B, N, D) at positions index (B, m) -> (B, m, D)."""
    return jnp.take_along_axis(tokens, index[..., None], axis=1)


def _encode_images_vision(vision: unimedi_lib.UniMedIVision, images):
    return vision.encode(vision.image_tokens(images))


def _encode_volumes_vision(vision: unimedi_lib.UniMedIVision, volumes, slabs):
    return vision.encode(vision.pseudo_pair_tokens(volumes, slabs))
