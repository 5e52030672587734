"""Shared helpers for the config dataclasses: strict construction from dicts and YAML, the keys set
away from their defaults."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
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
    data = _parse_file(path, "config file", yaml.safe_load, yaml.YAMLError, "valid YAML")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path!r} must hold a mapping at its top level")
    return data


def load_json(path: str, what: str = "file") -> Any:
    """The JSON value in ``path``; a file that cannot be read or parsed is a ValueError naming it."""
    return _parse_file(path, what, json.load, json.JSONDecodeError, "valid JSON")


def load_hf_config_dict(path: str, what: str = "--model-config") -> dict:
    """A Hugging Face ``config.json`` (the file, or a directory holding one) as a dict; a path that
    is neither, or JSON without ``model_type``, is a ValueError naming ``what`` and the file."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path!r} is neither a config.json file nor a directory holding one")
    data = load_json(path, what)
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"{what} {path}: no 'model_type' key; is it a Hugging Face config.json?")
    return data


def read_text(path: str, what: str = "file") -> str:
    """The UTF-8 text of ``path``; a directory, a missing file or other bytes name the file."""
    return _parse_file(path, what, lambda f: f.read(), (), "")


def _parse_file(path: str, what: str, parse, parse_errors, kind: str):
    """Open ``path`` as UTF-8 and parse it, turning every way a user's file can be wrong into one
    ValueError that names the file and the fix (a traceback would not say which argument was wrong)."""
    try:
        with open(path, encoding="utf-8") as f:
            return parse(f)
    except FileNotFoundError:
        raise ValueError(f"{what} {path!r} does not exist") from None
    except IsADirectoryError:
        examples = sorted(glob.glob(os.path.join(path, "*.yaml")) + glob.glob(os.path.join(path, "*.json")))[:3]
        hint = f" (e.g. {', '.join(examples)})" if examples else ""
        raise ValueError(f"{what} {path!r} is a directory: give the file itself{hint}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path!r} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                         f"{err.start}): save it as UTF-8") from None
    except OSError as err:
        raise ValueError(f"{what} {path!r} cannot be read: {err.strerror}") from None
    except parse_errors as err:
        raise ValueError(f"{what} {path!r} is not {kind}: {_parse_message(err)}") from None


def _parse_message(err: Exception) -> str:
    if isinstance(err, json.JSONDecodeError):
        return f"{err.msg} at line {err.lineno} column {err.colno}"
    return " ".join(str(err).split())


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
