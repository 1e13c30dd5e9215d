"""Credentials: who is calling, and may they.

Three kinds of bearer token (docs/api.md, "Credentials"; the format's owner
is ferry/tokens.py):

* admin: the app setting ``FERRY_ADMIN_KEY``; may only create tenants.
* operator: ``op.<tenant>.<secret>``; everything within its tenant.
* component: ``c.<tenant>.<component_id>.<secret>``; only its own objects.

Secrets are 32 random bytes (urlsafe base64).  Only the SHA-256 of a whole
token is stored, and comparisons are constant-time.  A token is never
logged and never appears in an answer other than the one that issues it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from typing import Any

from ferry import tokens
from ferry.tokens import MAX_LENGTH as MAX_TOKEN
from ferry.tokens import component_token, operator_token
from functions.core.context import Context
from functions.core.errors import Forbidden, Unauthorized
from functions.core.store import TENANTS_PARTITION

__all__ = ["MAX_TOKEN", "Caller", "component_token", "digest", "operator_token"]


@dataclasses.dataclass(frozen=True)
class Caller:
    """An authenticated caller."""

    kind: str
    """``admin``, ``operator`` or ``component``."""
    tenant: str = ""
    """Empty for the admin."""
    component_id: str = ""
    """Empty but for a component, as is ``component_kind``."""
    component_kind: str = ""
    record: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The component's record, as read when authenticating (empty but for a component)."""


def digest(token: str) -> str:
    """SHA-256 of a token or passphrase, hex; what the tables keep instead of it."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _same(stored: str | None, presented: str) -> bool:
    if not stored:
        return False
    return hmac.compare_digest(stored, digest(presented))


def bearer(header: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header; Unauthorized if absent."""
    if not header or not header.strip():
        raise Unauthorized("missing Authorization header; send 'Authorization: Bearer <token>'")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("the Authorization header must be 'Bearer <token>'")
    if len(token) > MAX_TOKEN or not token.isascii() or not token.isprintable():
        raise Unauthorized("the bearer token is malformed")
    return token


def authenticate(ctx: Context, header: str | None) -> Caller:
    """The caller behind an Authorization header; Unauthorized if it is not a valid credential."""
    token = bearer(header)
    if ctx.admin_key_sha256 is not None and hmac.compare_digest(
        ctx.admin_key_sha256, hashlib.sha256(token.encode()).digest()
    ):
        return Caller("admin")
    claim = tokens.claim(token)
    if claim is None:
        raise Unauthorized("unknown credential")
    if claim.component_id is None:
        return _operator(ctx, claim.tenant, token)
    return _component(ctx, claim.tenant, claim.component_id, token)


def _operator(ctx: Context, tenant: str, token: str) -> Caller:
    record = ctx.store.get("tenants", TENANTS_PARTITION, tenant)
    if record is None or not _same(record.get("operator_token_sha256"), token):
        raise Unauthorized("unknown or revoked credential")
    return Caller("operator", tenant)


def _component(ctx: Context, tenant: str, component_id: str, token: str) -> Caller:
    record = ctx.store.get("components", tenant, component_id)
    if record is None:
        raise Unauthorized("unknown or revoked credential")
    if any(_same(h, token) for h in record.get("next_tokens_sha256", [])):
        record = _promote(ctx, tenant, component_id, token)
    elif not _same(record.get("token_sha256"), token):
        raise Unauthorized("unknown or revoked credential")
    return Caller("component", tenant, component_id, record["kind"], record)


def _promote(ctx: Context, tenant: str, component_id: str, token: str) -> dict[str, Any]:
    """First use of a rotated token: it becomes the token, and the old one stops working."""

    def change(record: dict[str, Any]) -> dict[str, Any] | None:
        if not any(_same(h, token) for h in record.get("next_tokens_sha256", [])):
            return None
        record["token_sha256"] = digest(token)
        record["next_tokens_sha256"] = []
        return record

    return ctx.store.mutate("components", tenant, component_id, change)


def require_admin(caller: Caller) -> None:
    """Only the admin key passes."""
    if caller.kind != "admin":
        raise Forbidden("only the admin key may do this")


def require_operator(caller: Caller, tenant: str) -> None:
    """Only an operator of ``tenant`` passes."""
    if caller.kind != "operator":
        raise Forbidden(f"this needs an operator token; {caller.kind} credentials may not use it")
    if caller.tenant != tenant:
        raise Forbidden(
            f"the operator token of tenant {caller.tenant} may not act on another tenant"
        )


def require_component(caller: Caller, *kinds: str) -> None:
    """Only a registered component (of one of ``kinds``, when given) passes."""
    if caller.kind != "component":
        raise Forbidden(
            f"this is for registered components (Bearer c.<tenant>.<id>.<secret>); "
            f"{caller.kind} credentials may not use it"
        )
    if kinds and caller.component_kind not in kinds:
        raise Forbidden(f"a {caller.component_kind} may not do this (only {' or '.join(kinds)})")
