"""The thin layer between Azure Functions HTTP triggers and the plain functions in ``core``.

A decorated function calls :func:`handle` with its request and a plain
function ``action(ctx, caller, body)``; ``handle`` authenticates, parses the
JSON body, runs the action and turns its result or refusal into an
``HttpResponse``.  Refusals are 4xx with ``{"error": "<one line>"}``; a
storage outage is 503; anything else is a bug, logged (scrubbed of secrets)
and answered 500 with a reference to find it in the log.
"""

from __future__ import annotations

import json
import logging
import traceback
import uuid
from collections.abc import Callable
from typing import Any, Literal, overload

import azure.functions as func
from azure.core.exceptions import AzureError

from functions.core import auth, context, defaults
from functions.core.errors import ApiError, BadRequest, TooLarge
from functions.core.redact import redact

log = logging.getLogger("ferry.functions")

Action = Callable[[context.Context, auth.Caller, Any], Any]
"""``action(ctx, caller, body)`` of an authenticated route."""

PublicAction = Callable[[context.Context, None, Any], Any]
"""``action(ctx, None, body)`` of a route anyone may call (``public=True``)."""


def json_response(status: int, payload: Any = None, headers: dict[str, str] | None = None):
    """An HttpResponse carrying ``payload`` as JSON (no body for 204)."""
    if status == 204:
        return func.HttpResponse(status_code=204, headers=headers)
    return func.HttpResponse(
        json.dumps(payload, separators=(",", ":")),
        status_code=status,
        headers=headers,
        mimetype="application/json",
    )


def error_response(exc: ApiError) -> func.HttpResponse:
    """The answer to a refusal."""
    return json_response(exc.status, {"error": exc.message}, exc.headers or None)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


MAX_INT_DIGITS = 19
"""Most digits of an integer in a body (an int64, as Azure Tables and every counter fit)."""

MAX_FLOAT = 1e18
"""Largest magnitude of a number with a fraction or exponent in a body."""


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"the number {text[:24]}... has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _bounded_float(text: str) -> float:
    value = float(text)
    if not abs(value) <= MAX_FLOAT:  # also refuses inf (1e400) and nan
        raise ValueError(f"the number {text[:24]} is not finite or not within ±{MAX_FLOAT:g}")
    return value


def read_json(req: func.HttpRequest) -> Any:
    """The request body parsed as JSON; None when empty; BadRequest naming the problem."""
    raw = req.get_body() or b""
    if len(raw) > defaults.MAX_BODY:
        raise TooLarge(f"the body is larger than {defaults.MAX_BODY} bytes")
    if not raw.strip():
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the body is not UTF-8 text")
    try:
        value = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_int=_bounded_int,
            parse_float=_bounded_float,
        )
    except RecursionError:
        raise BadRequest("the body is nested too deeply")
    except ValueError as exc:
        raise BadRequest(f"the body is not valid JSON: {str(exc).splitlines()[0][:200]}")
    if _depth(value) > MAX_DEPTH:
        raise BadRequest(f"the body is nested deeper than {MAX_DEPTH} levels")
    return value


MAX_DEPTH = 32
"""Deepest nesting of arrays and objects accepted in a body, in levels."""


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest


@overload
def handle(
    req: func.HttpRequest,
    action: Action,
    *,
    status: int = 200,
    public: Literal[False] = False,
    body: bool = False,
) -> func.HttpResponse: ...
@overload
def handle(
    req: func.HttpRequest,
    action: PublicAction,
    *,
    status: int = 200,
    public: Literal[True],
    body: bool = False,
) -> func.HttpResponse: ...
def handle(
    req: func.HttpRequest,
    action: Callable[[context.Context, Any, Any], Any],
    *,
    status: int = 200,
    public: bool = False,
    body: bool = False,
) -> func.HttpResponse:
    """Authenticate (unless ``public``), parse the body (if ``body``), run ``action``, answer.

    ``action`` returns the payload (answered with ``status``), None (204), or
    a ``(status, payload)`` pair when the status depends on the outcome.
    """
    try:
        ctx = context.current()
        caller = None if public else auth.authenticate(ctx, req.headers.get("authorization"))
        payload = read_json(req) if body else None
        result = action(ctx, caller, payload)
        if isinstance(result, tuple):
            return json_response(*result)
        if result is None:
            return json_response(204)
        return json_response(status, result)
    except ApiError as exc:
        return error_response(exc)
    except AzureError as exc:
        log.warning("storage failed during %s %s: %s", req.method, _route(req), type(exc).__name__)
        return json_response(503, {"error": f"storage is unavailable ({type(exc).__name__})"})
    except Exception as exc:  # a bug: log it scrubbed, answer 500 with a reference
        return internal_error(req, exc)


def internal_error(req: func.HttpRequest, exc: BaseException) -> func.HttpResponse:
    """Log an unexpected failure (without secrets) and answer 500 with a reference."""
    reference = uuid.uuid4().hex[:12]
    log.error(
        "bug: %s during %s %s (reference %s)\n%s",
        type(exc).__name__, req.method, _route(req), reference, redact(traceback.format_exc()),
    )  # fmt: skip
    return json_response(500, {"error": f"internal error (reference {reference})"})


def _route(req: func.HttpRequest) -> str:
    """The request's path without its query string (which is never logged)."""
    url = req.url or ""
    path = url.split("?", 1)[0]
    if "://" in path:
        path = "/" + path.split("://", 1)[1].partition("/")[2]
    return path[:200]


def route_param(req: func.HttpRequest, name: str) -> str:
    """A route parameter (always present when the route matched)."""
    return (req.route_params or {}).get(name, "")
