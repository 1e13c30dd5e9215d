"""Checks of request bodies and parameters: each refusal names the field and the problem."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from ferry import naming
from functions.core import defaults
from functions.core.errors import BadRequest

KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
"""Idempotency keys: 1-128 letters, digits, dots, underscores, colons and dashes."""

COMMAND_ID_RE = re.compile(r"^cmd-[a-z0-9]{1,60}$")
"""Command ids as the server makes them."""

JOB_ID_RE = re.compile(r"^job-[a-z0-9]{1,60}$")
"""Job ids as the server makes them."""

TAG_ID_RE = naming.REQUEST_ID_RE
"""Tag ids (``<gen>-<seq>`` from the agent): letters, digits, dots, underscores, dashes."""

_MISSING = object()


def body_object(body: Any, allowed: Iterable[str] | None = None) -> dict[str, Any]:
    """``body`` as a JSON object; with ``allowed``, unknown fields are refused."""
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, not {_kind(body)}")
    if allowed is not None:
        unknown = sorted(set(body) - set(allowed))
        if unknown:
            raise BadRequest(
                f"unknown field {unknown[0]!r} (known: {', '.join(sorted(allowed)) or 'none'})"
            )
    return body


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean", int: "a number", float: "a number", str: "a string",
        list: "an array", dict: "an object",
    }.get(type(value), type(value).__name__)  # fmt: skip


def _string(body: Mapping[str, Any], key: str, required: bool) -> str | None:
    """The string at ``key``; None if absent (BadRequest if required) or null."""
    value = body.get(key, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise BadRequest(f"missing required field {key!r}")
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{key} must be a string, not {_kind(value)}")
    return value


def ident(body: Mapping[str, Any], key: str, kind: str | None = None, required: bool = True):
    """An id field (``ferry.naming.ID_RE``); None if absent and not required."""
    value = _string(body, key, required)
    if value is None:
        return None
    problem = naming.check_id(kind or key, value)
    if problem:
        raise BadRequest(problem)
    return value


def check_route_id(kind: str, value: Any) -> str:
    """A route parameter that must be an id."""
    problem = naming.check_id(kind, value)
    if problem:
        raise BadRequest(problem)
    return value


def pattern(body: Mapping[str, Any], key: str, regex: re.Pattern, what: str, required=True):
    """A string field matching ``regex``; None if absent and not required."""
    value = body.get(key, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise BadRequest(f"missing required field {key!r}")
        return None
    if not isinstance(value, str) or not regex.match(value):
        raise BadRequest(f"{key} must be {what}")
    return value


def integer(body: Mapping[str, Any], key: str, low: int, high: int, default: Any = _MISSING):
    """An integer field within [low, high]; ``default`` if absent (required without one)."""
    value = body.get(key, _MISSING)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise BadRequest(f"missing required field {key!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{key} must be an integer, not {_kind(value)}")
    if not low <= value <= high:
        raise BadRequest(f"{key} must be between {low} and {high}, not {value}")
    return value


def number(body: Mapping[str, Any], key: str, low: float, high: float, default: Any = None):
    """A number field within [low, high]; ``default`` if absent."""
    value = body.get(key, _MISSING)
    if value is _MISSING or value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{key} must be a number, not {_kind(value)}")
    if not low <= value <= high:
        raise BadRequest(f"{key} must be between {low} and {high}, not {value}")
    return value


def text(body: Mapping[str, Any], key: str, required: bool = False, limit: int = defaults.MAX_TEXT):
    """A free-text field of at most ``limit`` characters; None if absent and not required."""
    value = _string(body, key, required)
    if value is None:
        return None
    if not value.strip() and required:
        raise BadRequest(f"{key} must not be empty")
    if len(value) > limit:
        raise BadRequest(f"{key} is longer than {limit} characters")
    return value


def choice(body: Mapping[str, Any], key: str, options: Iterable[str], required: bool = True):
    """A field that must be one of ``options``."""
    options = list(options)
    value = body.get(key, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise BadRequest(f"missing required field {key!r} (one of {', '.join(options)})")
        return None
    if not isinstance(value, str) or value not in options:
        raise BadRequest(f"{key} must be one of {', '.join(options)}, not {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def json_size(value: Any) -> int:
    """Length of ``value`` as compact JSON, in characters."""
    import json

    return len(json.dumps(value, separators=(",", ":")))


def query_param(params: Mapping[str, str], key: str) -> str | None:
    """A query parameter, or None when absent or empty."""
    value = params.get(key)
    return value if value not in (None, "") else None


def query_int(params: Mapping[str, str], key: str, low: int, high: int, default: int) -> int:
    """An integer query parameter within [low, high]."""
    value = query_param(params, key)
    if value is None:
        return default
    if not value.isascii() or not value.isdigit() or len(value) > 9:
        raise BadRequest(f"query parameter {key} must be an integer, not {_short(value)}")
    number_ = int(value)
    if not low <= number_ <= high:
        raise BadRequest(f"query parameter {key} must be between {low} and {high}")
    return number_


def query_number(params: Mapping[str, str], key: str, low: float, high: float) -> float | None:
    """A finite decimal query parameter within [low, high]; None if absent."""
    value = query_param(params, key)
    if value is None:
        return None
    if not value.isascii() or not re.fullmatch(r"[0-9]{1,12}(\.[0-9]{1,9})?", value):
        raise BadRequest(f"query parameter {key} must be a number, not {_short(value)}")
    number_ = float(value)
    if not low <= number_ <= high:
        raise BadRequest(f"query parameter {key} must be between {low:g} and {high:g}")
    return number_


def query_bool(params: Mapping[str, str], key: str) -> bool | None:
    """A boolean query parameter (``true``/``false``), None if absent."""
    value = query_param(params, key)
    if value is None:
        return None
    if value.lower() not in ("true", "false", "1", "0"):
        raise BadRequest(f"query parameter {key} must be true or false, not {_short(value)}")
    return value.lower() in ("true", "1")
