"""Shared helpers for the config dataclasses: strict construction from dicts and YAML, the keys set
away from their defaults."""

from __future__ import annotations

import dataclasses
from typing import Any, Type, TypeVar

import yaml

T = TypeVar("T")


def from_dict(cls: Type[T], data: Any, section: str) -> T:
    """Build dataclass ``cls`` from a mapping; an unknown key is an error that names it."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{section} must be a mapping of keys to values, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
            f"valid keys are: {', '.join(sorted(known))}"
        )
    return cls(**data)


def load_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ValueError(f"config file {path!r} does not exist") from None
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path!r} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path!r} must hold a mapping at its top level")
    return data


def field_default(f: dataclasses.Field):
    """A dataclass field's default value, or ``dataclasses.MISSING`` where it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def without_defaults(value):
    """A nested value (a task list, say) as plain data with every field left at its default dropped:
    what was set. The checkpoint fingerprint hashes it, so that a field a later version adds (with a
    default) does not change the hash of the runs saved before it; the model card lists it."""
    if dataclasses.is_dataclass(value):
        return {f.name: without_defaults(getattr(value, f.name)) for f in dataclasses.fields(value)
                if getattr(value, f.name) != field_default(f)}
    if isinstance(value, (list, tuple)):
        return [without_defaults(v) for v in value]
    if isinstance(value, dict):
        return {k: without_defaults(v) for k, v in value.items()}
    return value
