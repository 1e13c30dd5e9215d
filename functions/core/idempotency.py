"""Idempotency keys: the same request asked twice has the effect of asking once.

A key is claimed once per tenant (table ``idempotency``, RowKey = the key)
together with the operation it names; the ids the operation creates are
derived from the key (:func:`derived_id`), so a retry after a crash finds
and finishes the same job or command instead of making a second one.  A key
reused for a different operation is refused (409).
"""

from __future__ import annotations

import hashlib
from typing import Any

from functions.core.context import Context
from functions.core.errors import Conflict


def derived_id(prefix: str, tenant: str, key: str) -> str:
    """A stable id (``<prefix>-<24 hex>``) for what idempotency key ``key`` creates."""
    return f"{prefix}-{hashlib.sha256(f'{tenant}|{key}'.encode()).hexdigest()[:24]}"


def claim(ctx: Context, tenant: str, key: str, operation: str, result: dict[str, Any]) -> None:
    """Bind ``key`` to ``operation``; Conflict if it is already bound to another one."""
    record = {"operation": operation, "result": result, "created_at": ctx.now()}
    if ctx.store.create("idempotency", tenant, key, record):
        return
    existing = ctx.store.get("idempotency", tenant, key) or record
    if existing.get("operation") != operation:
        raise Conflict(
            f"idempotency key {key!r} was already used for another request "
            f"({existing.get('operation')}); use a new key"
        )
