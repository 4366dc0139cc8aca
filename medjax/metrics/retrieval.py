"""Image<->text retrieval recall@K (PTUnifier, Chen et al., ICCV 2023, ROCO retrieval table; the
original's `compute_irtr_recall`, ViLT/METER lineage).

scores[i, t] is the similarity of image i and text t; `text_image[t]` is the image that text t
describes (several texts may describe one image; by default text t describes image t).
- text retrieval (image -> text), TR@K: the fraction of images with at least one of their own
  texts among their K highest-scoring texts;
- image retrieval (text -> image), IR@K: the fraction of texts whose image is among the K
  highest-scoring images.
Ties are broken towards the lower index (a stable sort), as `torch.topk` on CPU does.
"""
from __future__ import annotations

import numpy as np


def _top_k(scores: np.ndarray, k: int, axis: int) -> np.ndarray:
    order = np.argsort(-scores, axis=axis, kind="stable")
    return np.take(order, np.arange(min(k, scores.shape[axis])), axis=axis)


def retrieval_recall(scores: np.ndarray, text_image: np.ndarray | None = None,
                     ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """{"ir_r1", "ir_r5", "ir_r10", "tr_r1", ..., "ir_mean", "tr_mean", "rsum"} from (images, texts) scores.

    ir = text->image, tr = image->text; `rsum` adds all six recalls (in %, as papers report them:
    every value here is a percentage)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or 0 in scores.shape:
        raise ValueError(f"scores must be a non-empty (images, texts) matrix, got shape {scores.shape}")
    num_images, num_texts = scores.shape
    if text_image is None:
        if num_images != num_texts:
            raise ValueError(f"scores is {scores.shape}: give text_image (the image of each text) when not square")
        text_image = np.arange(num_texts)
    text_image = np.asarray(text_image)
    if text_image.shape != (num_texts,) or text_image.min() < 0 or text_image.max() >= num_images:
        raise ValueError(f"text_image must hold {num_texts} image indices in [0, {num_images}), got {text_image}")
    out = {}
    for k in ks:
        top_texts = _top_k(scores, k, axis=1)  # (images, k)
        out[f"tr_r{k}"] = 100.0 * float(np.mean((text_image[top_texts] == np.arange(num_images)[:, None]).any(1)))
        top_images = _top_k(scores, k, axis=0)  # (k, texts)
        out[f"ir_r{k}"] = 100.0 * float(np.mean((top_images == text_image[None, :]).any(0)))
    out["ir_mean"] = float(np.mean([out[f"ir_r{k}"] for k in ks]))
    out["tr_mean"] = float(np.mean([out[f"tr_r{k}"] for k in ks]))
    out["rsum"] = float(sum(out[f"ir_r{k}"] + out[f"tr_r{k}"] for k in ks))
    return out


def report_retrieval_recall(image_embeds: np.ndarray, text_embeds: np.ndarray, reports: list[str],
                            ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Image<->report recall@K when several images share one report text (templated or normal studies):
    the candidates are the distinct reports (the first embedding of each), an image's hit is its own report
    text in its top K, a report's hit is any of its images in its top K (cosine similarity, in %)."""
    unique, first, image_report = np.unique(np.asarray(reports, dtype=object).astype(str), return_index=True,
                                            return_inverse=True)
    del unique
    image = np.asarray(image_embeds, np.float64)
    text = np.asarray(text_embeds, np.float64)[first]
    image = image / np.maximum(np.linalg.norm(image, axis=1, keepdims=True), 1e-12)
    text = text / np.maximum(np.linalg.norm(text, axis=1, keepdims=True), 1e-12)
    scores = image @ text.T  # (images, distinct reports)
    out = {}
    for k in ks:
        top_reports = _top_k(scores, k, axis=1)
        out[f"tr_r{k}"] = 100.0 * float(np.mean((top_reports == image_report[:, None]).any(1)))
        top_images = _top_k(scores, k, axis=0)  # (k, reports)
        out[f"ir_r{k}"] = 100.0 * float(np.mean((image_report[top_images] == np.arange(len(first))[None, :]).any(0)))
    return out
