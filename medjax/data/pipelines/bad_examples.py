"""What a training pipeline does with an example whose file fails mid-run (issue #15): config key
`data.on_bad_example`.

- "error" (default): stop. The error names the file whatever the reader: a reader's own error
  (`medjax.errors.MedjaxInputError`: DataError, CTDataError, SlideError, ...) already does and passes
  unchanged; any other exception becomes a `DataError` opening with the source's description of the
  example (`source.describe(index)`: the file and its manifest line; sources without one: the index).
- "skip": the example is replaced deterministically. For the element at global stream position p whose
  source index failed, attempt a = 1, 2, ... loads source index
  `replacement_index(seed, p, a, n) = default_rng([seed, p, a, REPLACEMENT_SALT]).integers(n)` until one
  loads (at most MAX_REPLACEMENTS), with the element's augmentation still seeded by (seed, p). Batch
  shapes, order and contents stay a pure function of (seed, step), so a resumed run sees the same
  batches. Each element carries `SKIPPED_KEY` (int32: how many examples were replaced for it); the
  trainer sums it into the `data/skipped` metric (log line, metrics.jsonl, TensorBoard) and each skip
  prints a `warning:` line naming the file.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import numpy as np

from medjax.data.errors import DataError
from medjax.errors import MedjaxInputError

POLICIES = ("error", "skip")
SKIPPED_KEY = "skipped_examples"
REPLACEMENT_SALT = 0x5B1D
MAX_REPLACEMENTS = 32


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"on_bad_example={policy!r}: expected one of {', '.join(POLICIES)} (config data.on_bad_example)")
    return policy


def describe(source: Any, index: int) -> str:
    """The source's own description of example `index` (its file and manifest line), else the index."""
    describe_fn = getattr(source, "describe", None)
    if describe_fn is not None:
        try:
            return str(describe_fn(index))
        except Exception:  # noqa: BLE001 - a description must never hide the real error
            pass
    return f"example {index} of {type(source).__name__}"


def replacement_index(seed: int, position: int, attempt: int, size: int) -> int:
    """The source index tried at `attempt` (>= 1) for stream `position` (module docstring)."""
    return int(np.random.default_rng([seed, position, attempt, REPLACEMENT_SALT]).integers(size))


def load_naming_the_file(source: Any, index: int, load: Callable[[Any], Any]) -> Any:
    """load(source[index]); a non-input error becomes a DataError naming the example's file."""
    try:
        return load(source[index])
    except MedjaxInputError:
        raise
    except Exception as error:  # noqa: BLE001 - any reader or transform failure gets the file named
        raise DataError(f"{describe(source, index)}: {type(error).__name__}: {error}") from error


def load_or_replace(source: Any, index: int, position: int, seed: int, load: Callable[[Any], dict]) -> dict:
    """With on_bad_example=skip: the example at `index`, or its deterministic replacement, with SKIPPED_KEY."""
    for attempt in range(MAX_REPLACEMENTS + 1):
        candidate = index if attempt == 0 else replacement_index(seed, position, attempt, len(source))
        try:
            example = load_naming_the_file(source, candidate, load)
        except MedjaxInputError as error:
            print(f"warning: data.on_bad_example=skip: skipping {error}", file=sys.stderr, flush=True)
            continue
        return dict(example, **{SKIPPED_KEY: np.int32(attempt)})
    raise DataError(f"{describe(source, index)}: it and {MAX_REPLACEMENTS} replacement examples all failed to load "
                    "(data.on_bad_example=skip): most of the data set is unreadable; check the data.verify output")
