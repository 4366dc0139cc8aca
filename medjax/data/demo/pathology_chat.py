"""Synthetic pathology instruction data in LLaVA's formats, for PathChat / LLaVA (Lu et al., Nature 2024).

`make_pathology_chat_demo(out_dir)` writes:
- `tiles/NNNNN.png`: "H&E tiles": a pink stroma background with nuclei drawn in one of four architectures
  (diagnosis): adenocarcinoma (hollow glandular rings), squamous cell carcinoma (concentric keratin pearls),
  lymphoma (sheets of small dark dots), sarcoma (parallel spindle streaks); the grade (low / high) sets the
  nuclear density and the stain's darkness;
- `pretrain.json` (stage 1, template "plain"): a JSON list of LLaVA records `{"id", "image",
  "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}]}`;
- `instruct_train.json` / `instruct_val.json` (stage 2): multi-turn records whose answers depend on the tile
  (diagnosis, grade, architecture, a multiple-choice diagnosis in the evaluation's wording), the first human
  turn starting with `<image>\\n`;
- `pathqabench/mcq.jsonl` (`{"id", "image", "question", "choices", "answer": letter, "context"}`) and
  `pathqabench/open.jsonl` (`{"id", "image", "question", "reference"}`), PathQABench's two parts;
- `tokenizer/`: a byte-fallback BPE (`<unk>` 0, `<s>` 1, `</s>` 2, then `<pad>`, `<image>`) trained on these
  texts, saved as a Hugging Face tokenizer directory; `.complete` last (the arguments).
Deterministic given `seed`.
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image, ImageDraw

from medjax.data.demo import build_demo

DIAGNOSES = ("adenocarcinoma", "squamous cell carcinoma", "lymphoma", "sarcoma")
ARCHITECTURE = {"adenocarcinoma": "hollow glandular rings", "squamous cell carcinoma": "concentric keratin pearls",
                "lymphoma": "sheets of small round dark nuclei", "sarcoma": "parallel spindle-shaped streaks"}
ORGANS = {"adenocarcinoma": "colon", "squamous cell carcinoma": "skin", "lymphoma": "lymph node", "sarcoma": "thigh"}
GRADES = ("low", "high")
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN)


def render_tile(diagnosis: str, grade: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (size, size, 3) tile: pink stroma with the diagnosis's nuclear architecture at the grade's density."""
    stroma = tuple(int(c) for c in np.array([236, 180, 200]) + rng.integers(-12, 12, 3))
    canvas = Image.new("RGB", (size, size), stroma)
    draw = ImageDraw.Draw(canvas)
    dark = 0.55 if grade == "high" else 1.0
    nucleus = tuple(int(c * dark) for c in (110, 50, 150))
    count = int((10 if grade == "high" else 5) * (size / 32) ** 2 * rng.uniform(0.8, 1.2))
    s = size / 32
    for _ in range(count):
        x, y = rng.uniform(0, size, 2)
        if diagnosis == "adenocarcinoma":
            r = 3.5 * s
            draw.ellipse((x - r, y - r, x + r, y + r), outline=nucleus, width=max(1, int(s)))
        elif diagnosis == "squamous cell carcinoma":
            for r, fill in ((4 * s, nucleus), (2.5 * s, (250, 120, 150)), (1 * s, nucleus)):
                draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif diagnosis == "lymphoma":
            for dx, dy in rng.uniform(-3 * s, 3 * s, (4, 2)):
                r = 0.9 * s
                draw.ellipse((x + dx - r, y + dy - r, x + dx + r, y + dy + r), fill=nucleus)
        else:
            draw.line((x - 5 * s, y - 1.5 * s, x + 5 * s, y + 1.5 * s), fill=nucleus, width=max(1, int(1.2 * s)))
    noise = rng.normal(0, 6, (size, size, 3))
    return np.clip(np.asarray(canvas, np.float32) + noise, 0, 255).astype(np.uint8)


def caption(diagnosis: str, grade: str) -> str:
    return f"A tile with {ARCHITECTURE[diagnosis]} in pink stroma, {grade} grade {diagnosis}."


