"""Tenants, registration passphrases, and the registration of components.

An operator's passphrase is random, shown once, stored only as its SHA-256,
expires, and is spent by the first registration that presents it (the
``used`` mark is written under ETag concurrency, so two registrations racing
with one passphrase cannot both win).  A passphrase carries 192 random bits:
that, not a lockout, is what defeats guessing.  Wrong guesses are counted per
existing tenant in the ``guesses`` table; past ``GUESS_LIMIT`` within
``GUESS_WINDOW`` further *wrong* guesses are answered 429 (Retry-After) for
``GUESS_LOCKOUT`` seconds, so clients back off; the right passphrase is
looked at first and always registers, so guessing never locks out its holder.
Guesses against a tenant that does not exist write nothing and get the same
answer as a wrong passphrase.

A passphrase may be bound to one component (``kind`` and ``name``): it then
registers only that one.  A component id that is already registered can be
registered again (a host that lost its credentials) only with a passphrase
bound to it, so no passphrase takes over a process server or another host.
The operator token is rotated by ``POST /tenants/{tenant}/operator-token``
(the operator itself, or the admin when it is lost or leaked): the old one
dies at once.
"""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any, NoReturn

from ferry import naming, segment
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
from functions.core.errors import BadRequest, Conflict, Forbidden, TooManyGuesses, Unauthorized
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
        "segment_keys": [_new_segment_key(ctx.now())],
    }
    if not ctx.store.create("tenants", TENANTS_PARTITION, tenant, record):
        raise Conflict(f"tenant {tenant} already exists")
    return {"tenant": tenant, "operator_token": token}


def create_passphrase(ctx: Context, caller: Caller, tenant: str, body: Any) -> dict[str, Any]:
    """A new single-use registration passphrase for ``tenant`` (shown only here)."""
    require_operator(caller, tenant)
    body = validate.body_object({} if body is None else body, {"ttl_seconds", "kind", "name"})
    ttl = validate.integer(
        body, "ttl_seconds", defaults.PASSPHRASE_TTL_MIN, defaults.PASSPHRASE_TTL_MAX,
        default=defaults.PASSPHRASE_TTL,
    )  # fmt: skip
    bound = None
    if body.get("kind") is not None or body.get("name") is not None:
        kind = validate.choice(body, "kind", list(KIND_PREFIX))
        name = validate.ident(body, "name", "component name")
        bound = f"{KIND_PREFIX[kind]}-{name}"
    passphrase = secrets.token_urlsafe(24)
    now = ctx.now()
    record = {"created_at": now, "expires_at": now + ttl, "used_at": None, "used_by": None,
              "for_component": bound}  # fmt: skip
    ctx.store.create("passphrases", tenant, digest(passphrase), record)
    from functions.core import jobs  # jobs imports components, which imports this module

    jobs.record_action(ctx, tenant, "passphrase", f"one-time passphrase made for "
                       f"{bound or 'a new component'}, valid until {iso(now + ttl)}")  # fmt: skip
    answer = {"passphrase": passphrase, "expires_at": now + ttl}
    return answer | ({"for_component": bound} if bound else {})


# -- segment keys --------------------------------------------------------------------------


def _new_segment_key(now: float) -> dict[str, Any]:
    key = secrets.token_bytes(segment.KEY_BYTES)
    return {"id": segment.key_id(key), "key": key.hex(), "created_at": now}


def segment_keys(ctx: Context, tenant: str) -> list[dict[str, Any]]:
    """The tenant's segment keys, newest first (one is made for a tenant that has none).

    The process servers seal with the newest; the master targets hold them
    all, so segments sealed before a rotation still open.
    """
    record = ctx.store.get("tenants", TENANTS_PARTITION, tenant) or {}
    if record.get("segment_keys"):
        return list(record["segment_keys"])
    now = ctx.now()

    def change(r: dict[str, Any]) -> dict[str, Any] | None:
        if r.get("segment_keys"):
            return None
        return {**r, "segment_keys": [_new_segment_key(now)]}

    updated = ctx.store.mutate(
        "tenants", TENANTS_PARTITION, tenant, change, what=f"tenant {tenant}"
    )
    return list(updated["segment_keys"])


