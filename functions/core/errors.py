"""Errors the API answers with: each carries its HTTP status and one line naming the problem.

Every refusal is an :class:`ApiError`; its message is what the caller reads in
``{"error": ...}``, so it names the problem and never carries a secret.
"""

from __future__ import annotations


class ApiError(Exception):
    """A refusal answered as ``{"error": message}`` with ``status``."""

    status = 400

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ApiError):
    """The request is malformed: a body, a field, a parameter."""

    status = 400


class Unauthorized(ApiError):
    """No credential, or one that is malformed, unknown, revoked or expired."""

    status = 401

    def __init__(self, message: str) -> None:
        super().__init__(message, {"WWW-Authenticate": 'Bearer realm="ferry"'})


class Forbidden(ApiError):
    """A valid credential that may not do this."""

    status = 403


class NotFound(ApiError):
    """No such object in the caller's tenant (or not one of the caller's own)."""

    status = 404


class MethodNotAllowed(ApiError):
    """The route exists but not with this method."""

    status = 405


class Conflict(ApiError):
    """The request clashes with the current state."""

    status = 409


class TooLarge(ApiError):
    """The body is over the limit."""

    status = 413


class TooManyGuesses(ApiError):
    """Too many wrong passphrases for a tenant, or wrong credentials from one address."""

    status = 429


class Unavailable(ApiError):
    """The server cannot serve now: not configured, or storage keeps conflicting or failing."""

    status = 503
