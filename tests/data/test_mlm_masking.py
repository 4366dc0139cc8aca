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


def test_whole_word_masking_selects_every_piece_of_a_word():
    from medjax.data.transforms.mlm_masking import mask_tokens as mask

    # [CLS] w0 w0 w1 w2 w2 w2 w3 [SEP] pad ; word index per token, -1 for specials / padding
    words = np.array([-1, 0, 0, 1, 2, 2, 2, 3, -1, -1])
    ids = np.arange(10, 20)
    special = (words < 0).astype(np.int32)
    rng = np.random.default_rng(0)
    shares, seen = [], set()
    for _ in range(400):
        _, labels = mask(ids, special, rng, mask_token_id=99, vocab_size=100, mlm_probability=0.3, word_ids=words)
        chosen = labels != -100
        for w in range(4):  # all pieces of a word share one draw
            assert len(set(chosen[words == w])) == 1
        assert not chosen[words < 0].any()
        seen.add(tuple(chosen[[1, 3, 4, 7]]))
        shares.append(chosen[[1, 3, 4, 7]].mean())
    assert abs(np.mean(shares) - 0.3) < 0.04 and len(seen) > 8  # each word with probability p, independently
    batch_words = np.stack([words, words])
    _, labels = mask(np.stack([ids, ids]), np.stack([special, special]), np.random.default_rng(1), mask_token_id=99,
                     vocab_size=100, mlm_probability=0.5, word_ids=batch_words)
    for row in labels != -100:
        for w in range(4):
            assert len(set(row[batch_words[0] == w])) == 1
