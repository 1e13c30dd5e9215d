"""Typed settings files (TOML) for the daemons.

Each component declares its settings as a dataclass whose fields carry a type
and a default (taken from the component's ``defaults`` module).  ``load``
reads a TOML file, rejects unknown keys, checks every type and range, and
raises one :class:`ConfigError` naming the file, the key and the problem.
The configuration server hands out the same shapes as JSON (server mode:
ferry/control/settingsource.py), so ``from_mapping`` is the real entry point
and files are only one source.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ferry.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def load(path: str | Path, schema: type[T]) -> T:
    """Parse the TOML file at ``path`` into ``schema``; ConfigError on any problem."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(path=path, problem="file not found")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path=path, problem=str(exc))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path=path, problem=f"not valid TOML ({exc})")
    return from_mapping(raw, schema, source=str(path))


def from_mapping(raw: dict[str, Any], schema: type[T], source: str = "<settings>") -> T:
    """Build ``schema`` from a plain mapping, validating every key."""
    return _build(raw, schema, source, prefix="")


def _build(raw: Any, schema: type[T], source: str, prefix: str) -> T:
    if not isinstance(raw, dict):
        raise ConfigError(path=source, problem=f"{prefix or 'top level'} must be a table")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            path=source,
            problem=f"unknown key {prefix}{unknown[0]!s} (known: {', '.join(sorted(fields))})",
        )
    values = {}
    for name, field in fields.items():
        key = f"{prefix}{name}"
        if name in raw:
            values[name] = _coerce(raw[name], hints[name], source, key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(path=source, problem=f"missing required key {key}")
    obj = schema(**values)
    check = getattr(obj, "validate", None)
    if check is not None:
        problem = check()
        if problem:
            raise ConfigError(path=source, problem=problem)
    return obj


def _coerce(value: Any, hint: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, options[0], source, key)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(path=source, problem=f"{key} must be a list")
        return [_coerce(v, item, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_type, item = typing.get_args(hint)
        if not isinstance(value, dict) or not all(isinstance(k, key_type) for k in value):
            raise ConfigError(path=source, problem=f"{key} must be a table")
        return {k: _coerce(v, item, source, f"{key}.{k}") for k, v in value.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(value, hint, source, prefix=f"{key}.")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(path=source, problem=f"{key} must be true or false, not {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path=source, problem=f"{key} must be an integer, not {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(path=source, problem=f"{key} must be a number, not {value!r}")
        return float(value)
    if hint in (str, Path):
        if not isinstance(value, str) or not value:
            raise ConfigError(path=source, problem=f"{key} must be a non-empty string")
        return hint(value)
    raise ConfigError(path=source, problem=f"{key} has an unsupported type")


def positive(**values: float) -> str | None:
    """Return a problem line for the first value that is not > 0, else None."""
    for key, value in values.items():
        if value is not None and value <= 0:
            return f"{key} must be greater than 0, not {value}"
    return None
