"""The one way every medjax CLI reports bad input (issue #15: refused up front, in one line).

    @entry_point
    def main(argv=None) -> int: ...

A `medjax.errors.MedjaxInputError` (a data file, a config value) raised by `main` - directly, as the
cause of another exception (`raise ... from error`), or re-raised from a Grain worker thread - is printed as one line
`error: FILE: line N: field F: what was expected` on stderr and `main` returns `EXIT_INPUT_ERROR` (2)
instead of printing a traceback. `MEDJAX_DEBUG=1` re-raises it (the whole traceback). Other exceptions
propagate unchanged. In a multi-process run the process exits at once with status 2 (the others would
otherwise wait for it in a collective until the heartbeat timeout).
"""
from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

from medjax.errors import MedjaxInputError

EXIT_INPUT_ERROR = 2
DEBUG_VARIABLE = "MEDJAX_DEBUG"


def debug_enabled() -> bool:
    """MEDJAX_DEBUG set to anything but "", "0", "false", "no": input errors keep their traceback."""
    return os.environ.get(DEBUG_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def find_input_error(error: BaseException) -> MedjaxInputError | None:
    """`error` itself or the first MedjaxInputError in its chain of causes (`raise X from input_error`), else
    None. Implicit contexts are not followed: an exception raised while handling an input error is a bug of
    its own and keeps its traceback."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, MedjaxInputError):
            return error
        seen.add(id(error))
        error = error.__cause__
    return None


def error_line(error: BaseException) -> str:
    """`error: <message>` on one line (a multi-line message is joined with spaces)."""
    return "error: " + " ".join(part.strip() for part in str(error).splitlines() if part.strip())


def report_input_errors(fn: Callable[..., int], *args: Any, **kwargs: Any) -> int:
    """fn(*args, **kwargs), or EXIT_INPUT_ERROR after printing the one-line input error it raised."""
    try:
        return fn(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - only input errors are caught, the rest re-raised
        found = find_input_error(error)
        if found is None or debug_enabled():
            raise
        print(error_line(found), file=sys.stderr, flush=True)
        if _process_count() > 1:
            sys.stdout.flush()
            os._exit(EXIT_INPUT_ERROR)
        return EXIT_INPUT_ERROR


def entry_point(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate a CLI's `main(argv=None) -> int` with `report_input_errors` (same signature)."""

    @functools.wraps(main)
    def wrapper(argv=None) -> int:
        return report_input_errors(main, argv)

    return wrapper


def _process_count() -> int:
    """jax.process_count() when jax is already imported and initialised, else 1 (never imports jax)."""
    jax = sys.modules.get("jax")
    if jax is None:
        return 1
    try:
        return int(jax.process_count())
    except Exception:  # noqa: BLE001 - an uninitialised backend counts as one process
        return 1
