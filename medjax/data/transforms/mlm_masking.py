"""BERT masked-language-model corruption (Devlin et al., NAACL 2019, Sec. 3.1 "Task #1"), as used by
PTUnifier's MLM objective (Chen et al., ICCV 2023; Hugging Face `DataCollatorForLanguageModeling`):

    each non-special token is selected with probability p = 0.15;
    a selected token becomes [MASK] with prob. 0.8, a uniformly random vocabulary token with 0.1,
    and stays unchanged with 0.1; labels = the original id at selected positions, -100 elsewhere.

Whole-word masking (an option, `word_ids`; for BERT-family WordPiece tokenizers, where a word's
"##" pieces would otherwise be predictable from their neighbours): the selection is drawn once per word
and applies to all of its tokens (our choice: each word with probability p, rather than Hugging Face
`DataCollatorForWholeWordMask`'s fixed round(p * length) token budget); the 80/10/10 split stays per token.

Special tokens (<s>, </s>, [CLS], [SEP], padding) are never selected. Random draws come from a passed
numpy Generator, so a seeded pipeline masks identically on any worker and after a resume.
"""
from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100  # label of unselected positions (the loss skips them)


def mask_tokens(input_ids: np.ndarray, special_tokens_mask: np.ndarray, rng: np.random.Generator, *,
                mask_token_id: int, vocab_size: int, mlm_probability: float = 0.15, mask_fraction: float = 0.8,
                random_fraction: float = 0.1, attention_mask: np.ndarray | None = None,
                ignore_index: int = IGNORE_INDEX, word_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(corrupted ids, labels), both int32 of `input_ids`' shape (any shape: one text or a batch).

    `special_tokens_mask` is 1 where a token must never be masked; positions with
    `attention_mask == 0` (padding) are excluded too. Of the selected tokens, `mask_fraction` become
    `mask_token_id`, `random_fraction` a token drawn uniformly from [0, vocab_size), the rest stay.
    `word_ids` (input_ids' shape, the tokenizer's word index per token, -1 for none): whole-word masking.
    """
    if not 0.0 <= mlm_probability <= 1.0:
        raise ValueError(f"mlm_probability must be in [0, 1], got {mlm_probability}")
    if mask_fraction < 0 or random_fraction < 0 or mask_fraction + random_fraction > 1.0:
        raise ValueError(f"mask_fraction ({mask_fraction}) and random_fraction ({random_fraction}) must be >= 0 "
                         "and sum to at most 1")
    ids = np.asarray(input_ids)
    special = np.asarray(special_tokens_mask).astype(bool)
    if special.shape != ids.shape:
        raise ValueError(f"special_tokens_mask {special.shape} must have the shape of input_ids {ids.shape}")
    if attention_mask is not None:
        special = special | ~np.asarray(attention_mask).astype(bool)
    if word_ids is None:
        selected = (rng.random(ids.shape) < mlm_probability) & ~special
    else:
        words = np.asarray(word_ids)
        if words.shape != ids.shape:
            raise ValueError(f"word_ids {words.shape} must have the shape of input_ids {ids.shape}")
        rows = words.reshape(-1, words.shape[-1]) if words.ndim else words.reshape(1, 1)
        draws = rng.random((rows.shape[0], int(max(rows.max(initial=-1), -1)) + 1))  # one draw per word
        per_token = np.take_along_axis(draws, np.maximum(rows, 0), axis=1) if draws.shape[1] else np.ones(rows.shape)
        selected = ((per_token < mlm_probability) & (rows >= 0)).reshape(ids.shape) & ~special
    labels = np.where(selected, ids, ignore_index).astype(np.int32)
    # One uniform draw splits the selected tokens into mask / random / keep (HF draws two Bernoullis:
    # 0.8, then 0.5 of the rest - the same 80/10/10 distribution).
    action = rng.random(ids.shape)
    to_mask = selected & (action < mask_fraction)
    to_random = selected & (action >= mask_fraction) & (action < mask_fraction + random_fraction)
    corrupted = np.where(to_mask, mask_token_id, ids)
    corrupted = np.where(to_random, rng.integers(0, vocab_size, ids.shape), corrupted)
    return corrupted.astype(np.int32), labels
