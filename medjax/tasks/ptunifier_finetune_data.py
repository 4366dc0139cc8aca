"""PTUnifier fine-tuning sets (Chen et al., ICCV 2023, Sec. 4; the original's VQA / MLC / NLI / IRTR
datasets), from JSONL manifests or the original's Arrow files.

* VQA (VQA-RAD, SLAKE, MedVQA-2019): JSONL, one question per line
      {"image": path, "question": str, "answer": str, "answer_type": "closed"|"open", "split": ...}
  answers are normalised as the original's `normalize_word` (medjax/data/vqa_answers.py: punctuation,
  number words to digits, articles, contractions) and numbered in order of first appearance over ALL splits (the original's `make_arrow_vqa` vocabulary); or the original's Arrow
  (one row per image: questions, answer_labels, answer_scores, answer_type (0 closed, 1 open) lists).
* multi-label classification (CheXpert, RSNA pneumonia): JSONL {"image", "labels": [0/1, ...]} or Arrow
  with the label list in `label_column` (the original's `chexpert` / `pnsa_pneumonia`).
* NLI (RadNLI + MedNLI): JSONL {"text_a", "text_b", "label": name or index} or Arrow (text_a / text_b
  one-string lists, integer `label`); classes in the original's order (its Arrow files and `cls_head`):
  contradiction 0, entailment 1, neutral 2, whether given by name or by index, in either format.
* retrieval (ROCO): the image-report data itself (`medjax.data.readers.image_report`).
* report generation / summarisation (MIMIC-CXR): JSONL {"image", "findings", "impression", "split"} or the
  original's Arrow `clm_mimic_cxr_{split}.arrow` (image, caption, findings / impression lists, split).
* image + text single-label classification (MELINDA): JSONL {"image", "caption", <label_column>: name or
  index, "split"} or the original's Arrow (image, caption list, one label per caption in <label_column>:
  `i_meth`, `p_meth`, `i_meth_label`, `p_meth_label`); class names are numbered in sorted order over ALL
  rows of the file, as the original's `make_arrow_melinda` does over its three splits.

A file name may hold `{split}` (the originals keep one Arrow file per split).
"""
from __future__ import annotations

import os

import numpy as np

from medjax.data.readers.fundus_genome import DataError
from medjax.data.readers.image_report import SPLITS, ImageReportDataset, read_jsonl
from medjax.data.vqa_answers import normalize_answer
from medjax.errors import MedjaxInputError

NLI_LABELS = ("contradiction", "entailment", "neutral")  # the original's label ids (make_arrow_nli)
CLOSED, OPEN = 0, 1


def resolve(root: str, name: str, split: str) -> str:
    """`root/name` with `{split}` filled in; a split other than train/val/test that names a file in `root`
    (`mlc_chexpert_train_01` -> root/mlc_chexpert_train_01.arrow, the original's fixed label-fraction
    subsets) is that file."""
    if split not in SPLITS:
        for candidate in (split, split + ".arrow", split + ".jsonl"):
            if os.path.isfile(os.path.join(root, candidate)):
                return os.path.join(root, candidate)
    return os.path.join(root, name.format(split=split))


def row_split(split: str) -> str | None:
    """The rows of `split` to keep in its file: train/val/test filter by the file's `split` field; any other
    split name is a file of its own (a fixed subset) and keeps every row (None)."""
    return split if split in SPLITS else None


def answer_vocabulary(path: str) -> list[str]:
    """Normalised answers of a JSONL VQA manifest over all its rows, in order of first appearance."""
    vocab = {}
    for line, row in read_jsonl(path, ("answer",)):
        vocab.setdefault(normalize_answer(row["answer"]), len(vocab))
    return list(vocab)


def _answer_type(value, where: str) -> int:
    if isinstance(value, str) and value.strip().lower() in ("closed", "open"):
        return CLOSED if value.strip().lower() == "closed" else OPEN
    if value in (CLOSED, OPEN):
        return int(value)
    raise DataError(f"{where}: field 'answer_type' = {value!r}, expected 'closed' or 'open' (or 0 / 1)")


