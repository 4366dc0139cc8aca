"""Checksums of saved checkpoint files: recorded once a save has finished, verified before a restore.

Orbax writes a step atomically (a temporary directory renamed into place) but does not notice bytes that
change afterwards (a flipped bit, a truncated or emptied file): such a step restored silently and trained on
garbage (issue #15). After a save completes, `record_checksums(step_dir)` writes the SHA-256 and size of every
file under the step to `medjax_checksums.json` inside it; `verify_checksums(step_dir)` says what is wrong with
a step (None when every recorded file is there, with its size and digest).
"""
from __future__ import annotations

import hashlib
import json
import os

CHECKSUMS = "medjax_checksums.json"
_CHUNK = 1 << 20


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(step_dir: str) -> list[str]:
    """Paths relative to `step_dir` of every file under it except the checksum record itself, sorted."""
    found = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel != CHECKSUMS and not rel.endswith(".tmp"):
                found.append(rel)
    return sorted(found)


def record_checksums(step_dir: str) -> int:
    """Write `step_dir/medjax_checksums.json` ({relative path: {"size", "sha256"}}) atomically; returns the
    number of files recorded."""
    files = {rel: {"size": os.path.getsize(os.path.join(step_dir, rel)),
                   "sha256": file_sha256(os.path.join(step_dir, rel))} for rel in _files(step_dir)}
    path = os.path.join(step_dir, CHECKSUMS)
    with open(path + ".tmp", "w") as f:
        json.dump({"algorithm": "sha256", "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    return len(files)


def has_checksums(step_dir: str) -> bool:
    return os.path.isfile(os.path.join(step_dir, CHECKSUMS))


def verify_checksums(step_dir: str) -> str | None:
    """None when every file recorded in `step_dir`'s checksums is present with its size and SHA-256, else
    what is wrong (the first bad files named). A step without a record is not checked here (see
    `has_checksums`)."""
    if not os.path.isdir(step_dir):
        return f"{step_dir} is missing"
    path = os.path.join(step_dir, CHECKSUMS)
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{path}: unreadable checksum record ({err})"
    problems = []
    for rel, expected in sorted(files.items()):
        full = os.path.join(step_dir, rel)
        if not os.path.isfile(full):
            problems.append(f"{rel} is missing")
        elif os.path.getsize(full) != expected["size"]:
            problems.append(f"{rel} has {os.path.getsize(full)} bytes, {expected['size']} were saved")
        elif file_sha256(full) != expected["sha256"]:
            problems.append(f"{rel} does not match its saved SHA-256 (corrupted)")
    if not problems:
        return None
    more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more