def conversation(diagnosis: str, grade: str, rng: np.random.Generator) -> list[dict]:
    """2-3 human/gpt turns about the tile; the first human turn carries the image."""
    turns = [("What is the most likely diagnosis?",
              f"The tile shows {ARCHITECTURE[diagnosis]}, most consistent with {diagnosis}."),
             ("What is the grade of this tumor?",
              f"It is {grade} grade: the nuclei are {'dense and dark' if grade == 'high' else 'sparse and pale'}."),
             ("Describe the architecture.", f"There are {ARCHITECTURE[diagnosis]}.")]
    order = rng.permutation(len(DIAGNOSES))  # a multiple-choice turn in the evaluation's wording
    choices = [DIAGNOSES[k] for k in order]
    letter = "ABCD"[choices.index(diagnosis)]
    options = " ".join(f"{a}. {c}" for a, c in zip("ABCD", choices))
    turns.append((f"What is the most likely diagnosis? Options: {options} Answer with the option's letter.",
                  f"{letter}. {diagnosis}"))
    chosen = [turns[i] for i in rng.permutation(4)[: 2 + int(rng.random() < 0.5)]]
    out = []
    for k, (question, answer) in enumerate(chosen):
        out.append({"from": "human", "value": (IMAGE_TOKEN + "\n" if k == 0 else "") + question})
        out.append({"from": "gpt", "value": answer})
    return out


def _train_tokenizer(texts: list[str], out_dir: str, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")  # no prefix space: template pieces concatenate exactly
    tokenizer.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    bytes_alphabet = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS) + bytes_alphabet,
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                      eos_token="</s>", pad_token="<pad>", additional_special_tokens=[IMAGE_TOKEN])
    wrapped.save_pretrained(os.path.join(out_dir, "tokenizer"))


def make_pathology_chat_demo(out_dir: str, num_tiles: int = 240, tile_size: int = 32, num_eval: int = 32,
                             vocab_size: int = 1000, seed: int = 0) -> str:
    params = dict(num_tiles=num_tiles, tile_size=tile_size, num_eval=num_eval, vocab_size=vocab_size, seed=seed,
                  version=2)  # version: bumped when the content changes, so caches are remade
    def write(out_dir: str) -> None:  # into a fresh temporary directory (build_demo renames it into place)
        rng = np.random.default_rng(seed)
        os.makedirs(os.path.join(out_dir, "tiles"), exist_ok=True)
        os.makedirs(os.path.join(out_dir, "pathqabench"), exist_ok=True)
        pretrain, train, val, mcq, open_ended, texts = [], [], [], [], [], []
        for i in range(num_tiles + num_eval):
            diagnosis, grade = DIAGNOSES[i % len(DIAGNOSES)], GRADES[int(rng.integers(2))]
            image = f"tiles/{i:05d}.png"
            Image.fromarray(render_tile(diagnosis, grade, tile_size, rng)).save(os.path.join(out_dir, image))
            record = {"id": f"{i:05d}", "image": image, "conversations": conversation(diagnosis, grade, rng)}
            texts += [turn["value"] for turn in record["conversations"]]
            if i < num_tiles:
                train.append(record)
                pretrain.append({"id": f"{i:05d}", "image": image, "conversations": [
                    {"from": "human", "value": IMAGE_TOKEN}, {"from": "gpt", "value": caption(diagnosis, grade)}]})
                texts.append(caption(diagnosis, grade))
                continue
            val.append(record)
            order = rng.permutation(len(DIAGNOSES))
            choices = [DIAGNOSES[k] for k in order]
            mcq.append({"id": f"q{i:05d}", "image": image, "question": "What is the most likely diagnosis?",
                        "choices": choices, "answer": "ABCD"[choices.index(diagnosis)],
                        "context": f"A biopsy from the {ORGANS[diagnosis]}."})
            open_ended.append({"id": f"o{i:05d}", "image": image, "question": "Describe the architecture.",
                               "reference": f"There are {ARCHITECTURE[diagnosis]}."})
        texts += [f"A biopsy from the {organ}. " + " ".join(f"{a}. {d}" for a, d in zip("ABCD", DIAGNOSES))
                  for organ in ORGANS.values()]
        # The prompt templates' fixed words (medjax/tasks/pathchat_data.py), so they get merges of their own.
        texts += ["A chat between a curious human and an artificial intelligence assistant.", "USER: ASSISTANT:",
                  "[INST] <<SYS>> <</SYS>> [/INST]", "You are a helpful language and vision assistant.",
                  "Options: Answer with the option's letter."] * 20
        for name, records in (("pretrain.json", pretrain), ("instruct_train.json", train), ("instruct_val.json", val)):
            with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
                json.dump(records, f, indent=1)
        for name, rows in (("mcq.jsonl", mcq), ("open.jsonl", open_ended)):
            with open(os.path.join(out_dir, "pathqabench", name), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        _train_tokenizer(texts, out_dir, vocab_size)

    return build_demo(out_dir, params, write, ("pretrain.json", "instruct_train.json", "tokenizer/tokenizer.json"))
