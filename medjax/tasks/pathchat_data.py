"""PathChat / LLaVA instruction data: LLaVA-format conversation files, the prompt templates and the label
masking that supervises only the assistant's replies (Liu et al., LLaVA-1.5, `llava/train/train.py`
`preprocess_plain` / `preprocess_v1` / `preprocess_llama_2`).

A record is `{"id", "image": path relative to the file, "conversations": [{"from": "human"|"gpt", "value"}...]}`
(a JSON list, LLaVA's format); the human turns alternate with gpt turns, human first, and exactly one human
turn holds the `<image>` placeholder (LLaVA moves it to the front of its turn: "<image>\\n" + text).

Templates (`TEMPLATES`), rendered as (text, supervised) pieces:
- `plain` (stage 1): BOS, <image>, then caption + "\\n" supervised (a single human + gpt pair).
- `vicuna_v1`: BOS, SYSTEM + " ", per turn "USER: {q} ASSISTANT:" ignored, " {a}" and </s> supervised.
- `llama_2`: per turn BOS "[INST] {<<SYS>>\\n{system}\\n<</SYS>>\\n\\n on the first}{q} [/INST]" ignored,
  " {a} " and </s> supervised.
Each piece is tokenised on its own (no special tokens added) and the ids concatenated, so a label mask
always lines up with the ids it masks: the original's "tokenization mismatch" (whole-prompt ids versus
per-turn counts, which silently zeroes a sample) cannot occur -- our choice. BOS / EOS are the tokenizer's
ids; `<image>` becomes `num_image_tokens` copies of the image token id, all at label -100, as are the
system prompt, the human turns and padding. A record whose masking cannot be computed (bad roles, no or
several images, no supervised token left after truncation to max_length, image tokens truncated) raises a
`DataError` naming the file, the record and the field; with data.on_bad_example=skip it is replaced and
counted (`medjax.data.pipelines.bad_examples`).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from medjax.data.errors import DataError
from medjax.data.readers.image_io import read_image
from medjax.data.readers.text_io import read_json
from medjax.errors import MedjaxInputError

IGNORE = -100
IMAGE_TOKEN = "<image>"
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the human's questions.")
LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                  "that the user provides, and assist the user with a variety of tasks using natural language.")
TEMPLATES = ("plain", "vicuna_v1", "llama_2")
ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's image normalisation (LLaVA's image processor)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BOS, EOS = object(), object()  # piece markers: the tokenizer's BOS / EOS id


def template_fixed_texts() -> list[str]:
    """The templates' fixed strings (for training a demo tokenizer that knows them)."""
    return [VICUNA_SYSTEM, LLAMA_2_SYSTEM, "USER: ASSISTANT:", "[INST] <<SYS>>\n<</SYS>>\n\n [/INST]"]


def _turns(record: dict, where: str) -> list[tuple[str, str]]:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field 'conversations': expected a non-empty list of {{'from', 'value'}} turns")
    out = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            raise DataError(f"{where}: field 'conversations[{k}]': expected {{'from': one of {sorted(ROLES)}, "
                            f"'value': text}}, got {turn!r:.120}")
        role = ROLES[turn["from"]]
        if role != ("human" if k % 2 == 0 else "gpt"):
            raise DataError(f"{where}: field 'conversations[{k}].from' is {turn['from']!r}; turns must alternate "
                            "human, gpt, human, ... starting with human")
        out.append((role, turn["value"]))
    if len(out) % 2:
        raise DataError(f"{where}: field 'conversations': the last turn is a human turn with no reply to supervise")
    images = sum(value.count(IMAGE_TOKEN) for _, value in out)
    if images != 1 or any(IMAGE_TOKEN in value for role, value in out if role == "gpt"):
        raise DataError(f"{where}: field 'conversations': expected exactly one {IMAGE_TOKEN} in a human turn, "
                        f"found {images}")
    return out


