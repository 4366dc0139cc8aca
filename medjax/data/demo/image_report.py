"""Synthetic image-report demo data in the real formats, for PTUnifier (Chen et al., ICCV 2023).

`make_image_report_demo(out_dir)` writes:
- `images/NNNNN.png`: "scans" (a grey body outline on black) holding 1-2 coloured findings, each
  a shape (circle, square, triangle, diamond, cross) of a colour (red, green, blue, yellow), a size
  (small, large: radius 12% / 24% of the image) in a quadrant (upper/lower x left/right);
- `manifest.jsonl`: `{"image", "captions": [report], "image_id", "split"}` (80/10/10 train/val/test);
  the report has one sentence per finding (shape, colour, quadrant; size in half of them) and nothing
  else, so the one random sentence pretraining reads always describes its image (about 25 different
  findings among a batch of 32);
- `arrow/image_report_{train,val,test}.arrow`: the same pairs in the original's Arrow layout
  (columns image bytes, caption, image_id, split);
- `vqa.jsonl`: `{"image", "question", "answer", "answer_type": "closed"|"open", "split"}`: per image two
  yes/no questions (presence, side) and four open ones (a finding's colour, position and shape, the count),
  so the open answers need the image (a question-only guess gets about 30% of them right);
- `classification.jsonl`: `{"image", "labels": five 0/1 (one per shape), "split"}`;
- `melinda.jsonl`: `{"image", "caption": report, "i_meth": the first finding's shape, "p_meth": its
  colour, "split"}` (MELINDA's image + text classification layout);
- `reports.jsonl`: `{"image", "findings": report, "impression": a one-line summary, "split"}` (the
  MIMIC-CXR report generation / summarisation layout);
- `nli.jsonl`: `{"text_a": report without sizes, "text_b": statement, "label", "split"}` with label
  entailment (a true colour/position), contradiction (a wrong one) or neutral (the unreported size);
- `tokenizer/`: a byte-level BPE tokenizer with RoBERTa's special tokens and ids (<s> 0, <pad> 1,
  </s> 2, <unk> 3, <mask> 4) trained on these texts, saved as a Hugging Face tokenizer directory;
- `meta.json` (label names), and `.complete` (written last, holding the arguments).
Everything is deterministic given `seed`.
"""
from __future__ import annotations

import io
import functools
import json
import os

import numpy as np
from PIL import Image, ImageDraw

from medjax.data.demo import build_demo
from medjax.data.readers.arrow_write import write_arrow

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (235, 220, 40)}
VERTICAL, HORIZONTAL = ("upper", "lower"), ("left", "right")
SIZES = ("small", "large")
NLI_LABELS = ("entailment", "neutral", "contradiction")
NUMBERS = ("zero", "one", "two")
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # RoBERTa's ids 0..4
DEMO_FILES = ("manifest.jsonl", "vqa.jsonl", "classification.jsonl", "nli.jsonl", "melinda.jsonl", "reports.jsonl")


def _draw_finding(draw: ImageDraw.ImageDraw, f: dict, size: int) -> None:
    cx = (0.25 if f["horizontal"] == "left" else 0.75) * size + f["jitter"][0] * size
    cy = (0.25 if f["vertical"] == "upper" else 0.75) * size + f["jitter"][1] * size
    r = (0.12 if f["size"] == "small" else 0.24) * size
    colour = COLOURS[f["colour"]]
    if f["shape"] == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif f["shape"] == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif f["shape"] == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif f["shape"] == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    else:  # cross
        w = max(1.0, r / 3)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)


