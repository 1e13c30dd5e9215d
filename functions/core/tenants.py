"""Tenants, registration passphrases, and the registration of components.

An operator's passphrase is random, shown once, stored only as its SHA-256,
expires, and is spent by the first registration that presents it (the
``used`` mark is written under ETag concurrency, so two registrations racing
with one passphrase cannot both win).  Wrong guesses are counted per tenant
in the ``guesses`` table; ``GUESS_LIMIT`` of them within ``GUESS_WINDOW``
lock the tenant's registration for ``GUESS_LOCKOUT`` seconds.  The lock is
checked before a passphrase is looked at; guesses already in flight when it
falls are still judged (so at most one extra guess per concurrent request).
"""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any

from ferry import naming
from ferry.naming import KIND_PREFIX
from functions.core import defaults, validate
from functions.core.auth import (
    Caller,
    component_token,
    digest,
    operator_token,
    require_admin,
    require_operator,
)
from functions.core.context import Context
from functions.core.errors import BadRequest, Conflict, TooManyGuesses, Unauthorized
from functions.core.store import TENANTS_PARTITION

MAX_DISKS = 64
"""Most disks one agent may register, a count."""


def iso(when: float) -> str:
    """``when`` (epoch seconds) as ISO 8601 UTC, for messages."""
    return dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- tenants -----------------------------------------------------------------------------


def create_tenant(ctx: Context, caller: Caller, body: Any) -> dict[str, Any]:
    """Create a tenant and return its operator token (shown only here)."""
    require_admin(caller)
    body = validate.body_object(body, {"tenant", "display_name"})
    tenant = validate.ident(body, "tenant")
    display = validate.text(body, "display_name", limit=200) or tenant
    token = operator_token(tenant)
    record = {
        "tenant": tenant,
        "display_name": display,
        "created_at": ctx.now(),
        "operator_token_sha256": digest(token),
    }
    if not ctx.store.create("tenants", TENANTS_PARTITION, tenant, record):
        raise Conflict(f"tenant {tenant} already exists")
    ctx.account.ensure_containers(tenant)
    return {"tenant": tenant, "operator_token": token}


def create_passphrase(ctx: Context, caller: Caller, tenant: str, body: Any) -> dict[str, Any]:
    """A new single-use registration passphrase for ``tenant`` (shown only here)."""
    require_operator(caller, tenant)
    body = validate.body_object({} if body is None else body, {"ttl_seconds"})
    ttl = validate.integer(
        body, "ttl_seconds", defaults.PASSPHRASE_TTL_MIN, defaults.PASSPHRASE_TTL_MAX,
        default=defaults.PASSPHRASE_TTL,
    )  # fmt: skip
    passphrase = secrets.token_urlsafe(24)
    now = ctx.now()
    record = {"created_at": now, "expires_at": now + ttl, "used_at": None, "used_by": None}
    ctx.store.create("passphrases", tenant, digest(passphrase), record)
    return {"passphrase": passphrase, "expires_at": now + ttl}


# -- registration ------------------------------------------------------------------------

REGISTER_FIELDS = {"tenant", "passphrase", "kind", "name", "host", "disks", "target_dir", "listen"}


def register(ctx: Context, body: Any) -> dict[str, Any]:
    """Spend a passphrase: record the component and return its credential (shown only here)."""
    request = _registration(body)
    tenant = request["tenant"]
    _check_not_locked(ctx, tenant)
    key = digest(request["passphrase"])
    _check_passphrase(ctx, tenant, key)
    if request["kind"] == "agent":
        _check_disks_free(ctx, tenant, request["name"], request["disks"])
    component_id = request["component_id"]
    _spend(ctx, tenant, key, component_id)
    token = component_token(tenant, component_id)
    _record_component(ctx, request, token)
    if request["kind"] == "agent":
        _record_machine(ctx, request)
    queue = naming.command_queue(tenant, component_id)
    ctx.account.ensure_queue(queue)
    return {"component_id": component_id, "token": token, "command_queue": queue}


def _registration(body: Any) -> dict[str, Any]:
    body = validate.body_object(body, REGISTER_FIELDS)
    tenant = validate.ident(body, "tenant")
    passphrase = validate.text(body, "passphrase", required=True, limit=200)
    kind = validate.choice(body, "kind", list(KIND_PREFIX))
    name = validate.ident(body, "name", "component name")
    component_id = f"{KIND_PREFIX[kind]}-{name}"
    problem = naming.check_id("component id", component_id)
    if problem:
        raise BadRequest(f"name is too long: {problem}")
    host = body.get("host")
    if host is not None and not isinstance(host, str | dict):
        raise BadRequest("host must be a string or an object")
    if host is not None and validate.json_size(host) > 2000:
        raise BadRequest("host is larger than 2000 characters of JSON")
    request = {
        "tenant": tenant, "passphrase": passphrase, "kind": kind, "name": name,
        "component_id": component_id, "host": host, "disks": [],
        "target_dir": None, "listen": None,
    }  # fmt: skip
    for key, owner in (
        ("disks", "agent"),
        ("target_dir", "master-target"),
        ("listen", "process-server"),
    ):
        if body.get(key) is not None and kind != owner:
            raise BadRequest(f"{key} is only for a {owner}, not a {kind}")
    if kind == "agent":
        request["disks"] = _disks(body.get("disks"))
    if kind == "master-target":
        request["target_dir"] = _target_dir(body)
    if kind == "process-server":
        request["listen"] = _listen(body)
    return request