def _question(value: str) -> list[Any]:
    """A human turn as pieces, its <image> moved to the front ("<image>\\n" + text, LLaVA's preprocess_multimodal)."""
    if IMAGE_TOKEN not in value:
        return [value]
    text = value.replace(IMAGE_TOKEN, "").strip()
    return [IMAGE_TOKEN, "\n" + text] if text else [IMAGE_TOKEN]


def render(turns: Sequence[tuple[str, str]], template: str, where: str) -> list[tuple[Any, bool]]:
    """(piece, supervised) pieces of one conversation: text, IMAGE_TOKEN, BOS or EOS."""
    pairs = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns), 2)]
    if template == "plain":
        if len(pairs) != 1:
            raise DataError(f"{where}: field 'conversations': template 'plain' takes one human + gpt pair (an image "
                            f"and its caption), got {len(pairs)}")
        return [(BOS, False), (IMAGE_TOKEN, False), (pairs[0][1] + "\n", True)]
    if template == "vicuna_v1":
        pieces: list[tuple[Any, bool]] = [(BOS, False), (VICUNA_SYSTEM + " ", False)]
        for k, (question, answer) in enumerate(pairs):
            prefix = "USER: " if k == 0 else " USER: "
            pieces += [(p, False) for p in [prefix] + _question(question) + [" ASSISTANT:"]]
            pieces += [(" " + answer.strip(), True), (EOS, True)]
        return pieces
    if template == "llama_2":
        pieces = []
        for k, (question, answer) in enumerate(pairs):
            system = f"<<SYS>>\n{LLAMA_2_SYSTEM}\n<</SYS>>\n\n" if k == 0 else ""
            pieces += [(BOS, False), ("[INST] " + system, False)] + [(p, False) for p in _question(question)]
            pieces += [(" [/INST]", False), (" " + answer.strip() + " ", True), (EOS, True)]
        return pieces
    raise MedjaxInputError(f"data.template={template!r}: expected one of {', '.join(TEMPLATES)}")


