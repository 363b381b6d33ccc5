"""params.yaml -> typed, frozen dataclasses (`schema`).

An unknown key, a missing one or a value of the wrong type is an error that
names the key and lists what is valid; a typo or a partial file never silently
falls back to another recipe. The type check is written here, not left to
pydantic or dacite: its messages name every missing key of a section, the valid
keys beside an unknown one, and the params file, and it is fifty lines.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from transferlab.config import checks
from transferlab.config.schema import CHOICES, Params
from transferlab.errors import ConfigError


def _check_type(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {item.__name__}, received: {value!r}")
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected int, received: {value!r}")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, received: {value!r}")
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'params'}: expected a mapping, received: {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    where = prefix or "the top level"
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in {where}; valid keys: {names}"
        )
    missing = [name for name in names if name not in raw]
    if missing:
        raise ConfigError(
            f"missing key(s) {missing} in {where}: a params file gives every key (params.yaml is "
            "the one place defaults live; copy the missing ones from the project's params.yaml)"
        )
    values = {}
    for name in names:
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name], key)
            continue
        value = _check_type(raw[name], hint, key)
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"{key}: must be one of {list(CHOICES[key])}, received: {value!r}")
        values[name] = value
    return cls(**values)


def from_dict(raw: dict) -> Params:
    """The typed params of `raw`, each key checked on its own (`checks`); what
    a key means for the model (the backbone's blocks, the budget) is
    `config.pipeline`'s to check."""
    params = _build(Params, raw, "")
    checks.validate(params)
    return params


def load(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such params file; run from the project root or pass --params")
    with path.open() as fh:
        try:
            raw = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def to_dict(params: Params) -> dict:
    return dataclasses.asdict(params)


def subset(params: Params, *keys: str) -> dict:
    """The values of the dotted `keys` ("seed", "finetune", "backbone.name"), nested
    as in params.yaml: what a stage reads, logs and writes beside its outputs. A
    wrapped params object (`__wrapped__`, as tests use to record what a stage
    reads) counts a whole section as read."""
    out: dict = {}
    for key in keys:
        node: Any = params
        for part in key.split("."):
            node = getattr(node, part)
        node = getattr(node, "__wrapped__", node)
        value = dataclasses.asdict(node) if dataclasses.is_dataclass(node) else node
        *parents, leaf = key.split(".")
        target = out
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    return out


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, the shape MLflow params take."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out
