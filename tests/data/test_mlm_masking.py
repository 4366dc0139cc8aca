"""MLM corruption statistics: 15% of non-special tokens selected, 80/10/10 mask/random/keep, specials
and padding never touched, labels -100 off the selected positions, reproducible per seed."""
import numpy as np
import pytest

from medjax.data.transforms.mlm_masking import IGNORE_INDEX, mask_tokens

VOCAB, MASK = 1000, 4


def _batch(n=4000, length=64, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, VOCAB, (n, length)).astype(np.int32)
    special = np.zeros_like(ids)
    ids[:, 0], ids[:, -1] = 0, 2  # <s> ... </s>
    special[:, 0] = special[:, -1] = 1
    attention = np.ones_like(ids)
    attention[:, 48:-1] = 0  # padding inside: excluded through the attention mask
    return ids, special, attention


def test_statistics_on_a_large_sample():
    ids, special, attention = _batch()
    corrupted, labels = mask_tokens(ids, special, np.random.default_rng(1), mask_token_id=MASK, vocab_size=VOCAB,
                                    attention_mask=attention)
    eligible = (special == 0) & (attention == 1)
    selected = labels != IGNORE_INDEX
    assert not (selected & ~eligible).any()  # specials and padding never selected
    np.testing.assert_array_equal(corrupted[~eligible], ids[~eligible])
    np.testing.assert_array_equal(labels[selected], ids[selected])  # labels are the original tokens
    fraction = selected.sum() / eligible.sum()
    assert abs(fraction - 0.15) < 0.003, fraction  # ~188k eligible tokens: 3 sd is 0.0025
    n = selected.sum()
    masked = (corrupted == MASK) & selected
    random_changed = (corrupted != MASK) & (corrupted != ids) & selected
    kept = (corrupted == ids) & selected
    # a random replacement equals the original with probability 1/V: expected 0.1 (1 - 1/V) changed
    assert abs(masked.sum() / n - 0.8) < 0.01
    assert abs(random_changed.sum() / n - 0.1 * (1 - 1 / VOCAB)) < 0.008
    assert abs(kept.sum() / n - 0.1 * (1 + 1 / VOCAB)) < 0.008
    assert not ((corrupted != ids) & ~selected).any()  # nothing changes off the selected positions
    assert corrupted.dtype == labels.dtype == np.int32


def test_reproducible_and_shape_agnostic():
    ids, special, _ = _batch(n=8, length=16)
    a = mask_tokens(ids, special, np.random.default_rng(7), mask_token_id=MASK, vocab_size=VOCAB)
    b = mask_tokens(ids, special, np.random.default_rng(7), mask_token_id=MASK, vocab_size=VOCAB)
    c = mask_tokens(ids, special, np.random.default_rng(8), mask_token_id=MASK, vocab_size=VOCAB)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    one, labels = mask_tokens(ids[0], special[0], np.random.default_rng(0), mask_token_id=MASK, vocab_size=VOCAB,
                              mlm_probability=1.0, mask_fraction=1.0, random_fraction=0.0)
    np.testing.assert_array_equal(one, np.where(special[0] == 1, ids[0], MASK))  # everything eligible masked
    np.testing.assert_array_equal(labels, np.where(special[0] == 1, IGNORE_INDEX, ids[0]))


def test_bad_arguments():
    ids, special, _ = _batch(n=2, length=8)
    with pytest.raises(ValueError, match="mlm_probability"):
        mask_tokens(ids, special, np.random.default_rng(0), mask_token_id=MASK, vocab_size=VOCAB, mlm_probability=1.5)
    with pytest.raises(ValueError, match="sum to at most 1"):
        mask_tokens(ids, special, np.random.default_rng(0), mask_token_id=MASK, vocab_size=VOCAB,
                    mask_fraction=0.95, random_fraction=0.1)
    with pytest.raises(ValueError, match="special_tokens_mask"):
        mask_tokens(ids, special[:, :4], np.random.default_rng(0), mask_token_id=MASK, vocab_size=VOCAB)
