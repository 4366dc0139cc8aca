"""Length-grouped batches padded to a few static bucket lengths (sequence bucketing for decoder training).

The stream is `global_batch_dataset`'s: one seeded permutation of the source per epoch, epochs running on.
It is cut into windows of `window_batches` global batches (W = window_batches x B stream positions). Within
window w the positions are sorted by their example's token length (ties by position), cut into
`window_batches` consecutive global batches, and those batches are visited in an order permuted by
rng(seed, w) -- HF's `LengthGroupedSampler` megabatches, made a pure function of (seed, step). Every row of
global batch t is padded to the smallest bucket length that holds the batch's longest example (the longest
bucket is `max_length`), so one jitted step is compiled per bucket used, never per batch.

Process p of P loads the contiguous slice [p B/P, (p+1) B/P) of each global batch and every process computes
the same window plan (token lengths only, no images), so all agree on each batch's bucket and the global
array assembled in process order is the single-process batch. Each element's augmentation is seeded by
(seed, stream position) as in `global_batch_dataset`. The Grain iterator's state is a position, so a resumed
run continues with exactly the batches an uninterrupted run sees.

Compared with padding every row to `max_length`, only the padding changes: a bucketed row is the unbucketed
row cut at the bucket length, and what is cut is padding (label -100, attention mask 0), so a causal model's
loss over the supervised tokens is the same.

With `on_bad_example="skip"` an example whose length cannot be computed counts as `max_length` (its batch is
padded to the longest bucket, which any replacement fits); a replacement for an example that only fails when
loaded is padded (or truncated) to its batch's bucket.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import grain
import numpy as np

from medjax.config import ConfigError
from medjax.data.pipelines import bad_examples
from medjax.data.pipelines.global_batches import process_batch_size

Example = dict[str, Any]
PaddedTransform = Callable[[Example, np.random.Generator, int], Example]  # (example, rng, pad_to) -> arrays
WINDOW_SALT = 0x6C656E  # keeps the window permutations apart from other seeded draws of (seed, w)


def bucket_lengths(buckets: Sequence[int], max_length: int, field: str = "data.length_buckets") -> tuple[int, ...]:
    """The sorted bucket lengths, `max_length` always the last; a clear error for a bad config value."""
    out = set()
    for b in buckets:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 0 < int(b) <= max_length:
            raise ConfigError(f"config {field}={list(buckets)}: expected token lengths 1..data.max_length="
                              f"{max_length}, got {b!r} (lowering data.max_length? set {field} too, or [] for none)")
        out.add(int(b))
    return tuple(sorted(out | {int(max_length)}))


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding `length` tokens (the longest bucket when none does: rows are truncated)."""
    for b in buckets:
        if length <= b:
            return b
    return buckets[-1]


class _Plan(Sequence[tuple[int, int]]):
    """Random access: this process's i-th element -> (stream position, the padded length of its batch)."""

    def __init__(self, source, order, length_of: Callable[[Example], int], *, global_batch: int, local_batch: int,
                 offset: int, window_batches: int, buckets: tuple[int, ...], seed: int, length: int,
                 on_bad_example: str):
        self.source, self.order, self.length_of = source, order, length_of
        self.global_batch, self.local_batch, self.offset = global_batch, local_batch, offset
        self.window_batches, self.buckets, self.seed, self.length = window_batches, buckets, seed, length
        self.on_bad_example = on_bad_example

    def __len__(self) -> int:
        return self.length

    def _length(self, index: int) -> int:
        if self.on_bad_example == "skip":
            try:
                return int(self.length_of(self.source[index]))
            except Exception:  # replaced when loaded; the longest bucket fits any replacement
                return self.buckets[-1]
        return int(bad_examples.load_naming_the_file(self.source, index, self.length_of))

    @functools.lru_cache(maxsize=4)
    def window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions (window_batches, B) in visiting order, padded length per batch) of window w."""
        size = self.window_batches * self.global_batch
        positions = np.arange(w * size, (w + 1) * size, dtype=np.int64)
        lengths = np.asarray([self._length(int(self.order[int(p)])) for p in positions], np.int64)
        ranked = positions[np.lexsort((positions, lengths))].reshape(self.window_batches, self.global_batch)
        pad = np.asarray([bucket_for(int(n), self.buckets) for n in np.sort(lengths).reshape(ranked.shape)[:, -1]])
        visit = np.random.default_rng([self.seed, w, WINDOW_SALT]).permutation(self.window_batches)
        return ranked[visit], pad[visit]

    def __getitem__(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        t, r = divmod(i, self.local_batch)
        positions, pad = self.window(t // self.window_batches)
        return int(positions[t % self.window_batches, self.offset + r]), int(pad[t % self.window_batches])


class _LoadPadded:
    """Picklable map: (stream position, pad_to) -> transformed example padded to pad_to, seeded by (seed,
    position); failures handled as in `global_batch_dataset`."""

    def __init__(self, source, order, transform: PaddedTransform, seed: int, on_bad_example: str):
        self.source, self.order, self.transform, self.seed = source, order, transform, seed
        self.on_bad_example = on_bad_example

    def __call__(self, element: tuple[int, int]) -> Example:
        position, pad_to = element
        index = int(self.order[position])

        def load(example: Example) -> Example:
            return self.transform(example, np.random.default_rng([self.seed, position]), pad_to)

        if self.on_bad_example == "skip":
            return bad_examples.load_or_replace(self.source, index, position, self.seed, load)
        return bad_examples.load_naming_the_file(self.source, index, load)


def length_bucketed_dataset(
    source: Sequence[Example], *, global_batch: int, seed: int, transform: PaddedTransform,
    length_of: Callable[[Example], int], buckets: Sequence[int], window_batches: int = 8,
    process_index: int = 0, process_count: int = 1, prefetch_threads: int = 2, on_bad_example: str = "error",
) -> grain.IterDataset:
    """Per-process batches (dicts of stacked numpy arrays), each padded to one of `buckets` (sorted, the last
    the longest allowed length); `length_of(example)` is an example's unpadded token length and
    `transform(example, rng, pad_to)` its arrays padded to `pad_to` tokens. `window_batches` global batches
    are length-grouped together (1: no grouping, each batch only padded to its own bucket)."""
    if len(source) == 0:
        raise ValueError("the dataset has no examples")
    if int(window_batches) < 1:
        raise ConfigError(f"config data.length_group_batches={window_batches}: expected an integer >= 1")
    local_batch = process_batch_size(global_batch, process_count)
    policy = bad_examples.check_policy(on_bad_example)
    order = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat(None)
    plan = _Plan(source, order, length_of, global_batch=global_batch, local_batch=local_batch,
                 offset=process_index * local_batch, window_batches=int(window_batches), buckets=tuple(buckets),
                 seed=seed, length=(len(order) // global_batch) * local_batch, on_bad_example=policy)
    ds = grain.MapDataset.source(plan).map(_LoadPadded(source, order, transform, seed, policy))
    ds = ds.batch(local_batch, drop_remainder=True)
    options = grain.ReadOptions(num_threads=prefetch_threads, prefetch_buffer_size=2 * max(prefetch_threads, 1))
    return ds.to_iter_dataset(read_options=options)
