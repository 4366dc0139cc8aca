"""Synthetic pathology instruction data in LLaVA's formats, for PathChat / LLaVA (Lu et al., Nature 2024).

`make_pathology_chat_demo(out_dir)` writes:
- `tiles/NNNNN.png`: "H&E tiles": one of four architectures (diagnosis), each in its own stain palette:
  adenocarcinoma (glands: white lumens in rims of nuclei, pale pink), squamous cell carcinoma (concentric keratin
  pearls, orange-pink), lymphoma (sheets of small dark blue nuclei, lilac), sarcoma (parallel magenta spindle
  streaks); the grade (low / high) sets the nuclear density and darkness;
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
from medjax.tasks.pathchat_data import template_fixed_texts

DIAGNOSES = ("adenocarcinoma", "squamous cell carcinoma", "lymphoma", "sarcoma")
ARCHITECTURE = {"adenocarcinoma": "hollow glandular rings", "squamous cell carcinoma": "concentric keratin pearls",
                "lymphoma": "sheets of small round dark nuclei", "sarcoma": "parallel spindle-shaped streaks"}
ORGANS = {"adenocarcinoma": "colon", "squamous cell carcinoma": "skin", "lymphoma": "lymph node", "sarcoma": "thigh"}
GRADES = ("low", "high")
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN)


# Each diagnosis has its own stain palette (stroma, nuclei) besides its architecture, as H&E shows them: glands with
# white lumens, eosinophilic (orange-pink) keratin, basophilic (blue) lymphoid sheets, magenta spindle fascicles. The
# colour makes the diagnosis visible to the demo's randomly initialised, frozen vision tower (features of random
# ViTs keep mean colour, barely texture: with one palette for all four the tiles' image tokens were 0.998 cosine-
# similar and the LLM learned to ignore them -- issue #23; our choice, the demo's planted signal).
PALETTES = {"adenocarcinoma": ((240, 200, 215), (120, 60, 160)),  # (stroma RGB, nuclei RGB)
            "squamous cell carcinoma": ((245, 170, 150), (200, 80, 60)),
            "lymphoma": ((200, 170, 220), (50, 40, 140)), "sarcoma": ((230, 150, 190), (150, 30, 110))}


def render_tile(diagnosis: str, grade: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (size, size, 3) tile: the diagnosis's stroma colour with its nuclear architecture drawn in its nuclear
    colour, at the grade's density and darkness (high grade: twice the structures, 40 % darker nuclei)."""
    stroma, nucleus = PALETTES[diagnosis]
    stroma = tuple(int(c) for c in np.array(stroma) + rng.integers(-10, 10, 3))
    canvas = Image.new("RGB", (size, size), stroma)
    draw = ImageDraw.Draw(canvas)
    dark = 0.6 if grade == "high" else 1.0
    nucleus = tuple(int(c * dark) for c in nucleus)
    s = size / 32
    count = int((8 if grade == "high" else 4) * s ** 2 * rng.uniform(0.8, 1.2))
    for _ in range(count):
        x, y = rng.uniform(0, size, 2)
        if diagnosis == "adenocarcinoma":  # glands: a white lumen in a rim of nuclei
            r = rng.uniform(3.5, 5.5) * s
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(252, 250, 252), outline=nucleus,
                         width=max(1, int(1.5 * s)))
        elif diagnosis == "squamous cell carcinoma":  # keratin pearls: concentric nuclei / keratin / nucleus
            for r, fill in ((5 * s, nucleus), (3.5 * s, (250, 140, 110)), (1.5 * s, nucleus)):
                draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif diagnosis == "lymphoma":  # sheets of small round dark nuclei
            for dx, dy in rng.uniform(-4 * s, 4 * s, (8, 2)):
                r = 1.2 * s
                draw.ellipse((x + dx - r, y + dy - r, x + dx + r, y + dy + r), fill=nucleus)
        else:  # sarcoma: parallel spindle-shaped streaks
            draw.line((x - 8 * s, y - 2.5 * s, x + 8 * s, y + 2.5 * s), fill=nucleus, width=max(1, int(1.5 * s)))
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


def train_tokenizer(texts: list[str], out_dir: str, vocab_size: int) -> None:
    """A byte-fallback BPE trained on `texts` (<unk> <s> </s> <pad> <image> first), saved as a Hugging Face
    tokenizer directory `<out_dir>/tokenizer`."""
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
                  version=4)  # version: bumped when the content changes, so caches are remade
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
        # As the templates put them: replies after a space (" {answer}"), so their first word is one token with its
        # space (else a lone "▁" starts every reply and also ends it, before </s>: the demo answered nothing), and
        # the templates' fixed texts (system prompts, role tags) with merges of their own.
        texts += [" " + text for text in texts]
        texts += template_fixed_texts() * 20
        for name, records in (("pretrain.json", pretrain), ("instruct_train.json", train), ("instruct_val.json", val)):
            with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
                json.dump(records, f, indent=1)
        for name, rows in (("mcq.jsonl", mcq), ("open.jsonl", open_ended)):
            with open(os.path.join(out_dir, "pathqabench", name), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        train_tokenizer(texts, out_dir, vocab_size)

    return build_demo(out_dir, params, write, ("pretrain.json", "instruct_train.json", "tokenizer/tokenizer.json"))
