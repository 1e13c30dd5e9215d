"""The plumbing every page shares: headers, sessions and their cookie, CSRF, forms, rendering.

Security rules kept here, once:

- Every response carries a Content-Security-Policy that allows only this
  origin's scripts, styles and images (no inline script or style), forbids
  framing, and sends no referrer; pages are never cached.
- The cookie holds only a random session id: ``HttpOnly``, ``Secure``,
  ``SameSite=Strict``, path ``/`` (the ``__Host-`` prefix makes browsers
  insist on all of that).  Browsers accept a Secure cookie over plain http
  only from ``localhost``/``127.0.0.1``: anywhere else the portal is served
  over HTTPS (``--tls-cert``, or App Service's TLS in Azure).
- Every POST must carry the session's CSRF token in its form (``csrf``);
  one that does not is refused with 403 before anything else is looked at.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from portal import defaults
from portal.sessions import Session, Sessions

log = logging.getLogger("ferry.portal")

HERE = Path(__file__).resolve().parent

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "object-src 'none'"
)
"""Content-Security-Policy of every response: this origin only, nothing inline, no framing."""

HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
]

MAX_FORM = 64 * 1024
"""Largest form body accepted, in bytes."""


class SecurityHeaders:
    """ASGI middleware: the headers above on every response; no caching but for static files."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith("/static/")
        secure = scope.get("scheme") == "https"

        async def with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += HEADERS
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                if secure:
                    headers.append((b"strict-transport-security", b"max-age=31536000"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=jinja2.select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


def render(template: str, http_status: int = 200, **context: Any) -> HTMLResponse:
    """A page (or a live fragment) rendered from ``templates/<template>``."""
    return HTMLResponse(templates.get_template(template).render(**context), status_code=http_status)


# -- sessions -----------------------------------------------------------------------------


def session_of(request: Request) -> Session | None:
    """The request's live session, or None."""
    sessions: Sessions = request.app.state.sessions
    return sessions.get(request.cookies.get(defaults.COOKIE))


def set_cookie(response: Response, session: Session) -> Response:
    """Give the browser the session's id (and only that)."""
    response.set_cookie(
        defaults.COOKIE, session.id, max_age=int(defaults.SESSION_MAX_AGE), path="/",
        secure=True, httponly=True, samesite="strict",
    )  # fmt: skip
    return response


def clear_cookie(response: Response) -> Response:
    response.delete_cookie(defaults.COOKIE, path="/", secure=True, httponly=True, samesite="strict")
    return response


def redirect(url: str) -> RedirectResponse:
    """See other: the answer to every successful POST (reloading never posts again)."""
    return RedirectResponse(url, status_code=303)


# -- forms and CSRF -----------------------------------------------------------------------


class Refused(Exception):
    """A request refused before it does anything; rendered as the error page."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


async def form_of(request: Request) -> dict[str, str]:
    """The posted form (``application/x-www-form-urlencoded``), each field's first value."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise Refused(415, "forms are posted as application/x-www-form-urlencoded")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            raise Refused(413, "the form is too large")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=50)
    except (UnicodeDecodeError, ValueError):
        raise Refused(400, "the form could not be read")
    return {name: values[0] for name, values in fields.items()}


async def checked_form(request: Request, session: Session | None) -> dict[str, str]:
    """The posted form once its CSRF token matched the session's; Refused (403) otherwise."""
    form = await form_of(request)
    if session is None or not session.csrf_ok(form.get("csrf")):
        log.warning("refused a form without a valid CSRF token: %s", request.url.path)
        raise Refused(403, "This form has expired or did not come from this portal. "
                           "Reload the page and try again.")  # fmt: skip
    return form


def client_address(request: Request) -> str:
    """Who is signing in, for the rate limit (the peer address)."""
    return request.client.host if request.client else "unknown"


# -- Entra ID through App Service authentication ------------------------------------------


def entra_principal(request: Request) -> tuple[str | None, set[str]]:
    """The signed-in principal's name and its ids, from ``X-MS-CLIENT-PRINCIPAL``.

    App Service authentication sets the header (base64 JSON with ``claims``)
    and removes any the client sent; read it only when the portal runs
    behind it (``FERRY_PORTAL_ENTRA=1``).
    """
    raw = request.headers.get("x-ms-client-principal")
    if not raw:
        return None, set()
    try:
        principal = json.loads(base64.b64decode(raw, validate=False))
        claims = {c["typ"]: c["val"] for c in principal.get("claims", []) if "typ" in c}
    except (ValueError, TypeError, KeyError, AttributeError):
        return None, set()
    name = claims.get(principal.get("name_typ") or "name") or request.headers.get(
        "x-ms-client-principal-name"
    )
    ids = {v for k, v in claims.items() if k in (
        "http://schemas.microsoft.com/identity/claims/objectidentifier", "oid",
        "preferred_username", "email", "name",
    )}  # fmt: skip
    if name:
        ids.add(name)
    return name, ids
