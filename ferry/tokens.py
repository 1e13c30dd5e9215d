"""The configuration server's bearer tokens: how they are made, read and scrubbed.

Issued by the configuration server (functions/core/auth.py, tenants.py,
commands.py), read back there when a caller authenticates, and by the
``ferry`` CLI to find an operator's tenant; all through this module
(docs/api.md, "Credentials")::

    op.<tenant>.<secret>                 an operator: everything within its tenant
    c.<tenant>.<component_id>.<secret>   a component: only its own objects

Tenant and component ids match :data:`ferry.naming.ID_RE` (no dots), and the
secret is 32 random bytes in urlsafe base64 (no dots, no padding), so a
token splits on dots unambiguously.  The third kind, the admin key, is an
app setting of any shape and is not made here.  What a token's shape tells
is only who it claims to be: whether it is valid is decided by the server,
from the SHA-256 it keeps.
"""

from __future__ import annotations

import dataclasses
import re
import secrets

from ferry.naming import ID_RE

OPERATOR = "op"
"""First field of an operator token."""

COMPONENT = "c"
"""First field of a component token."""

SECRET_BYTES = 32
"""Random bytes in a token's secret."""

MAX_LENGTH = 512
"""Longest bearer token looked at, in characters."""

_REDACTIONS = [
    (re.compile(r"\bop\.([a-z0-9-]+)\.[A-Za-z0-9_-]{16,}"), r"op.\1.<redacted>"),
    (re.compile(r"\bc\.([a-z0-9-]+)\.([a-z0-9-]+)\.[A-Za-z0-9_-]{16,}"), r"c.\1.\2.<redacted>"),
]


@dataclasses.dataclass(frozen=True)
class Claim:
    """Who a token says it belongs to (not yet checked against the server's records)."""

    kind: str
    """``operator`` or ``component``."""
    tenant: str
    component_id: str | None = None


def new_secret() -> str:
    """A token's secret: ``SECRET_BYTES`` random bytes, urlsafe base64 (no padding, no dots)."""
    return secrets.token_urlsafe(SECRET_BYTES)


def operator_token(tenant: str) -> str:
    """A new operator token for ``tenant``."""
    return f"{OPERATOR}.{tenant}.{new_secret()}"


def component_token(tenant: str, component_id: str) -> str:
    """A new token for component ``component_id`` of ``tenant``."""
    return f"{COMPONENT}.{tenant}.{component_id}.{new_secret()}"


def claim(token: str) -> Claim | None:
    """Who ``token`` claims to be, from its shape; None if it is neither kind."""
    parts = token.split(".")
    if parts[0] == OPERATOR and len(parts) == 3 and ID_RE.match(parts[1]):
        return Claim("operator", parts[1])
    if parts[0] == COMPONENT and len(parts) == 4 and all(ID_RE.match(p) for p in parts[1:3]):
        return Claim("component", parts[1], parts[2])
    return None


def redact(text: str) -> str:
    """``text`` with the secret of every operator or component token replaced by ``<redacted>``."""
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text
