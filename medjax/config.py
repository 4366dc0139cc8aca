"""Experiment configs: `experiments/NAME.py:get_config(variant)` plus typed `--set key=value` overrides."""
from __future__ import annotations

import ast
import difflib
import importlib
import pkgutil
from typing import Any, Sequence

import ml_collections

import experiments
from medjax.errors import MedjaxInputError


class ConfigError(MedjaxInputError):
    """A config name, key or value that does not fit the experiment's config."""


def available_experiments() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(experiments.__path__) if not m.name.startswith("_"))


def load_experiment(name: str):
    names = available_experiments()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown experiment {name!r}{hint}; available: {', '.join(names)}")
    return importlib.import_module(f"experiments.{name}")


def get_config(exp: str, variant: str | None = None, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The experiment's config for `variant` (None = the experiment's default) with overrides applied."""
    module = load_experiment(exp)
    config = module.get_config(variant) if variant is not None else module.get_config()
    with config.unlocked():
        config.exp = exp
        config.variant = variant or config.get("variant", "default")
    apply_overrides(config, overrides)
    return config


def run_config(exp: str, saved: dict, variant: str | None = None, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config a training run was trained with, for evaluate / predict / generate: `saved` is its workdir's
    config.json ({} for converted weights). Its variant (unless `variant` is given), its `model` block (so a
    `--set model.depth=2` at training time rebuilds the model that was trained) and its `data.dir`; then
    `overrides`, which win over what was saved."""
    config = get_config(exp, variant or saved.get("variant"))
    with config.unlocked():
        _take_saved(config.get("model"), saved.get("model") or {})
    dir_given = any(o.split("=", 1)[0].strip() == "data.dir" for o in overrides)
    if not dir_given and (saved.get("data") or {}).get("dir") and "data" in config:
        with config.data.unlocked():
            config.data.dir = saved["data"]["dir"]
    apply_overrides(config, overrides)
    return config


def _as_type(value: Any, current: Any) -> Any:
    """A JSON value in the type of the config's current one (lists back to tuples, ints to floats)."""
    def tuples(v):
        return tuple(tuples(x) for x in v) if isinstance(v, list) else v

    if isinstance(current, tuple) and isinstance(value, list):
        return tuples(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _take_saved(node: Any, saved: dict) -> None:
    """Put `saved`'s leaves into the ConfigDict `node` where the key exists and the type agrees (a key renamed
    or retyped since the run keeps the current value)."""
    if not isinstance(node, ml_collections.ConfigDict):
        return
    for key, value in saved.items():
        if key not in node:
            continue
        current = node[key]
        if isinstance(current, ml_collections.ConfigDict):
            if isinstance(value, dict):
                with current.unlocked():
                    _take_saved(current, value)
            continue
        value = _as_type(value, current)
        if value == current or not (current is None or type(value) is type(current)):
            continue
        node[key] = value


def _parse_value(key: str, text: str, current: Any) -> Any:
    """Parse `text` to the type of the key's current value; an error names the key and the type."""
    kind = type(current)
    try:
        if isinstance(current, bool):
            lowered = text.strip().lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ValueError(text)
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return text
        if isinstance(current, (tuple, list)):
            value = ast.literal_eval(text)
            if not isinstance(value, (tuple, list)):
                value = (value,)
            return kind(value)
        if current is None:
            try:
                return ast.literal_eval(text)
            except (ValueError, SyntaxError):
                return text
    except (ValueError, SyntaxError) as err:
        raise ConfigError(f"--set {key}={text}: expected a value of type {kind.__name__}") from err
    raise ConfigError(f"--set {key}: cannot override a value of type {kind.__name__}")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Apply `a.b=v` overrides in place; unknown keys and wrong types raise ConfigError naming the key."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = config
        for depth, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                where = ".".join(parts[:depth]) or "the config"
                options = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                close = difflib.get_close_matches(part, options, n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ConfigError(f"unknown config key {key!r}: {where} has no field {part!r}{hint}")
            if depth < len(parts) - 1:
                node = node[part]
        leaf = parts[-1]
        current = node[leaf]
        if isinstance(current, ml_collections.ConfigDict):
            raise ConfigError(f"config key {key!r} is a group, not a value; set one of its fields")
        with node.unlocked():
            node[leaf] = _parse_value(key, text, current)