class VQADataset:
    """Questions with their image, soft answer target over the vocabulary, and answer type.

    Items: {"image": PIL, "question": str, "target": float32 (num_answers,), "answer_type": int}.
    JSONL: `answers` = answer_vocabulary(manifest) unless given; Arrow: `num_answers` must be given
    (the Arrow labels index the original's vocabulary)."""

    def __init__(self, path: str, split: str, *, answers: list[str] | None = None, num_answers: int | None = None):
        self.images = ImageReportDataset(path, split=split, caption_field=None, per_caption=False)
        self.questions: list[tuple[int, str, np.ndarray, int]] = []
        if path.endswith(".arrow"):
            if not num_answers:
                raise MedjaxInputError(f"{path}: Arrow VQA sets need num_answers (the original vocabulary size, e.g. 498)")
            self.num_answers = int(num_answers)
            for i in range(self.images.num_images):
                row, where = self.images.row(i), self.images.where(i)
                for key in ("questions", "answer_labels", "answer_scores", "answer_type"):
                    if key not in row:
                        raise DataError(f"{where}: missing column {key!r}")
                for q, labels, scores, t in zip(row["questions"], row["answer_labels"], row["answer_scores"],
                                                row["answer_type"]):
                    target = np.zeros(self.num_answers, np.float32)
                    for label, score in zip(labels, scores):
                        if not 0 <= label < self.num_answers:
                            raise DataError(f"{where}: answer label {label} outside [0, {self.num_answers})")
                        target[label] = score
                    self.questions.append((i, q, target, _answer_type(t, where)))
        else:
            self.answers = answers if answers is not None else answer_vocabulary(path)
            self.num_answers = len(self.answers)
            index = {a: k for k, a in enumerate(self.answers)}
            for i in range(self.images.num_images):
                row, where = self.images.row(i), self.images.where(i)
                for key in ("question", "answer", "answer_type"):
                    if key not in row:
                        raise DataError(f"{where}: missing field {key!r}")
                answer = normalize_answer(row["answer"])
                if answer not in index:
                    raise DataError(f"{where}: answer {row['answer']!r} is not in the answer vocabulary")
                target = np.zeros(self.num_answers, np.float32)
                target[index[answer]] = 1.0
                self.questions.append((i, str(row["question"]), target, _answer_type(row["answer_type"], where)))

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, k: int) -> dict:
        i, question, target, answer_type = self.questions[k]
        return {"image": self.images.load_image(i), "question": question, "target": target,
                "answer_type": np.int32(answer_type)}

    def describe(self, k: int) -> str:
        """Question `k`'s manifest line and image (medjax.data.pipelines.bad_examples)."""
        return self.images.describe(self.questions[k][0])


class MultiLabelDataset:
    """Images with multi-hot labels. Items: {"image": PIL, "labels": float32 (num_labels,)}."""

    def __init__(self, path: str, split: str, *, label_column: str = "labels"):
        column = "labels" if not path.endswith(".arrow") else label_column
        self.images = ImageReportDataset(path, split=split, caption_field=None, per_caption=False)
        labels = []
        for i in range(self.images.num_images):
            row, where = self.images.row(i), self.images.where(i)
            value = row.get(column)
            if not isinstance(value, list) or not value or not all(v in (0, 1) for v in value):
                raise DataError(f"{where}: field {column!r} must be a non-empty list of 0/1, got {value!r:.80}")
            labels.append(value)
        if len({len(v) for v in labels}) != 1:
            raise DataError(f"{path}: rows have label lists of different lengths {sorted({len(v) for v in labels})}")
        self.labels = np.asarray(labels, np.float32)
        self.num_labels = self.labels.shape[1]

    def __len__(self) -> int:
        return self.images.num_images

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images.load_image(i), "labels": self.labels[i]}

    def describe(self, i: int) -> str:
        """Row `i`'s manifest line and image (medjax.data.pipelines.bad_examples)."""
        return self.images.describe(i)


class NLIDataset:
    """Premise/hypothesis pairs with a 3-way label. Items: {"text_a", "text_b", "label": int32}."""

    def __init__(self, path: str, split: str):
        self.pairs: list[tuple[str, str, int]] = []
        if path.endswith(".arrow"):
            from medjax.data.readers.arrow_ipc import read_arrow
            table = read_arrow(path)
            for need in ("text_a", "text_b", "label"):
                if need not in table.column_names:
                    raise DataError(f"{path}: no column {need!r} (columns: {table.column_names})")
            splits = table["split"] if "split" in table.column_names else None
            for i in range(table.num_rows):
                if splits is not None and splits[i] != split:
                    continue
                a, b = table["text_a"][i], table["text_b"][i]
                a, b = (a[0] if isinstance(a, list) else a), (b[0] if isinstance(b, list) else b)
                self.pairs.append((a, b, self._label(table["label"][i], f"{path}: row {i}")))
        else:
            for line, row in read_jsonl(path, ("text_a", "text_b", "label")):
                if row.get("split", split) != split:
                    continue
                self.pairs.append((str(row["text_a"]), str(row["text_b"]), self._label(row["label"], f"{path}: line {line}")))
        if not self.pairs:
            raise DataError(f"{path}: no NLI pairs in split {split!r}")

    @staticmethod
    def _label(value, where: str) -> int:
        if isinstance(value, str) and value.strip().lower() in NLI_LABELS:
            return NLI_LABELS.index(value.strip().lower())
        if isinstance(value, int) and 0 <= value < len(NLI_LABELS):
            return value
        raise DataError(f"{where}: field 'label' = {value!r}, expected one of {NLI_LABELS} or 0..2")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        a, b, label = self.pairs[i]
        return {"text_a": a, "text_b": b, "label": np.int32(label)}


