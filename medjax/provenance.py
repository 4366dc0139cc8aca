"""What a checkpoint or params directory holds: the experiment, variant, task and model config that wrote it
(`medjax_provenance.json` beside the saved tree), so that `evaluate` and `predict` given params of another
experiment or variant fail naming the file and what was expected instead of a flax scope error (issue #15).

A record is written by every training checkpoint (`Checkpointer`) and every `save_params` call
(`python -m medjax.convert` records the converter and its source instead of an experiment). Directories
saved before records existed still load, with a warning.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any

from medjax.errors import MedjaxInputError

PROVENANCE = "medjax_provenance.json"


class ProvenanceError(MedjaxInputError):
    """Params were written by another experiment, variant or task than the one asked for."""


def run_record(config) -> dict[str, Any]:
    """The record of a run of `config`: experiment name, variant, task and the `model` block."""
    model = config.get("model")
    return {"exp": config.get("exp"), "variant": config.get("variant"), "task": config.get("task"),
            "model": model.to_dict() if hasattr(model, "to_dict") else model}


def write_record(directory: str, record: dict[str, Any]) -> str:
    path = os.path.join(directory, PROVENANCE)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1, sort_keys=True, default=str)
    os.replace(path + ".tmp", path)
    return path


def read_record(directory: str) -> dict[str, Any] | None:
    """The record in `directory`, or None when it has none (saved by an older medjax)."""
    path = os.path.join(directory, PROVENANCE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise ProvenanceError(f"{path}: unreadable provenance record ({err}); expected JSON written by medjax") from err


def describe(record: dict[str, Any] | None) -> str:
    if record is None:
        return "no provenance record"
    if record.get("exp"):
        return f"experiment {record['exp']!r} variant {record.get('variant')!r} (task {record.get('task')!r})"
    return f"{record.get('converted_by', 'an unnamed writer')} from {record.get('source', '?')}"


def model_differences(saved: dict | None, expected: dict | None, limit: int = 6) -> list[str]:
    """`key: saved vs expected` for the model-config fields that differ (nested keys dotted)."""
    out: list[str] = []

    def walk(a, b, prefix):
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{prefix}{key}.")
        elif a != b:
            out.append(f"model.{prefix[:-1]}: {a!r} saved vs {b!r} expected")

    walk(saved or {}, expected or {}, "")
    return out[:limit]


def check_record(directory: str, config, *, what: str) -> dict[str, Any] | None:
    """Refuse params in `directory` that a training run of another task wrote; warn when there is no record.
    `what` names the flag the directory came from (e.g. "--checkpoint"). Returns the record."""
    record = read_record(directory)
    if record is None:
        warnings.warn(f"{what} {directory}: no {PROVENANCE} (saved before medjax recorded provenance); cannot "
                      f"check that it holds params of experiment {config.get('exp')!r} variant "
                      f"{config.get('variant')!r}", stacklevel=2)
        return None
    if record.get("task") and record["task"] != config.get("task"):
        raise ProvenanceError(
            f"{what} {os.path.join(directory, PROVENANCE)}: params of {describe(record)}; --exp "
            f"{config.get('exp')} expects params of task {config.get('task')!r} (pass the matching --exp)")
    return record


def mismatch_error(directory: str, record: dict | None, config, detail: str, *, what: str) -> ProvenanceError:
    """The error for params whose tree does not fit the model `config` builds: the file, what wrote it,
    what was expected and the differing model fields."""
    expected = f"experiment {config.get('exp')!r} variant {config.get('variant')!r}"
    diffs = model_differences(record.get("model"), run_record(config)["model"]) if record and record.get("exp") else []
    hint = f" (pass --variant {record['variant']})" if record and record.get("exp") == config.get("exp") and \
        record.get("variant") != config.get("variant") else ""
    return ProvenanceError(
        f"{what} {directory}: holds params of {describe(record)} that do not fit {expected}{hint}: {detail}"
        + (f"; model config differs: {', '.join(diffs)}" if diffs else ""))


def tree_differences(saved: Any, expected: Any, limit: int = 4) -> list[str]:
    """Paths (a/b/c) whose presence or shape differs between two param trees of arrays/ShapeDtypeStructs."""
    from medjax.params import path_string
    import jax

    def shapes(tree):
        return {path_string(p): tuple(getattr(x, "shape", ())) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    a, b = shapes(saved), shapes(expected)
    out = [f"{k} missing" for k in sorted(set(b) - set(a))] + [f"{k} unexpected" for k in sorted(set(a) - set(b))]
    out += [f"{k} shape {a[k]} vs {b[k]} expected" for k in sorted(set(a) & set(b)) if a[k] != b[k]]
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])
