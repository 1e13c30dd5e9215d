"""What a registered component asks about itself: its record, settings, storage grants.

Storage grants are SAS tokens scoped to exactly what the component needs
(docs/api.md, ``GET /components/self/storage``):

* every component: its command queue (read, process, update);
* process server, for each disk assigned to it: the disk's segments
  container (create, write), its control container (read) and its queue (add);
* master target, for each disk assigned to it: the disk's segments
  container (read, delete), its control container (read, add, create, write,
  delete: it holds the lease and writes state and answers), its queue (read,
  process, update) and poison queue (add).

Containers and queues are per disk (``ferry.naming``), so no grant reaches
the data of a disk the component does not serve, of its own tenant or
another (issue #10, finding 8: a container SAS cannot be narrowed to a name
prefix, hence one container per disk).  An agent gets no container at all.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from azure.storage.blob import ContainerSasPermissions
from azure.storage.queue import QueueSasPermissions

from ferry import naming
from functions.core import defaults, tenants, validate
from functions.core.auth import Caller, require_component
from functions.core.context import Context
from functions.core.errors import BadRequest, Conflict
from functions.core.tenants import parse_address

PRIVATE_FIELDS = ("token_sha256", "next_tokens_sha256")
"""Fields of a component record never handed out."""


def public(record: dict[str, Any]) -> dict[str, Any]:
    """A component record without its secrets' digests."""
    return {k: v for k, v in record.items() if k not in PRIVATE_FIELDS}


def assigned_disks(ctx: Context, caller: Caller) -> list[dict[str, Any]]:
    """The disk records a component works on (its machine's, or those assigned to it)."""
    disks = ctx.store.partition("disks", caller.tenant)
    if caller.component_kind == "agent":
        machine = caller.record.get("name")
        return [d for d in disks if d.get("machine") == machine]
    field = "process_server" if caller.component_kind == "process-server" else "master_target"
    return [d for d in disks if d.get(field) == caller.component_id]


def self_record(ctx: Context, caller: Caller, _body: Any = None) -> dict[str, Any]:
    """The caller's own component record, with the ids of its disks."""
    require_component(caller)
    record = public(caller.record)
    record["disks"] = sorted(d["disk"] for d in assigned_disks(ctx, caller))
    return record


# -- storage grants ------------------------------------------------------------------------


def _container_perm(letters: str) -> str:
    return str(ContainerSasPermissions.from_string(letters))


def _queue_perm(letters: str) -> str:
    return str(QueueSasPermissions.from_string(letters))


def grants(ctx: Context, caller: Caller) -> tuple[dict[str, str], dict[str, str]]:
    """(container → permission letters, queue → permission letters) for the caller."""
    containers: dict[str, str] = {}
    queues = {naming.command_queue(caller.tenant, caller.component_id): "rup"}
    kind = caller.component_kind
    if kind not in ("process-server", "master-target"):
        return containers, queues
    tenant = caller.tenant
    for disk in (d["disk"] for d in assigned_disks(ctx, caller)):
        segments, control = (naming.segments_container(tenant, disk),
                             naming.control_container(tenant, disk))  # fmt: skip
        queue = naming.disk_queue(tenant, disk)
        if kind == "process-server":
            containers.update({segments: "cw", control: "r"})
            queues[queue] = "a"
        else:
            containers.update({segments: "rd", control: "racwd"})
            queues.update({queue: "rup", naming.poison_queue(queue): "a"})
    return containers, queues


def storage(ctx: Context, caller: Caller, _body: Any = None) -> dict[str, Any]:
    """SAS tokens for exactly what the caller needs, valid for SAS_LIFETIME seconds."""
    require_component(caller)
    containers, queues = grants(ctx, caller)
    now = ctx.now()
    start = dt.datetime.fromtimestamp(now - defaults.SAS_CLOCK_SKEW, dt.UTC)
    expires = now + defaults.SAS_LIFETIME
    expiry = dt.datetime.fromtimestamp(expires, dt.UTC)
    account = ctx.account
    for container in containers:  # per disk: made when a component first needs them
        account.ensure_container(container)
    for queue in queues:
        account.ensure_queue(queue)
    return {
        "blob_endpoint": account.blob_endpoint,
        "queue_endpoint": account.queue_endpoint,
        "expires_at": expires,
        "containers": {
            name: account.container_sas(name, _container_perm(p), start, expiry)
            for name, p in containers.items()
        },
        "queues": {
            name: account.queue_sas(name, _queue_perm(p), start, expiry)
            for name, p in queues.items()
        },
    }


# -- settings ------------------------------------------------------------------------------