def render_scan(findings: list[dict], size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (size, size, 3): a grey elliptical body on black with the findings drawn in, shaded top to bottom."""
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    grey = int(rng.integers(60, 100))
    draw.ellipse((0.04 * size, 0.02 * size, 0.96 * size, 0.98 * size), fill=(grey, grey, grey))
    for f in findings:
        _draw_finding(draw, f, size)
    shade = 0.85 + 0.3 * np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]  # smooth, compresses well
    return np.clip(np.asarray(canvas, np.float32) * shade, 0, 255).astype(np.uint8)


def _sample_findings(rng: np.random.Generator) -> list[dict]:
    count = 1 + int(rng.random() < 0.5)
    shapes = rng.choice(len(SHAPES), count, replace=False)
    quadrants = rng.choice(4, count, replace=False)
    colours = list(COLOURS)
    return [{"shape": SHAPES[s], "colour": colours[int(rng.integers(len(colours)))],
             "vertical": VERTICAL[q // 2], "horizontal": HORIZONTAL[q % 2],
             "size": SIZES[int(rng.integers(2))], "jitter": rng.uniform(-0.04, 0.04, 2).tolist()}
            for s, q in zip(shapes, quadrants)]


def _where(f: dict) -> str:
    return f"{f['vertical']} {f['horizontal']}"


def _report(findings: list[dict], rng: np.random.Generator, with_size: bool) -> str:
    sentences = []
    for f in findings:
        size = f"{f['size']} " if with_size else ""
        if rng.random() < 0.5:
            sentences.append(f"There is a {size}{f['colour']} {f['shape']} in the {_where(f)}.")
        else:
            sentences.append(f"A {size}{f['colour']} {f['shape']} is seen in the {_where(f)} region.")
    return " ".join(sentences)


def _vqa(findings: list[dict], rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(question, answer, answer type) pairs: 2 closed, then 4 open per image: the colour, position and shape of
    one finding and the count (the drawn open kind first: version 2 asked only that one)."""
    f = findings[int(rng.integers(len(findings)))]
    other = [s for s in SHAPES if s not in {g["shape"] for g in findings}]
    asked = other[int(rng.integers(len(other)))] if rng.random() < 0.5 else f["shape"]
    present = "yes" if asked in {g["shape"] for g in findings} else "no"
    side = HORIZONTAL[int(rng.integers(2))]
    out = [(f"Is there a {asked}?", present, "closed"),
           (f"Is the {f['shape']} on the {side}?", "yes" if f["horizontal"] == side else "no", "closed")]
    open_questions = [(f"What colour is the {f['shape']}?", f["colour"], "open"),
                      (f"Where is the {f['shape']}?", _where(f), "open"),
                      (f"What shape is in the {_where(f)}?", f["shape"], "open"),
                      ("How many findings are there?", NUMBERS[len(findings)], "open")]
    kind = int(rng.integers(4))
    return out + open_questions[kind:] + open_questions[:kind]


def _nli(findings: list[dict], rng: np.random.Generator) -> tuple[str, str]:
    f = findings[int(rng.integers(len(findings)))]
    label = NLI_LABELS[int(rng.integers(3))]
    if label == "neutral":
        return f"The {f['shape']} is {f['size']}.", label
    if rng.random() < 0.5:
        colour = f["colour"] if label == "entailment" else [c for c in COLOURS if c != f["colour"]][int(rng.integers(3))]
        return f"The {f['shape']} is {colour}.", label
    vertical = f["vertical"] if label == "entailment" else VERTICAL[1 - VERTICAL.index(f["vertical"])]
    return f"The {f['shape']} is in the {vertical} half.", label


def _impression(findings: list[dict]) -> str:
    """A one-sentence summary of the findings (colour and shape), the demo's MIMIC-CXR "impression"."""
    names = " and ".join(f"{f['colour']} {f['shape']}" for f in findings)
    return f"{NUMBERS[len(findings)].capitalize()} finding{'s' if len(findings) > 1 else ''}: {names}."


def train_tokenizer(texts: list[str], out_dir: str, vocab_size: int = 400, lowercase: bool = False) -> None:
    """A byte-level BPE tokenizer with RoBERTa's special tokens and template, saved for AutoTokenizer;
    `lowercase`: a lower-casing normalizer (for an uncased tower's demo, e.g. CXR-BERT's do_lower_case)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    fast.save_pretrained(out_dir)


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def make_image_report_demo(out_dir: str, *, num_images: int = 400, image_size: int = 96, seed: int = 0) -> str:
    """Write the demo set at `out_dir` (layout in the module docstring); skip if already complete with
    the same arguments. Returns out_dir."""
    if num_images < 10 or image_size < 16:
        raise ValueError(f"need num_images >= 10 and image_size >= 16, got {num_images}, {image_size}")
    # version: bumped when the content changes (2: findings 1.5x larger and no image-quality sentence, so a
    # sentence always names what its image shows; 3: four open VQA questions per image instead of one; issue
    # #23), so caches are remade
    params = {"num_images": num_images, "image_size": image_size, "seed": seed, "version": 3}
    write = functools.partial(_write_image_report_demo, params=params,
                              num_images=num_images, image_size=image_size, seed=seed)
    return build_demo(out_dir, params, write, required=DEMO_FILES)


def _write_image_report_demo(out_dir: str, *, params: dict, num_images, image_size, seed) -> None:
    """Write the files of `make_image_report_demo` into `out_dir` (a fresh temporary directory)."""
    for sub in ("images", "arrow"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    rng = np.random.default_rng([seed, 0])
    order = rng.permutation(num_images)
    split = np.empty(num_images, dtype=object)
    n_train, n_val = int(0.8 * num_images), int(0.9 * num_images)
    split[order[:n_train]], split[order[n_train:n_val]], split[order[n_val:]] = "train", "val", "test"

    manifest, vqa, cls, nli, melinda, reports, vqa_texts = [], [], [], [], [], [], []
    arrow_rows = {s: [] for s in ("train", "val", "test")}
    for i in range(num_images):
        item_rng = np.random.default_rng([seed, 1, i])
        findings = _sample_findings(item_rng)
        rel = f"images/{i:05d}.png"
        buf = io.BytesIO()
        Image.fromarray(render_scan(findings, image_size, item_rng)).save(buf, format="PNG", compress_level=1)
        with open(os.path.join(out_dir, rel), "wb") as f:
            f.write(buf.getvalue())
        report = _report(findings, item_rng, with_size=item_rng.random() < 0.5)
        s, image_id = str(split[i]), f"{i:05d}"
        manifest.append({"image": rel, "captions": [report], "image_id": image_id, "split": s})
        arrow_rows[s].append((buf.getvalue(), [report], image_id, s))
        questions = _vqa(findings, item_rng)
        vqa_texts += [f"{q} {a}" for q, a, _ in questions[:3]]  # version 2's questions: the same tokenizer
        for q, a, t in questions:
            vqa.append({"image": rel, "question": q, "answer": a, "answer_type": t, "image_id": image_id, "split": s})
        present = {f["shape"] for f in findings}
        cls.append({"image": rel, "labels": [int(name in present) for name in SHAPES], "image_id": image_id, "split": s})
        melinda.append({"image": rel, "caption": report, "i_meth": findings[0]["shape"],
                        "p_meth": findings[0]["colour"], "image_id": image_id, "split": s})
        reports.append({"image": rel, "findings": report, "impression": _impression(findings), "image_id": image_id,
                        "split": s})
        hypothesis, label = _nli(findings, item_rng)
        nli.append({"text_a": _report(findings, item_rng, with_size=False), "text_b": hypothesis, "label": label,
                    "split": s})

    _write_jsonl(os.path.join(out_dir, "manifest.jsonl"), manifest)
    _write_jsonl(os.path.join(out_dir, "vqa.jsonl"), vqa)
    _write_jsonl(os.path.join(out_dir, "classification.jsonl"), cls)
    _write_jsonl(os.path.join(out_dir, "nli.jsonl"), nli)
    _write_jsonl(os.path.join(out_dir, "melinda.jsonl"), melinda)
    _write_jsonl(os.path.join(out_dir, "reports.jsonl"), reports)
    for s, rows in arrow_rows.items():
        write_arrow(os.path.join(out_dir, "arrow", f"image_report_{s}.arrow"),
                    {"image": [r[0] for r in rows], "caption": [r[1] for r in rows],
                     "image_id": [r[2] for r in rows], "split": [r[3] for r in rows]})
    texts = ([m["captions"][0] for m in manifest] + vqa_texts
             + [n["text_a"] + " " + n["text_b"] for n in nli])
    train_tokenizer(texts, os.path.join(out_dir, "tokenizer"))
    with open(os.path.join(out_dir, "meta.json"), "w", encoding="utf-8") as f:
        json.dump({"classification_labels": list(SHAPES), "nli_labels": list(NLI_LABELS), "params": params}, f, indent=1)
