"""Commands to components: one queue per component, ids, at-most-once effect.

A command message is ``{"id", "type", "args", "created_at"}`` (docs/api.md,
"Commands").  The server records each command in the ``commands`` table
with the state each target reported; a command is sent once (the record
says so) and components skip ids they have already run, so a retried
request never runs a command twice.  No credential ever travels through a
queue: ``rotate-credentials`` only says "rotate"; the component then fetches
its new token over HTTPS with its current one (:func:`new_token`,
``POST /components/self/credentials``), and the old token dies at the new
one's first use.
"""

from __future__ import annotations

import uuid
from functools import partial
from typing import Any

from ferry import naming
from functions.core import validate
from functions.core.auth import Caller, component_token, digest, require_component
from functions.core.context import Context
from functions.core.errors import NotFound

TYPES = ("protect", "pause", "resume", "resync", "tag", "drain", "stop", "rotate-credentials",
         "verify", "repair", "resume-replication")  # fmt: skip
"""Every command type."""

PENDING_TOKENS = 4
"""Rotated tokens waiting for their first use, kept per component, a count."""


def new_id() -> str:
    """A fresh command id."""
    return f"cmd-{uuid.uuid4().hex[:24]}"


def issue(
    ctx: Context,
    tenant: str,
    command_id: str,
    kind: str,
    args: dict[str, Any],
    targets: list[str],
    machine: str | None = None,
    job_id: str | None = None,
) -> dict[str, Any]:
    """Record command ``command_id`` and send it to each target's queue, once."""
    now = ctx.now()
    record: dict[str, Any] = {
        "command_id": command_id, "type": kind, "args": args, "machine": machine,
        "job_id": job_id, "created_at": now, "sent": [],
        "targets": {t: {"state": "queued", "detail": None, "at": now} for t in targets},
    }  # fmt: skip
    ctx.store.create("commands", tenant, command_id, record)
    record = ctx.store.get("commands", tenant, command_id) or record
    for target in targets:
        if target in record.get("sent", []):
            continue
        message = {"id": command_id, "type": kind, "args": dict(args), "created_at": now}
        ctx.account.send(naming.command_queue(tenant, target), message)
        record = ctx.store.mutate("commands", tenant, command_id, partial(_sent, target))
    return record


def _sent(target: str, record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with ``target`` among the targets its message was sent to."""
    return {**record, "sent": sorted({*record.get("sent", []), target})}


def new_token(ctx: Context, caller: Caller, _body: Any = None) -> dict[str, Any]:
    """A component asks for a new token with its current one (``POST /components/self/credentials``).

    The new token is valid beside the current one until its first use, when
    the current one stops working: a component that dies before saving the
    new token still holds a working one and asks again.
    """
    require_component(caller)
    tenant, component_id = caller.tenant, caller.component_id
    token = component_token(tenant, component_id)

    def change(record: dict[str, Any]) -> dict[str, Any]:
        pending = [*record.get("next_tokens_sha256", []), digest(token)]
        record["next_tokens_sha256"] = pending[-PENDING_TOKENS:]
        return record

    ctx.store.mutate("components", tenant, component_id, change, what=f"component {component_id}")
    return {"component_id": component_id, "token": token}


def public(record: dict[str, Any]) -> dict[str, Any]:
    """A command record as operators see it."""
    return {k: v for k, v in record.items() if k != "sent"}


def report(ctx: Context, caller: Caller, command_id: str, body: Any) -> dict[str, Any] | None:
    """A component reports the outcome of one of its commands; returns the updated record."""
    require_component(caller)
    if not validate.COMMAND_ID_RE.match(command_id or ""):
        raise NotFound(f"command {command_id[:80]!r} was not sent to {caller.component_id}")
    body = validate.body_object(body, {"state", "detail"})
    state = validate.choice(body, "state", ["done", "failed"])
    detail = validate.text(body, "detail")
    record = ctx.store.get("commands", caller.tenant, command_id)
    if record is None or caller.component_id not in record.get("targets", {}):
        raise NotFound(f"command {command_id} was not sent to {caller.component_id}")
    now = ctx.now()

    def change(r: dict[str, Any]) -> dict[str, Any] | None:
        mine = r["targets"][caller.component_id]
        if mine["state"] == state and mine.get("detail") == detail:
            return None
        r["targets"][caller.component_id] = {"state": state, "detail": detail, "at": now}
        return r

    return ctx.store.mutate("commands", caller.tenant, command_id, change)