class ImageTextLabelDataset:
    """(image, caption, class) samples, one per caption (the original's `CLSMELINDADataset`). Items:
    {"image": PIL, "caption": str, "label": int32}. `classes`: the sorted class names when the file names
    them (JSONL), else None (the labels are already class indices, as in the original's Arrow files)."""

    def __init__(self, path: str, split: str | None, *, label_column: str):
        self.images = ImageReportDataset(path, split=split, caption_field="caption", per_caption=True)
        self.classes = _class_names(path, label_column) if not path.endswith(".arrow") else None
        index = {name: k for k, name in enumerate(self.classes or ())}
        self.labels = []
        for i, caps in enumerate(self.images.captions):
            row, where = self.images.row(i), self.images.where(i)
            if label_column not in row:
                raise DataError(f"{where}: missing field {label_column!r} (the class label)")
            value = row[label_column]
            values = value if isinstance(value, list) else [value] * len(caps)
            if len(values) != len(caps):
                raise DataError(f"{where}: field {label_column!r} holds {len(values)} labels for {len(caps)} captions")
            self.labels.append([_class_index(v, index, where, label_column) for v in values])

    @property
    def num_classes(self) -> int:
        """The named classes, else the largest index + 1."""
        return len(self.classes) if self.classes is not None else 1 + max(max(v) for v in self.labels)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        ex = self.images[i]
        return {"image": ex["image"], "caption": ex["caption"],
                "label": np.int32(self.labels[ex["image_index"]][ex["caption_index"]])}

    def describe(self, i: int) -> str:
        return self.images.describe(i)


def _class_names(path: str, column: str) -> list[str] | None:
    """Sorted distinct string labels of `column` over every row of a JSONL file; None when they are indices."""
    values = set()
    for line, row in read_jsonl(path, (column,)):
        for v in row[column] if isinstance(row[column], list) else [row[column]]:
            values.add(v if isinstance(v, str) else None)
    if None in values and len(values) > 1:
        raise DataError(f"{path}: field {column!r} mixes class names and indices")
    return None if None in values else sorted(values)


def _class_index(value, index: dict, where: str, column: str) -> int:
    if index:
        if value not in index:
            raise DataError(f"{where}: field {column!r} = {value!r} is not a class name")
        return index[value]
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0:
        return int(value)
    raise DataError(f"{where}: field {column!r} = {value!r}, expected a class name or a non-negative index")


class ReportDataset:
    """(image, findings, impression) samples, one per findings text (the original's `CLMMIMICCXRDataset`).
    Items: {"image": PIL, "findings": str, "impression": str}."""

    def __init__(self, path: str, split: str | None):
        self.images = ImageReportDataset(path, split=split, caption_field="findings", per_caption=True)
        self.impressions = []
        for i, findings in enumerate(self.images.captions):
            row, where = self.images.row(i), self.images.where(i)
            if "impression" not in row:
                raise DataError(f"{where}: missing field 'impression'")
            value = row["impression"]
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, list) or len(values) != len(findings) or not all(
                    isinstance(v, str) and v.strip() for v in values):
                raise DataError(f"{where}: field 'impression' must hold one non-empty text per findings text "
                                f"({len(findings)}), got {value!r:.80}")
            self.impressions.append(values)

    def __len__(self) -> int:
        return len(self.images)

    def texts(self, field: str) -> list[str]:
        """Every sample's "findings" or "impression" (no image decoding)."""
        return [self.images.captions[i][j] if field == "findings" else self.impressions[i][j]
                for i, j in self.images.index]

    def __getitem__(self, i: int) -> dict:
        ex = self.images[i]
        return {"image": ex["image"], "findings": ex["caption"],
                "impression": self.impressions[ex["image_index"]][ex["caption_index"]]}

    def describe(self, i: int) -> str:
        return self.images.describe(i)