def _disks(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest("disks must be an array of {id, device, size}")
    if len(value) > MAX_DISKS:
        raise BadRequest(f"disks lists more than {MAX_DISKS} disks")
    disks, seen = [], set()
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise BadRequest(f"disks[{i}] must be an object {{id, device, size}}")
        validate.body_object(item, {"id", "device", "size"})
        disk = validate.ident(item, "id", f"disks[{i}].id")
        device = validate.text(item, "device", required=True, limit=255)
        size = validate.integer(item, "size", 0, 1 << 50, default=None)
        if disk in seen:
            raise BadRequest(f"disks[{i}].id {disk!r} is listed twice")
        seen.add(disk)
        disks.append({"id": disk, "device": device, "size": size})
    return disks


def _target_dir(body: dict[str, Any]) -> str | None:
    value = validate.text(body, "target_dir", limit=255)
    if value is not None and not value.startswith("/"):
        raise BadRequest("target_dir must be an absolute path")
    return value


def parse_address(text: str) -> tuple[str, int] | None:
    """``(host, port)`` from ``host:port`` (``[v6]:port`` too); None if malformed."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        return None
    return host, int(port)


def _listen(body: dict[str, Any]) -> str | None:
    value = validate.text(body, "listen", limit=255)
    if value is not None and parse_address(value) is None:
        raise BadRequest(f"listen must be host:port with a port of 1-65535, not {value!r}")
    return value


def _check_not_locked(ctx: Context, tenant: str) -> None:
    record = ctx.store.get("guesses", tenant, "register") or {}
    until = record.get("locked_until") or 0
    now = ctx.now()
    if until > now:
        wait = int(until - now) + 1
        raise TooManyGuesses(
            f"registration for tenant {tenant} is locked after {defaults.GUESS_LIMIT} wrong "
            f"passphrases; retry in {wait} s",
            {"Retry-After": str(wait)},
        )


def _check_passphrase(ctx: Context, tenant: str, key: str) -> None:
    record = ctx.store.get("passphrases", tenant, key)
    now = ctx.now()
    if record is None:
        _refuse(ctx, tenant, "wrong passphrase")
    elif record.get("used_at"):
        _refuse(ctx, tenant, "this passphrase was already used; ask the operator for a new one")
    elif record["expires_at"] <= now:
        _refuse(
            ctx, tenant,
            f"this passphrase expired at {iso(record['expires_at'])}; ask the operator for a new one",
        )  # fmt: skip


def _refuse(ctx: Context, tenant: str, why: str) -> None:
    """Count one wrong guess (locking the tenant at the limit) and refuse."""
    now = ctx.now()

    def change(record: dict[str, Any]) -> dict[str, Any]:
        failures = [t for t in record.get("failures", []) if t > now - defaults.GUESS_WINDOW]
        failures.append(now)
        record["failures"] = failures[-defaults.GUESS_LIMIT * 4 :]
        if len(failures) >= defaults.GUESS_LIMIT:
            record["locked_until"] = now + defaults.GUESS_LOCKOUT
            record["failures"] = []
        return record

    ctx.store.mutate(
        "guesses", tenant, "register", change, missing=lambda: {"failures": [], "locked_until": 0}
    )
    raise Unauthorized(f"registration refused: {why}")


def _check_disks_free(ctx: Context, tenant: str, machine: str, disks: list[dict]) -> None:
    for disk in disks:
        record = ctx.store.get("disks", tenant, disk["id"])
        if record is not None and record.get("machine") != machine:
            raise Conflict(f"disk {disk['id']} already belongs to machine {record['machine']}")


def _spend(ctx: Context, tenant: str, key: str, component_id: str) -> None:
    """Mark the passphrase used; only one of several racing registrations wins."""
    now = ctx.now()

    def change(record: dict[str, Any]) -> dict[str, Any]:
        if record.get("used_at"):
            raise Unauthorized("registration refused: this passphrase was already used")
        record["used_at"] = now
        record["used_by"] = component_id
        return record

    ctx.store.mutate("passphrases", tenant, key, change, what="passphrase")


def _record_component(ctx: Context, request: dict[str, Any], token: str) -> None:
    now = ctx.now()
    tenant, component_id = request["tenant"], request["component_id"]

    def change(record: dict[str, Any]) -> dict[str, Any]:
        record.update(
            component_id=component_id, kind=request["kind"], name=request["name"],
            tenant=tenant, host=request["host"], listen=request["listen"],
            target_dir=request["target_dir"], registered_at=now,
            token_sha256=digest(token), command_queue=naming.command_queue(tenant, component_id),
        )  # fmt: skip
        record.pop("next_tokens_sha256", None)
        record.setdefault("state", "registered")
        record.setdefault("last_heartbeat", None)
        record.setdefault("status", None)
        return record

    ctx.store.mutate("components", tenant, component_id, change, missing=dict)


def _record_machine(ctx: Context, request: dict[str, Any]) -> None:
    tenant, machine = request["tenant"], request["name"]
    now = ctx.now()

    def change(record: dict[str, Any]) -> dict[str, Any]:
        record.update(
            machine=machine, agent=request["component_id"], host=request["host"],
            disks=[d["id"] for d in request["disks"]], registered_at=now,
        )  # fmt: skip
        record.setdefault("state", "registered")
        record.setdefault("rpo_threshold_s", defaults.RPO_THRESHOLD)
        record.setdefault("settings", {})
        return record

    ctx.store.mutate("machines", tenant, machine, change, missing=dict)
    for disk in request["disks"]:

        def change_disk(record: dict[str, Any], disk=disk) -> dict[str, Any]:
            record.update(
                disk=disk["id"], machine=machine, device=disk["device"], size=disk["size"]
            )
            record.setdefault("state", "registered")
            return record

        ctx.store.mutate("disks", tenant, disk["id"], change_disk, missing=dict)