def rotate_segment_key(ctx: Context, caller: Caller, tenant: str, _body: Any = None):
    """A new segment key for the tenant; answers its id (never a key) and the ids kept.

    Master targets learn it within a minute and wait for a key they lack, so
    segments in flight are never lost; the oldest beyond SEGMENT_KEYS_KEPT go.
    """
    require_operator(caller, tenant)
    segment_keys(ctx, tenant)
    fresh = _new_segment_key(ctx.now())

    def change(record: dict[str, Any]) -> dict[str, Any]:
        kept = [fresh, *record.get("segment_keys", [])][: defaults.SEGMENT_KEYS_KEPT]
        return {**record, "segment_keys": kept}

    record = ctx.store.mutate("tenants", TENANTS_PARTITION, tenant, change, what=f"tenant {tenant}")
    return {"key_id": fresh["id"], "kept": [k["id"] for k in record["segment_keys"]]}


def rotate_operator_token(ctx: Context, caller: Caller, tenant: str, _body: Any = None):
    """A new operator token for ``tenant`` (shown only here); the old one stops working at once.

    The tenant's operator rotates its own token; the admin key may do it too
    (a lost or leaked token), which revokes the old one.
    """
    if caller.kind != "admin":
        require_operator(caller, tenant)
    validate.check_route_id("tenant", tenant)
    token = operator_token(tenant)

    def change(record: dict[str, Any]) -> dict[str, Any]:
        return {**record, "operator_token_sha256": digest(token), "operator_rotated_at": ctx.now()}

    ctx.store.mutate("tenants", TENANTS_PARTITION, tenant, change, what=f"tenant {tenant}")
    return {"tenant": tenant, "operator_token": token}


# -- registration ------------------------------------------------------------------------

REGISTER_FIELDS = {"tenant", "passphrase", "kind", "name", "host", "disks", "target_dir", "listen"}


def register(ctx: Context, body: Any) -> dict[str, Any]:
    """Spend a passphrase: record the component and return its credential (shown only here)."""
    request = _registration(body)
    tenant = request["tenant"]
    key = digest(request["passphrase"])
    passphrase = _check_passphrase(ctx, tenant, key)
    _check_bound(ctx, tenant, request["component_id"], passphrase)
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
    if value is not None and ".." in value.split("/"):
        raise BadRequest("target_dir must not contain '..'")
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
            f"too many wrong passphrases for tenant {tenant}; wrong ones are refused for "
            f"{wait} s more (a valid passphrase still registers)",
            {"Retry-After": str(wait)},
        )


def _check_passphrase(ctx: Context, tenant: str, key: str) -> dict[str, Any]:
    record = ctx.store.get("passphrases", tenant, key)
    now = ctx.now()
    if record is not None and not record.get("used_at") and record["expires_at"] > now:
        return record  # the holder of a valid passphrase is never throttled
    if ctx.store.get("tenants", TENANTS_PARTITION, tenant) is None:
        raise Unauthorized("registration refused: wrong passphrase")  # and nothing written
    _check_not_locked(ctx, tenant)
    if record is None:
        _refuse(ctx, tenant, "wrong passphrase")
    if record.get("used_at"):
        _refuse(ctx, tenant, "this passphrase was already used; ask the operator for a new one")
    _refuse(
        ctx, tenant,
        f"this passphrase expired at {iso(record['expires_at'])}; ask the operator for a new one",
    )  # fmt: skip


def _check_bound(ctx: Context, tenant: str, component_id: str, passphrase: dict) -> None:
    """A bound passphrase registers its component only; an existing id needs a bound one."""
    bound = passphrase.get("for_component")
    if bound and bound != component_id:
        raise Forbidden(f"this passphrase is for {bound}, not {component_id}")
    if not bound and ctx.store.get("components", tenant, component_id) is not None:
        raise Conflict(
            f"{component_id} is already registered; to register it again, create a "
            f"passphrase for it (kind and name)"
        )


def _refuse(ctx: Context, tenant: str, why: str) -> NoReturn:
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