def encode(pieces, tokenizer, image_token_id: int, num_image_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) int32 of the whole conversation (no padding or truncation)."""
    ids, labels = [], []
    for piece, supervised in pieces:
        if piece is BOS:
            chunk = [tokenizer.bos_token_id]
        elif piece is EOS:
            chunk = [tokenizer.eos_token_id]
        elif piece == IMAGE_TOKEN:
            chunk = [image_token_id] * num_image_tokens
        else:
            chunk = tokenizer(piece, add_special_tokens=False)["input_ids"]
        ids += chunk
        labels += chunk if supervised else [IGNORE] * len(chunk)
    return np.asarray(ids, np.int32), np.asarray(labels, np.int32)


def pad_or_truncate(ids: np.ndarray, labels: np.ndarray, max_length: int, pad_id: int, image_token_id: int,
                    where: str) -> dict[str, np.ndarray]:
    """Right-padded / truncated to max_length: input_ids, labels (-100 at padding), attention_mask."""
    images = int(np.sum(ids == image_token_id))
    ids, labels = ids[:max_length], labels[:max_length]
    if int(np.sum(ids == image_token_id)) != images:
        raise DataError(f"{where}: field 'conversations': data.max_length={max_length} cuts into the {images} image "
                        "tokens; raise data.max_length")
    if not np.any(labels[1:] != IGNORE):
        raise DataError(f"{where}: field 'conversations': no assistant token is left to supervise within "
                        f"data.max_length={max_length} tokens")
    n = ids.shape[0]
    out_ids = np.full(max_length, pad_id, np.int32)
    out_labels = np.full(max_length, IGNORE, np.int32)
    out_ids[:n], out_labels[:n] = ids, labels
    return {"input_ids": out_ids, "labels": out_labels, "attention_mask": (np.arange(max_length) < n).astype(np.int32)}


def image_pixels(image: Image.Image, size: int, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """LLaVA-1.5's image input: padded to a square with the mean colour, resized (bicubic) to size x size,
    normalised by the vision tower's statistics (CLIP's by default; UNI's are ImageNet's); float32 (size, size, 3),
    channels last."""
    image = image.convert("RGB")
    width, height = image.size
    if width != height:
        side = max(width, height)
        square = Image.new("RGB", (side, side), tuple(int(255 * m) for m in mean))
        square.paste(image, ((side - width) // 2, (side - height) // 2))
        image = square
    pixels = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255.0
    return (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


class ConversationDataset:
    """The records of a LLaVA-format JSON file; `describe(i)` names the file and the record, items are
    {"image": path, "turns", "where"} (the turns checked when the file is read)."""

    def __init__(self, path: str, image_root: str | None = None):
        if not os.path.isfile(path):
            raise DataError(f"{path}: conversation file not found (data.train_file / data.eval_file)")
        records = read_json(path, "LLaVA conversation file")
        if not isinstance(records, list) or not records:
            raise DataError(f"{path}: expected a non-empty JSON list of conversation records")
        self.path, self.root = path, image_root or os.path.dirname(path)
        self.items = []
        for i, record in enumerate(records):
            where = self.where(i, record)
            if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                raise DataError(f"{where}: field 'image': expected an image path relative to {self.root}")
            self.items.append({"image": os.path.join(self.root, record["image"]), "turns": _turns(record, where),
                               "where": where})

    def where(self, i: int, record: Any = None) -> str:
        ident = record.get("id") if isinstance(record, dict) else None
        return f"{self.path}: record {i}" + (f" (id {ident})" if ident is not None else "")

    def describe(self, i: int) -> str:
        return self.items[i]["where"] + f": image {self.items[i]['image']}"

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class ConversationExample:
    """Picklable (record, rng) -> {"pixel_values", "input_ids", "labels", "attention_mask"}."""

    def __init__(self, tokenizer, template: str, image_size: int, max_length: int, image_token_id: int,
                 num_image_tokens: int, pixel_mean: Sequence[float] = CLIP_MEAN, pixel_std: Sequence[float] = CLIP_STD):
        if template not in TEMPLATES:
            raise MedjaxInputError(f"data.template={template!r}: expected one of {', '.join(TEMPLATES)}")
        self.tokenizer, self.template, self.image_size = tokenizer, template, int(image_size)
        self.max_length, self.image_token_id, self.num_image_tokens = int(max_length), image_token_id, num_image_tokens
        self.pixel_mean, self.pixel_std = tuple(pixel_mean), tuple(pixel_std)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def length(self, item: dict) -> int:
        """The record's token count before padding (its masking refused as in __call__); for length bucketing."""
        ids, labels = encode(render(item["turns"], self.template, item["where"]), self.tokenizer, self.image_token_id,
                             self.num_image_tokens)
        pad_or_truncate(ids, labels, self.max_length, self.pad_id, self.image_token_id, item["where"])
        return min(len(ids), self.max_length)

    def __call__(self, item: dict, rng: np.random.Generator | None = None, pad_to: int | None = None) -> dict:
        """The arrays padded to `pad_to` tokens (a length bucket, `medjax.data.pipelines.length_buckets`), else to
        max_length; either way truncated at max_length first, so a bucketed row is the max_length row cut short."""
        pieces = render(item["turns"], self.template, item["where"])
        ids, labels = encode(pieces, self.tokenizer, self.image_token_id, self.num_image_tokens)
        out = pad_or_truncate(ids, labels, self.max_length, self.pad_id, self.image_token_id, item["where"])
        if pad_to is not None and pad_to < self.max_length:
            if out["attention_mask"][pad_to:].any():  # longer than its batch's bucket (a bad example's replacement)
                out = pad_or_truncate(ids, labels, pad_to, self.pad_id, self.image_token_id, item["where"])
            else:
                out = {k: v[:pad_to] for k, v in out.items()}
        image = Image.fromarray(read_image(item["image"]))
        return dict(out, pixel_values=image_pixels(image, self.image_size, self.pixel_mean, self.pixel_std))
