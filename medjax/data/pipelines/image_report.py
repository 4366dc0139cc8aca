"""PTUnifier pretraining examples and their Grain pipeline (Chen et al., ICCV 2023, Sec. 3.3; the
original's `BaseDataset.get_suite` + `collate` with the MLM collator).

One example = one (image, caption) sample of `ImageReportDataset`: the image through the CLIP
transform (RandomResizedCrop(scale 0.9-1) for training: the original's `clip_resizedcrop`), one
random sentence of the caption (`sent_level=True`) tokenised to `max_length` (48 in the paper), and
its MLM corruption (15%, 80/10/10). Every random choice comes from the element's generator, seeded
by (seed, stream position) in `medjax.data.pipelines.global_batches`, so the batches of a resumed run are identical.
ITM negatives are drawn inside the loss from other samples of the global batch, so no "false"
images are loaded here.
"""
from __future__ import annotations

from typing import Sequence

import grain
import numpy as np

from medjax.data.readers.image_report import clip_transform, load_tokenizer, pick_sentence, tokenize
from medjax.data.transforms.mlm_masking import mask_tokens
from medjax.data.pipelines.global_batches import global_batch_dataset


class PretrainingTransform:
    """Picklable per-example transform: {"image": PIL, "caption": str, ...} (+ rng) -> arrays:

    image float32 (S, S, 3) CLIP-normalised; text_ids / text_mask int32 (L,); text_ids_mlm int32 (L,)
    (corrupted); text_labels_mlm int32 (L,) (original ids at masked positions, -100 elsewhere).
    Without an rng (evaluation) the image is centre-cropped, the whole caption is used and the MLM
    mask is drawn from `eval_seed` and the example's image/caption index.
    """

    def __init__(self, tokenizer_dir: str, *, image_size: int, max_length: int, resized_crop: bool = True,
                 sent_level: bool = True, mlm_probability: float = 0.15, eval_seed: int = 0,
                 whole_word_masking: bool = False):
        self.tokenizer_dir, self.image_size, self.max_length = tokenizer_dir, int(image_size), int(max_length)
        self.resized_crop, self.sent_level = resized_crop, sent_level
        self.mlm_probability, self.eval_seed = mlm_probability, eval_seed
        self.whole_word_masking = bool(whole_word_masking)  # medjax.data.transforms.mlm_masking (word_ids)
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_dir)
        return self._tokenizer

    def __getstate__(self):
        return dict(self.__dict__, _tokenizer=None)

    def __call__(self, example: dict, rng: np.random.Generator | None = None) -> dict:
        train = rng is not None
        if rng is None:
            rng_mask = np.random.default_rng([self.eval_seed, example.get("image_index", 0), example.get("caption_index", 0)])
        else:
            rng_mask = rng
        image = clip_transform(example["image"], self.image_size, rng, resized_crop=self.resized_crop and train)
        text = pick_sentence(example["caption"], rng if train and self.sent_level else None)
        enc = tokenize(self.tokenizer, text, self.max_length, word_ids=self.whole_word_masking)
        tok = self.tokenizer
        ids_mlm, labels = mask_tokens(enc["input_ids"], enc["special_tokens_mask"], rng_mask,
                                      mask_token_id=tok.mask_token_id, vocab_size=len(tok),
                                      mlm_probability=self.mlm_probability, attention_mask=enc["attention_mask"],
                                      word_ids=enc.get("word_ids"))
        return {"image": image, "text_ids": enc["input_ids"], "text_mask": enc["attention_mask"],
                "text_ids_mlm": ids_mlm, "text_labels_mlm": labels}


def pretraining_train_data(dataset: Sequence[dict], transform: PretrainingTransform, *, global_batch: int, seed: int,
                           process_index: int = 0, process_count: int = 1,
                           prefetch_threads: int = 2, on_bad_example: str = "error") -> grain.IterDataset:
    """This process's share of each global batch (dicts of stacked arrays), shuffled per epoch,
    repeated forever, checkpointable (the Grain iterator's state is its position)."""
    return global_batch_dataset(dataset, global_batch=global_batch, seed=seed, transform=transform,
                                process_index=process_index, process_count=process_count,
                                prefetch_threads=prefetch_threads, on_bad_example=on_bad_example)
