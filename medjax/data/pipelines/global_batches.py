"""Grain pipelines that make the same global batches on any number of processes.

The global stream is one seeded permutation per epoch of the source's indices. Global batch t
holds stream positions [t*B, (t+1)*B); process p of P loads only the contiguous slice
[t*B + p*B/P, t*B + (p+1)*B/P), so the global array assembled from the processes (in process
order) is the same batch a single process would load. Each element's augmentation is seeded by
(seed, stream position), never by the process or worker, so 1 or N processes train the same
thing. The iterator is a Grain `DatasetIterator` whose state (a position) is checkpointed.

An example that fails to load names its file (`medjax.data.pipelines.bad_examples`); with
`on_bad_example="skip"` (config `data.on_bad_example`) it is replaced by a seeded rule of (seed,
position), so batches stay a pure function of (seed, step), and each element carries a skip count.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np

from medjax.data.pipelines import bad_examples

Example = dict[str, Any]
Transform = Callable[[Example, np.random.Generator], Example]


class _ProcessPositions(Sequence[int]):
    """Random access: this process's i-th element -> its position in the global stream."""

    def __init__(self, stream_length: int, global_batch: int, process_index: int, process_count: int):
        self.local_batch = global_batch // process_count
        self.global_batch = global_batch
        self.offset = process_index * self.local_batch
        self.length = sys.maxsize if stream_length >= sys.maxsize else (stream_length // global_batch) * self.local_batch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < self.length:
            raise IndexError(i)
        return (i // self.local_batch) * self.global_batch + self.offset + i % self.local_batch


class _LoadAndTransform:
    """Picklable map: stream position -> transformed example, seeded by (seed, position); a failure names
    the file, or with on_bad_example="skip" the example is replaced (medjax.data.pipelines.bad_examples)."""

    def __init__(self, source, order, transform: Transform, seed: int, on_bad_example: str = "error"):
        self.source, self.order, self.transform, self.seed = source, order, transform, seed
        self.on_bad_example = bad_examples.check_policy(on_bad_example)

    def __call__(self, position: int) -> Example:
        index = int(self.order[position])

        def load(example: Example) -> Example:  # a fresh generator per attempt: a failed one consumes nothing
            return self.transform(example, np.random.default_rng([self.seed, position]))

        if self.on_bad_example == "skip":
            return bad_examples.load_or_replace(self.source, index, position, self.seed, load)
        return bad_examples.load_naming_the_file(self.source, index, load)


def process_batch_size(global_batch: int, process_count: int) -> int:
    """The per-process batch; a clear error when the global batch does not divide over the processes
    (the Trainer checks the data-parallel devices)."""
    if global_batch % process_count:
        raise ValueError(f"train.batch_size={global_batch} does not divide over {process_count} processes")
    return global_batch // process_count


def global_batch_dataset(
    source: Sequence[Example], *, global_batch: int, seed: int, transform: Transform,
    process_index: int = 0, process_count: int = 1, shuffle: bool = True, num_epochs: int | None = None,
    prefetch_threads: int = 2, on_bad_example: str = "error",
) -> grain.IterDataset:
    """Per-process batches (dicts of stacked numpy arrays) of `global_batch // process_count` examples;
    with `on_bad_example="skip"` each batch also holds `bad_examples.SKIPPED_KEY` (int32 per example).

    The stream runs on over epoch boundaries, so a source smaller than one global batch (a 1% label fraction,
    say) still trains: each batch then holds every example more than once, each epoch in a fresh order."""
    if len(source) == 0:
        raise ValueError("the dataset has no examples")
    if num_epochs is not None and len(source) * num_epochs < global_batch:
        raise ValueError(f"the dataset has {len(source)} examples x {num_epochs} epochs, fewer than one global "
                         f"batch of {global_batch}")
    local_batch = process_batch_size(global_batch, process_count)
    order = grain.MapDataset.range(len(source))
    if shuffle:
        order = order.shuffle(seed=seed)
    order = order.repeat(num_epochs)
    positions = _ProcessPositions(len(order), global_batch, process_index, process_count)
    ds = grain.MapDataset.source(positions).map(_LoadAndTransform(source, order, transform, seed, on_bad_example))
    ds = ds.batch(local_batch, drop_remainder=True)
    options = grain.ReadOptions(num_threads=prefetch_threads, prefetch_buffer_size=2 * max(prefetch_threads, 1))
    return ds.to_iter_dataset(read_options=options)


def eval_batches(source: Sequence[Example], batch_size: int, transform: Callable[[Example], Example]) -> Iterator[Example]:
    """In-order batches over the whole source; the last one is padded and carries a `valid` mask."""
    for start in range(0, len(source), batch_size):
        items = [transform(source[i]) for i in range(start, min(start + batch_size, len(source)))]
        valid = np.zeros(batch_size, bool)
        valid[: len(items)] = True
        items += [items[-1]] * (batch_size - len(items))
        batch = {k: np.stack([it[k] for it in items]) for k in items[0]}
        batch["valid"] = valid
        yield batch