def settings(ctx: Context, caller: Caller, _body: Any = None) -> dict[str, Any]:
    """The daemon's settings as the server knows them, plus ``storage``."""
    require_component(caller)
    kind = caller.component_kind
    if kind == "agent":
        result = _agent_settings(ctx, caller)
    elif kind == "master-target":
        result = _master_target_settings(ctx, caller)
    else:
        result = _process_server_settings(ctx, caller)
    result["storage"] = storage(ctx, caller)
    return result


def _agent_settings(ctx: Context, caller: Caller) -> dict[str, Any]:
    machine_id = caller.record["name"]
    machine = ctx.store.get("machines", caller.tenant, machine_id) or {}
    address = machine.get("process_server_address")
    if not address:
        raise Conflict(
            f"machine {machine_id} is not protected yet (no process server assigned); "
            "an operator must protect it first"
        )
    disks = {d["disk"]: d for d in assigned_disks(ctx, caller)}
    protected = [disks[i] for i in machine.get("protected_disks", []) if i in disks]
    result = dict(machine.get("settings") or {})
    result.update(
        tenant=caller.tenant,
        machine=machine_id,
        process_server=address,
        disks=[{"id": d["disk"], "device": d["device"]} for d in protected],
    )
    return result


def _process_server_settings(ctx: Context, caller: Caller) -> dict[str, Any]:
    """Its listen address, its tenant and each machine's registered disks it may accept."""
    agents: dict[str, list[str]] = {}
    for disk in assigned_disks(ctx, caller):
        agents.setdefault(disk["machine"], []).append(disk["disk"])
    keys = tenants.segment_keys(ctx, caller.tenant)
    result: dict[str, Any] = {
        "tenant": caller.tenant,
        "agents": agents,
        "segment_key": keys[0]["key"],
    }
    if caller.record.get("listen"):
        result["listen"] = caller.record["listen"]
    return result


def _master_target_settings(ctx: Context, caller: Caller) -> dict[str, Any]:
    disks = sorted(assigned_disks(ctx, caller), key=lambda d: d["disk"])
    if not disks:
        raise Conflict(
            f"no disks are assigned to master target {caller.component_id} yet; "
            "an operator must protect a machine first"
        )
    target_dir = (caller.record.get("target_dir") or defaults.TARGET_DIR).rstrip("/")
    return {
        "tenant": caller.tenant,
        "disks": [_disk_target(d, target_dir) for d in disks],
        "segment_keys": [k["key"] for k in tenants.segment_keys(ctx, caller.tenant)],
    }


def _disk_target(disk: dict[str, Any], target_dir: str) -> dict[str, Any]:
    """One disk of a master target's settings: its target as protect configured it, or the
    default image file ``<target_dir>/<disk>.img``; with the source disk's size when known."""
    target = disk.get("target") or {}
    entry: dict[str, Any] = {
        "id": disk["disk"],
        "target": target.get("path") or f"{target_dir}/{disk['disk']}.img",
        "kind": target.get("kind") or "file",
    }
    if isinstance(disk.get("size"), int):
        entry["size"] = disk["size"]
    return entry


def process_server_address(record: dict[str, Any]) -> str | None:
    """The ``host:port`` agents reach a process server at, or None if it is unknown.

    A wildcard listen address (``0.0.0.0``, ``::``) is replaced by the host the
    process server registered with (``host`` as a string, or its
    ``address``/``fqdn``/``hostname`` field).
    """
    listen = record.get("listen")
    parsed = parse_address(listen) if listen else None
    if parsed is None:
        return None
    host, port = parsed
    if host in ("0.0.0.0", "::", "*", ""):
        info = record.get("host")
        if isinstance(info, dict):
            info = info.get("address") or info.get("fqdn") or info.get("hostname")
        if not isinstance(info, str) or not info:
            return None
        host = info
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- heartbeat -----------------------------------------------------------------------------


def heartbeat(ctx: Context, caller: Caller, body: Any) -> None:
    """Record a heartbeat: the component is alive, with its latest status."""
    require_component(caller)
    body = validate.body_object({} if body is None else body, {"status"})
    status = body.get("status")
    if status is not None and not isinstance(status, dict):
        raise BadRequest("status must be an object")
    if status is not None and validate.json_size(status) > defaults.MAX_STATUS:
        raise BadRequest(f"status is larger than {defaults.MAX_STATUS} characters of JSON")
    now = ctx.now()

    def change(record: dict[str, Any]) -> dict[str, Any]:
        record["last_heartbeat"] = now
        record["state"] = "ok"
        if status is not None:
            record["status"] = status
        return record

    ctx.store.mutate("components", caller.tenant, caller.component_id, change)
