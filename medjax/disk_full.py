"""A full disk during training becomes one line naming the file, the step and the last complete checkpoint
(issue #15: it printed 145-502 tracebacks with "No space left on device")."""
from __future__ import annotations

import errno


class DiskFullError(OSError):
    """No space left on the device holding the workdir; earlier checkpoints are left as they are."""


def disk_full_cause(error: BaseException) -> BaseException | None:
    """The ENOSPC error in `error`'s chain (causes, contexts, and the exceptions Orbax's async saves wrap
    or re-raise by message), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return error
        if "No space left on device" in str(error) or "ENOSPC" in str(error):
            return error
        error = error.__cause__ or error.__context__
    return None


def disk_full_message(cause: BaseException, *, step: int, last_checkpoint: int | None, directory: str) -> str:
    filename = getattr(cause, "filename", None) or "a file under " + directory
    last = (f"the last complete checkpoint is step {last_checkpoint} in {directory}" if last_checkpoint is not None
            else f"no complete checkpoint in {directory}")
    return (f"no space left on device writing {filename} at step {step}; {last} (earlier checkpoints are intact: "
            "free space and rerun with the same --workdir to resume)")
