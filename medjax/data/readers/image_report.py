"""Image-report pairs for PTUnifier (Chen et al., ICCV 2023; the original's `BaseDataset`).

Two on-disk forms, both read into one random-access dataset of (image, caption) samples - one sample
per caption of each image, as the original's `index_mapper`:

* a JSONL manifest, one object per line:
      {"image": "images/0001.png", "captions": ["Report text. More text."], "image_id": "0001", "split": "train"}
  `image` is relative to the manifest's folder; `image_id` (default: the image path) and `split` are
  optional; other keys are kept (`dataset.row(i)`) for fine-tuning sets. Captions must be non-empty
  strings with some non-space text (an empty caption is a DataError naming file, line and field).
* the original's Arrow files (`prepro/make_arrow.py`): columns `image` (encoded bytes), `caption`
  (list of strings), `image_id`, `split`; read without pyarrow by `medjax.data.readers.arrow_ipc`.

Training text is one random sentence of the caption (the original's `sent_level=True`, with its
`split_into_sents`), chosen from the per-element generator of `medjax.data.pipelines.global_batches`, so a resumed run
draws the same sentence. Images: PIL decode -> RGB -> CLIP transform (bicubic resize of the shorter
side + centre crop, or RandomResizedCrop(scale 0.9-1) for pretraining) -> CLIP mean/std. Text: a
Hugging Face tokenizer from a local directory, padded/truncated to `max_length`.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Sequence

import numpy as np
from PIL import Image

from medjax.data.readers.arrow_ipc import ArrowFormatError, read_arrow
from medjax.data.errors import DataError, DataFileNotFoundError
from medjax.data.readers.image_io import decode
from medjax.data.readers.text_io import open_text, read_json

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), dtype=np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), dtype=np.float32)
SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------- text
def split_into_sents(text: str) -> list[str]:
    """The original's sentence splitter (ptunifier/datasets/utils/utils.py), rule for rule: figure
    references removed, abbreviations/acronyms/decimals protected, split after . ? !"""
    alphabets = "([A-Za-z])"
    prefixes = r"(Mr|St|Mrs|Ms|Dr|Fig|FIG|fig|Figs|figs|Figure|FIGURE|figure|figures|Figures|al|No|\d)[.]"
    suffixes = "(Inc|Ltd|Jr|Sr|Co)"
    starters = r"(Mr|Mrs|Ms|Dr|He\s|She\s|It\s|They\s|Their\s|Our\s|We\s|But\s|However\s|That\s|This\s|Wherever)"
    acronyms = "([A-Z][.][A-Z][.](?:[A-Z][.])?)"
    websites = r"[.](com|net|org|io|gov|\d)"
    t = re.sub(r"[Ff][Ii][Gg][Uu]*[Rr]*[Ee]*[\s]*[.]*[\s]*[\d]+[\s]*[.]*[\s]*[:]*[-]*[\s]*", "", text)
    t = " " + t.replace(".)", ")") + "  "
    t = t.replace("\n", " ")
    t = re.sub(prefixes, "\\1<prd>", t)
    t = re.sub(websites, "<prd>\\1", t)
    t = t.replace("Ph.D.", "Ph<prd>D<prd>")
    t = re.sub(r"\s" + alphabets + "[.] ", " \\1<prd> ", t)
    t = re.sub(acronyms + " " + starters, "\\1<stop> \\2", t)
    t = re.sub(alphabets + "[.]" + alphabets + "[.]" + alphabets + "[.]", "\\1<prd>\\2<prd>\\3<prd>", t)
    t = re.sub(alphabets + "[.]" + alphabets + "[.]", "\\1<prd>\\2<prd>", t)
    t = re.sub(" " + suffixes + "[.] " + starters, " \\1<stop> \\2", t)
    t = re.sub(" " + suffixes + "[.]", " \\1<prd>", t)
    t = re.sub(" " + alphabets + "[.]", " \\1<prd>", t)
    t = t.replace(".\u201d", "\u201d.").replace(".\"", "\".").replace("!\"", "\"!").replace("?\"", "\"?")
    t = t.replace(".", ".<stop>").replace("?", "?<stop>").replace("!", "!<stop>").replace("<prd>", ".")
    return [s.strip() for s in t.split("<stop>") if s.strip()]


def pick_sentence(caption: str, rng: np.random.Generator | None) -> str:
    """One uniformly random sentence (rng given: training), else all sentences joined by spaces."""
    sents = split_into_sents(caption)
    if not sents:
        return caption
    return sents[int(rng.integers(len(sents)))] if rng is not None else " ".join(sents)


TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json")


def load_tokenizer(path: str):
    """A Hugging Face tokenizer from a local directory (never downloads). Its JSON files are read first, so
    a corrupt or non-UTF-8 `tokenizer.json` is a DataError naming the file, line and column; a directory
    transformers cannot load is a DataError naming it and what was expected."""
    if not path or not os.path.isdir(path):
        raise DataFileNotFoundError(
            f"tokenizer directory {path!r} not found (model.tokenizer / data.tokenizer must be a local Hugging "
            "Face tokenizer directory, e.g. one saved by save_pretrained)")
    for name in TOKENIZER_JSON_FILES:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            content = read_json(file, f"Hugging Face {name}")
            if not isinstance(content, dict):
                raise DataError(f"{file}: line 1: expected a JSON object (a Hugging Face {name}), got "
                                f"{type(content).__name__}")
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers / tokenizers raise many types for unusable files
        raise DataError(f"{path}: not a loadable Hugging Face tokenizer directory ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); expected tokenizer.json or "
                        "the vocabulary files save_pretrained writes") from e


def tokenize(tokenizer, text: str | tuple[str, str], max_length: int, *, word_ids: bool = False) -> dict[str, np.ndarray]:
    """input_ids / attention_mask / special_tokens_mask, int32 (max_length,), padded and truncated
    like the original (`padding="max_length", truncation=True`); a pair (a, b) is encoded as a pair.
    `word_ids`: also "word_ids", the fast tokenizer's word index of each token (-1 for none), for
    whole-word masking."""
    args = text if isinstance(text, tuple) else (text,)
    enc = tokenizer(*args, padding="max_length", truncation=True, max_length=max_length,
                    return_special_tokens_mask=True)
    return {"input_ids": np.asarray(enc["input_ids"], np.int32),
            "attention_mask": np.asarray(enc["attention_mask"], np.int32),
            "special_tokens_mask": np.asarray(enc["special_tokens_mask"], np.int32),
            **({"word_ids": np.asarray([-1 if w is None else w for w in enc.word_ids()], np.int32)} if word_ids else {})}


# ----------------------------------------------------------------------------- images
def decode_image(data: bytes | str, where: str) -> Image.Image:
    """Encoded bytes or a file path -> RGB PIL image via `medjax.data.read_image` (EXIF orientation,
    16-bit images scaled to 8 bits, alpha dropped); DataError naming `where` when unreadable."""
    return Image.fromarray(decode(data, f"{where}: field 'image'"))


def _random_resized_crop_box(width: int, height: int, rng: np.random.Generator, scale=(0.9, 1.0),
                             ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params: (top, left, h, w)."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def clip_transform(image: Image.Image, size: int, rng: np.random.Generator | None = None,
                   resized_crop: bool = False) -> np.ndarray:
    """The original's `clip` transform (Resize(size, bicubic) on the shorter side, CenterCrop(size),
    CLIP normalisation) or, with `resized_crop` and an rng, `clip_resizedcrop` (RandomResizedCrop
    (size, scale=(0.9, 1.0)), bicubic). Returns float32 (size, size, 3)."""
    if resized_crop and rng is not None:
        top, left, h, w = _random_resized_crop_box(image.width, image.height, rng)
        image = image.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)
    else:
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        if short != size:
            new_long = int(size * long / short)
            image = image.resize((size, new_long) if w <= h else (new_long, size), Image.Resampling.BICUBIC)
        w, h = image.size
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
    pixels = np.asarray(image, np.float32) / 255.0
    return ((pixels - CLIP_MEAN) / CLIP_STD).astype(np.float32)


# ----------------------------------------------------------------------------- sources
def read_jsonl(path: str, required: Sequence[str] = ()) -> list[tuple[int, dict]]:
    """(line number, object) per non-empty line; DataError naming file, line and field."""
    if not os.path.isfile(path):
        raise DataError(f"manifest {path} not found")
    rows = []
    with open_text(path, "JSONL manifest (one JSON object per line)") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {line_no}: not a JSON object ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {line_no}: expected a JSON object, got {type(row).__name__}")
            for key in required:
                if key not in row:
                    raise DataError(f"{path}: line {line_no}: missing field {key!r} (fields: {sorted(row)})")
            rows.append((line_no, row))
    return rows


def _check_captions(value: Any, where: str, field: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
        raise DataError(f"{where}: field {field!r} must be a non-empty list of strings, got {value!r:.80}")
    empty = [i for i, c in enumerate(value) if not c.strip()]
    if empty:
        raise DataError(f"{where}: field {field!r}: caption {empty[0]} of {len(value)} is empty"
                        + (f" ({len(empty)} empty)" if len(empty) > 1 else "") + "; every caption needs text")
    return value


class _Rows:
    """Rows of one file: image source, captions, image id, split, the raw row, and where it came from."""

    def __init__(self, path: str, *, caption_field: str | None, split: str | None, verify_images: bool):
        self.path = path
        if path.endswith(".arrow"):
            self._init_arrow(caption_field, split)
        else:
            self._init_jsonl(caption_field, split, verify_images)

    def _init_jsonl(self, caption_field, split, verify_images):
        root = os.path.dirname(os.path.abspath(self.path))
        self.arrow = None
        self.lines, self.rows, self.images, self.captions = [], [], [], []
        for line, row in read_jsonl(self.path, ("image",)):
            where = f"{self.path}: line {line}"
            if "split" in row and row["split"] not in SPLITS:
                raise DataError(f"{where}: field 'split' = {row['split']!r}, expected one of {SPLITS}")
            if split is not None and row.get("split") != split:
                continue
            if not isinstance(row["image"], str) or not row["image"]:
                raise DataError(f"{where}: field 'image' must be a relative file path, got {row['image']!r}")
            image = os.path.join(root, row["image"])
            if not os.path.isfile(image):
                raise DataError(f"{where}: field 'image': file {image} not found")
            if verify_images:
                decode_image(image, f"{where} ({image})")
            caps = _check_captions(row.get(caption_field), where, caption_field) if caption_field else []
            self.lines.append(line)
            self.rows.append(row)
            self.images.append(image)
            self.captions.append(caps)
        self.image_ids = [str(r.get("image_id", r["image"])) for r in self.rows]

    def _init_arrow(self, caption_field, split):
        try:
            self.arrow = read_arrow(self.path)
        except ArrowFormatError as e:
            raise DataError(str(e)) from e
        columns = self.arrow.column_names
        for need in ("image",) + ((caption_field,) if caption_field else ()):
            if need not in columns:
                raise DataError(f"{self.path}: no column {need!r} (columns: {columns})")
        splits = list(self.arrow["split"]) if "split" in columns else [None] * self.arrow.num_rows
        keep = [i for i, s in enumerate(splits) if split is None or s == split]
        self.lines = keep  # Arrow rows are reported by row index
        self.captions = [_check_captions(self.arrow[caption_field][i], f"{self.path}: row {i}", caption_field)
                         for i in keep] if caption_field else [[] for _ in keep]
        ids = self.arrow["image_id"] if "image_id" in columns else None
        self.image_ids = [str(ids[i]) if ids is not None else str(i) for i in keep]
        self.rows = None

    def where(self, k: int) -> str:
        return f"{self.path}: row {self.lines[k]}" if self.arrow is not None else f"{self.path}: line {self.lines[k]}"

    def row(self, k: int) -> dict:
        if self.arrow is not None:
            return {n: self.arrow[n][self.lines[k]] for n in self.arrow.column_names if n != "image"}
        return self.rows[k]

    def load_image(self, k: int) -> Image.Image:
        if self.arrow is not None:
            return decode_image(self.arrow["image"][self.lines[k]], self.where(k))
        return decode_image(self.images[k], f"{self.where(k)} ({self.images[k]})")

    def __len__(self) -> int:
        return len(self.lines)


class ImageReportDataset:
    """(image, caption) samples from JSONL manifests and/or Arrow files, concatenated in order.

    Items: {"image": PIL RGB image, "caption": str, "image_index": int (row over all files),
    "caption_index": int}. With `per_caption=False` there is one sample per image (its first caption;
    image-only sets: `caption_field=None`). `verify_images` decodes every JSONL image up front.
    """

    def __init__(self, paths: str | Sequence[str], *, split: str | None = None, caption_field: str | None = "captions",
                 per_caption: bool = True, verify_images: bool = False):
        paths = [paths] if isinstance(paths, str) else list(paths)
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be None or one of {SPLITS}, got {split!r}")
        self.files = []
        for p in paths:
            field = caption_field
            if p.endswith(".arrow") and caption_field == "captions":
                field = "caption"  # the original's column name
            self.files.append(_Rows(p, caption_field=field, split=split, verify_images=verify_images))
        self._image_ref = [(f, k) for f, rows in enumerate(self.files) for k in range(len(rows))]
        if not self._image_ref:
            raise DataError(f"{', '.join(paths)}: no rows" + (f" in split {split!r}" if split else ""))
        self.captions = [c for rows in self.files for c in rows.captions]
        self.image_ids = [i for rows in self.files for i in rows.image_ids]
        self.index = [(i, j) for i, caps in enumerate(self.captions)
                      for j in range(len(caps) if per_caption and caption_field else 1)]

    @property
    def num_images(self) -> int:
        return len(self._image_ref)

    def __len__(self) -> int:
        return len(self.index)

    def where(self, image_index: int) -> str:
        f, k = self._image_ref[image_index]
        return self.files[f].where(k)

    def row(self, image_index: int) -> dict:
        f, k = self._image_ref[image_index]
        return self.files[f].row(k)

    def describe(self, i: int) -> str:
        """Sample `i`'s manifest line or Arrow row and image (for errors, `medjax.data.pipelines.bad_examples`)."""
        image_index = self.index[i][0]
        f, k = self._image_ref[image_index]
        rows = self.files[f]
        return rows.where(k) + (f" ({rows.images[k]})" if rows.arrow is None else "")

    def load_image(self, image_index: int) -> Image.Image:
        f, k = self._image_ref[image_index]
        return self.files[f].load_image(k)

    def __getitem__(self, i: int) -> dict:
        image_index, caption_index = self.index[i]
        caps = self.captions[image_index]
        return {"image": self.load_image(image_index), "caption": caps[caption_index] if caps else "",
                "image_index": image_index, "caption_index": caption_index}
