"""An exclusive lock on a training workdir: `<workdir>/medjax.lock` holding the host and pid of the run.

Two runs on one --workdir both crashed inside Orbax (issue #15). The second run now refuses at once, naming
the holder; a stale lock (its pid dead on this host, e.g. after kill -9) is taken over with a warning. In a
multi-process run process 0 holds the lock (the trainer tells the others whether it got it).
"""
from __future__ import annotations

import json
import os
import socket
import time
import warnings

from medjax.parallel.ports import pid_alive

LOCK_NAME = "medjax.lock"


class WorkdirLockedError(RuntimeError):
    """Another live run holds the workdir."""


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


class WorkdirLock:
    """`acquire()` / `release()` (or a `with` block) of `<workdir>/medjax.lock`."""

    def __init__(self, workdir: str):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
        self.held = False

    def acquire(self) -> "WorkdirLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                host, pid = holder.get("host"), holder.get("pid")
                if host == me["host"] and isinstance(pid, int) and not pid_alive(pid):
                    warnings.warn(f"{self.path}: taking over a stale lock of pid {pid} on {host} (that process "
                                  "is gone)", stacklevel=2)
                    try:
                        os.remove(self.path)
                    except FileNotFoundError:
                        pass
                    continue
                raise WorkdirLockedError(
                    f"{os.path.dirname(self.path)} is in use by another run: pid {pid} on host {host} since "
                    f"{holder.get('since', '?')} (lock file {self.path}); wait for it, use another --workdir, or "
                    "delete the lock file if that run is gone") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise WorkdirLockedError(f"{self.path}: could not take the lock (another run took it meanwhile)")

    def release(self) -> None:
        if self.held:
            self.held = False
            if _read(self.path).get("pid") == os.getpid():
                os.remove(self.path)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
