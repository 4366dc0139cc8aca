"""Length-bucketed batches (medjax.data.pipelines.length_buckets): each batch padded to the smallest bucket
holding its longest example, the stream the same examples as the unbucketed pipeline's, processes' slices
assembling the single-process batch, and a resumed iterator continuing with exactly the same batches."""
from __future__ import annotations

import numpy as np
import pytest

from medjax.config import ConfigError
from medjax.data.pipelines.global_batches import global_batch_dataset
from medjax.data.pipelines.length_buckets import bucket_for, bucket_lengths, length_bucketed_dataset

BUCKETS, BATCH, WINDOW = (8, 16, 32), 4, 3
SOURCE = [{"i": i, "n": int(n)} for i, n in enumerate(np.random.default_rng(0).integers(1, 40, size=30))]


def padded(example, rng, pad_to):
    """Row i: ids 1..n (n cut at 32, the longest bucket), zero padding to pad_to, and the rng draw."""
    n = min(example["n"], BUCKETS[-1])
    ids = np.zeros(pad_to, np.int32)
    ids[:n] = np.arange(1, n + 1)
    return {"i": np.int32(example["i"]), "ids": ids, "draw": np.float32(rng.random())}


def stream(process_index=0, process_count=1, **kw):
    return length_bucketed_dataset(SOURCE, global_batch=BATCH, seed=3, transform=padded, buckets=BUCKETS,
                                   length_of=lambda e: min(e["n"], BUCKETS[-1]), window_batches=WINDOW,
                                   process_index=process_index, process_count=process_count, prefetch_threads=0, **kw)


def take(iterator, k):
    return [next(iterator) for _ in range(k)]


def test_batches_are_length_grouped_within_windows_and_padded_to_their_bucket():
    batches = take(iter(stream()), 4 * WINDOW)
    for b in batches:
        longest = max(min(SOURCE[i]["n"], 32) for i in b["i"])
        assert b["ids"].shape == (BATCH, bucket_for(longest, BUCKETS))  # the smallest bucket that holds the batch
    # the stream holds the same examples, window by window, as the unbucketed pipeline's (same seed)
    plain = iter(global_batch_dataset(SOURCE, global_batch=BATCH, seed=3, transform=lambda e, rng: e,
                                      prefetch_threads=0))
    for w in range(4):
        window = batches[w * WINDOW:(w + 1) * WINDOW]
        expected = np.concatenate([next(plain)["i"] for _ in range(WINDOW)])
        assert sorted(np.concatenate([b["i"] for b in window])) == sorted(expected)
        spans = sorted((min(SOURCE[i]["n"] for i in b["i"]), max(SOURCE[i]["n"] for i in b["i"])) for b in window)
        assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))  # sorted by length, then cut
    assert len({b["ids"].shape[1] for b in batches}) > 1


def test_processes_assemble_the_single_process_batch():
    whole = take(iter(stream()), 2 * WINDOW)
    halves = [take(iter(stream(p, 2)), 2 * WINDOW) for p in range(2)]
    for t, b in enumerate(whole):
        for key in b:
            np.testing.assert_array_equal(np.concatenate([halves[0][t][key], halves[1][t][key]]), b[key])


def test_resume_continues_with_the_same_batches():
    reference = take(iter(stream()), 8)
    first = iter(stream())
    take(first, 5)  # mid-window
    resumed = iter(stream())
    resumed.set_state(first.get_state())
    for want, got in zip(reference[5:], take(resumed, 3)):
        assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)


def test_bucket_lengths_are_checked():
    assert bucket_lengths([64, 16], 128) == (16, 64, 128)
    assert bucket_for(17, (16, 64, 128)) == 64 and bucket_for(500, (16, 64, 128)) == 128
    with pytest.raises(ConfigError, match=r"data.length_buckets=\[64, 256\]: .*1..data.max_length=128, got 256"):
        bucket_lengths([64, 256], 128)
    with pytest.raises(ConfigError, match="length_group_batches=0"):
        length_bucketed_dataset(SOURCE, global_batch=4, seed=0, transform=padded, length_of=len, buckets=BUCKETS,
                                window_batches=0)
