"""Replication state: disk reports, recovery points, status, machines, machine commands."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ferry import naming
from ferry.naming import KIND_PREFIX
from functions.core import commands, defaults, drive, health, idempotency, jobs, validate, verify
from functions.core.auth import Caller, require_component, require_operator
from functions.core.context import Context
from functions.core.errors import BadRequest, Conflict, NotFound

BIG = 1 << 62
"""Upper bound of counters in reports."""

REPORT_INTS = ("gen", "applied_seq", "bytes_to_go", "backlog", "staged", "staged_bytes",
               "bytes_applied")  # fmt: skip
REPORT_NUMBERS = ("throughput", "rpo_s", "applied_at")


def _own_disk(ctx: Context, caller: Caller, disk_id: str) -> dict[str, Any]:
    """The caller's disk record; NotFound if the disk is not one of the caller's."""
    validate.check_route_id("disk", disk_id)
    record = ctx.store.get("disks", caller.tenant, disk_id)
    if record is not None:
        if caller.component_kind == "agent" and record.get("machine") == caller.record.get("name"):
            return record
        if caller.component_kind == "master-target" and (
            record.get("master_target") == caller.component_id
        ):
            return record
    raise NotFound(f"disk {disk_id} is not one of {caller.component_id}'s disks")


def _report(body: Any) -> dict[str, Any]:
    """The known fields of a disk report, checked; other fields are ignored."""
    body = validate.body_object(body)
    report: dict[str, Any] = {}
    phase = validate.text(body, "phase", limit=40)
    if phase is not None:
        report["phase"] = phase
    for key in REPORT_INTS:
        value = validate.integer(body, key, 0, BIG, default=None)
        if value is not None:
            report[key] = value
    for key in REPORT_NUMBERS:
        value = validate.number(body, key, 0, 1e12)
        if value is not None:
            report[key] = value
    if "resync_required_gen" in body:
        report["resync_required_gen"] = validate.integer(
            body, "resync_required_gen", 0, BIG, default=None
        )
    reason = validate.text(body, "reason", limit=200)
    if reason is not None:
        report["reason"] = reason
    if "held" in body:
        if not isinstance(body["held"], bool):
            raise BadRequest("held must be true or false")
        report["held"] = body["held"]
    if "fenced" in body:
        fenced = body["fenced"]
        if fenced is not None and not isinstance(fenced, dict):
            raise BadRequest("fenced must be an object or null")
        if validate.json_size(fenced) > 2000:
            raise BadRequest("fenced is larger than 2000 characters of JSON")
        report["fenced"] = fenced
    if "journal" in body:
        summary = body["journal"]
        if summary is not None and not isinstance(summary, dict):
            raise BadRequest("journal must be an object or null")
        if validate.json_size(summary) > defaults.JOURNAL_REPORT_MAX:
            raise BadRequest(
                f"journal is larger than {defaults.JOURNAL_REPORT_MAX} characters of JSON"
            )
        report["journal"] = summary
    if "verify" in body:
        report["verify"] = verify.checked_report(body["verify"])
    if "last_tag" in body:
        tag = body["last_tag"]
        if tag is not None and not isinstance(tag, dict | str):
            raise BadRequest("last_tag must be an object, a string or null")
        if validate.json_size(tag) > 2000:
            raise BadRequest("last_tag is larger than 2000 characters of JSON")
        report["last_tag"] = tag
    return report


def disk_report(ctx: Context, caller: Caller, disk_id: str, body: Any) -> None:
    """An agent or master target reports one of its disks."""
    require_component(caller, "agent", "master-target")
    _own_disk(ctx, caller, disk_id)
    report = _report(body)
    report["reported_at"] = ctx.now()
    field = "agent_report" if caller.component_kind == "agent" else "master_target_report"

    def change(record: dict[str, Any]) -> dict[str, Any]:
        record[field] = report
        return record

    record = ctx.store.mutate("disks", caller.tenant, disk_id, change, what=f"disk {disk_id}")
    if caller.component_kind == "master-target":
        verify.after_report(ctx, caller.tenant, record)


# -- recovery points -----------------------------------------------------------------------


def record_recovery_point(ctx: Context, caller: Caller, body: Any) -> None:
    """A master target reached a recovery point (idempotent per disk and tag id)."""
    require_component(caller, "master-target")
    body = validate.body_object(body, {"disk", "tag", "gen", "seq"})
    disk_id = validate.ident(body, "disk")
    tag = body.get("tag")
    if not isinstance(tag, dict):
        raise BadRequest("tag must be an object {id, kind, t0_wall, ...}")
    tag_id = validate.pattern(tag, "id", validate.TAG_ID_RE, "a tag id (letters, digits, . _ -)")
    if validate.json_size(tag) > 2000:
        raise BadRequest("tag is larger than 2000 characters of JSON")
    t0 = validate.number(tag, "t0_wall", 0, 1e11)
    kind = validate.text(tag, "kind", limit=20)
    gen = validate.integer(body, "gen", 0, BIG)
    seq = validate.integer(body, "seq", 0, BIG)
    disk = _own_disk(ctx, caller, disk_id)
    now = ctx.now()
    point = {
        "disk": disk_id, "machine": disk.get("machine"), "tag": tag, "tag_id": tag_id,
        "kind": kind, "t0_wall": t0, "gen": gen, "seq": seq, "reported_at": now,
        "master_target": caller.component_id,
    }  # fmt: skip
    created = ctx.store.create("recoverypoints", caller.tenant, f"{disk_id}|{tag_id}", point)
    latest = {"tag_id": tag_id, "kind": kind, "t0_wall": t0, "gen": gen, "seq": seq, "at": now}

    def change(record: dict[str, Any]) -> dict[str, Any] | None:
        last = record.get("last_recovery_point")
        if created:
            record["recovery_points"] = record.get("recovery_points", 0) + 1
        elif last and (last["gen"], last["seq"]) >= (gen, seq):
            return None
        if not last or (last["gen"], last["seq"]) < (gen, seq):
            record["last_recovery_point"] = latest
        return record

    ctx.store.mutate("disks", caller.tenant, disk_id, change, what=f"disk {disk_id}")
    if disk.get("machine"):
        jobs.check_protected(ctx, caller.tenant, disk["machine"])


def _point_key(point: dict[str, Any]) -> tuple:
    return (point.get("t0_wall") or point.get("reported_at") or 0, point["gen"], point["seq"])


def restorable(point: dict[str, Any], disk: dict[str, Any] | None) -> bool:
    """Whether the master target can still materialise ``point`` of ``disk``.

    Its own latest tag always; an older one only while the disk's recovery
    journal keeps it (the report's ``journal``: every point from
    ``all_since`` on, and those in ``kept``).
    """
    disk = disk or {}
    if (disk.get("last_recovery_point") or {}).get("tag_id") == point.get("tag_id"):
        return True
    journal = (disk.get("master_target_report") or {}).get("journal") or {}
    if not journal.get("enabled"):
        return False
    since, t0 = journal.get("all_since"), point.get("t0_wall")
    if isinstance(since, int | float) and isinstance(t0, int | float) and t0 >= since:
        return True
    return point.get("tag_id") in (journal.get("kept") or [])


def machine_points(
    points: list[dict[str, Any]], machines: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Points per machine: one per tag, the disks holding it, restorable when all of them do."""
    grouped: dict[tuple[str, str], dict[str, Any]] = {}
    for p in points:
        if not p.get("machine"):
            continue
        key = (p["machine"], p["tag_id"])
        row = grouped.setdefault(key, {"machine": p["machine"], "tag_id": p["tag_id"],
                                       "kind": p.get("kind"), "t0_wall": p.get("t0_wall"),
                                       "disks": [], "restorable_on": []})  # fmt: skip
        row["disks"].append(p["disk"])
        if p.get("restorable"):
            row["restorable_on"].append(p["disk"])
    out = []
    for (machine, _), row in grouped.items():
        wanted = sorted((machines.get(machine) or {}).get("disks") or row["disks"])
        row["disks"].sort()
        row["restorable_on"].sort()
        row["restorable"] = row["restorable_on"] == wanted
        out.append(row)
    out.sort(key=lambda r: (r.get("t0_wall") or 0, r["tag_id"]), reverse=True)
    return out


def list_recovery_points(
    ctx: Context, caller: Caller, tenant: str, params: Mapping[str, str]
) -> dict[str, Any]:
    """Recovery points of a tenant (of one machine or disk), newest first, each marked
    ``restorable``, and the machine-wide ``points`` (``restorable=true``: only those).

    ``since`` keeps the points reported at or after it and adds ``earlier``:
    each disk's newest point reported before it (what held at ``since``,
    where a chart of the window starts).  ``every`` keeps, per disk, the
    newest point of each ``every``-second slice of source time, so a long
    window fits one listing.  Both apply before ``restorable``.
    """
    require_operator(caller, tenant)
    machine = validate.query_param(params, "machine")
    disk = validate.query_param(params, "disk")
    only_restorable = validate.query_bool(params, "restorable")
    limit = validate.query_int(
        params, "limit", 1, defaults.RECOVERY_POINTS_MAX, defaults.RECOVERY_POINTS_LIMIT
    )
    since = validate.query_number(params, "since", 0, 1e11)
    every = validate.query_int(params, "every", 1, defaults.RECOVERY_POINTS_EVERY_MAX, 0)
    if machine is not None:
        validate.check_route_id("machine", machine)
    if disk is not None:
        validate.check_route_id("disk", disk)
        points = ctx.store.range("recoverypoints", tenant, f"{disk}|")
    else:
        points = ctx.store.partition("recoverypoints", tenant)
    if machine is not None:
        points = [p for p in points if p.get("machine") == machine]
    disks = {d["disk"]: d for d in ctx.store.partition("disks", tenant)}
    for p in points:
        p["restorable"] = restorable(p, disks.get(p.get("disk")))
    before = [p for p in points if since is not None and _reported(p) < since]
    if since is not None:
        points = [p for p in points if _reported(p) >= since]
    if every:
        points = _newest_per(points, lambda p: (p["disk"], _t0(p) // every))
    machines = {m["machine"]: m for m in ctx.store.partition("machines", tenant)}
    grouped = machine_points(points, machines)
    if only_restorable:
        points = [p for p in points if p["restorable"]]
        grouped = [g for g in grouped if g["restorable"]]
        before = [p for p in before if p["restorable"]]
    points.sort(key=_point_key, reverse=True)
    answer = {"recovery_points": points[:limit], "points": grouped[:limit]}
    if since is not None:
        answer["earlier"] = _newest_per(before, lambda p: p["disk"])
    return answer


def _t0(point: dict[str, Any]) -> float:
    return point.get("t0_wall") or 0.0


def _reported(point: dict[str, Any]) -> float:
    """When the master target reported the point (the server's clock)."""
    return point.get("reported_at") or _t0(point)


def _newest_per(points: list[dict[str, Any]], group) -> list[dict[str, Any]]:
    """The newest of ``points`` for each value of ``group(point)``, newest first."""
    newest: dict[Any, dict[str, Any]] = {}
    for p in points:
        held = newest.get(group(p))
        if held is None or _point_key(p) > _point_key(held):
            newest[group(p)] = p
    return sorted(newest.values(), key=_point_key, reverse=True)


# -- status and machines ------------------------------------------------------------------


def _component_summary(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "component_id": record["component_id"],
        "kind": record["kind"],
        "state": record.get("state"),
        "last_heartbeat": record.get("last_heartbeat"),
    }


def status(ctx: Context, caller: Caller, tenant: str) -> dict[str, Any]:
    """Machines with their disks' latest reports and health, and every component."""
    require_operator(caller, tenant)
    machines = ctx.store.partition("machines", tenant)
    disks = {d["disk"]: d for d in ctx.store.partition("disks", tenant)}
    components = {c["component_id"]: c for c in ctx.store.partition("components", tenant)}
    now = ctx.now()
    out = []
    for machine in sorted(machines, key=lambda m: m["machine"]):
        threshold = machine.get("rpo_threshold_s", defaults.RPO_THRESHOLD)
        views = [disk_view for d in machine.get("disks", []) if d in disks
                 for disk_view in [health.disk_view(disks[d], threshold, now)]]  # fmt: skip
        agent = components.get(machine.get("agent")) or {}
        out.append({
            "machine": machine["machine"],
            "state": machine.get("state"),
            "health": health.machine_health(agent.get("state"), views),
            "schedule": verify.schedule_of(machine),
            "disks": views,
        })  # fmt: skip
    return {
        "machines": out,
        "components": [_component_summary(c) for _, c in sorted(components.items())],
    }


def machine_view(record: dict[str, Any], disks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A machine record as operators see it, with its disks."""
    view = {k: v for k, v in record.items() if k != "disks"}
    view["disks"] = [
        {k: disks[d].get(k) for k in ("device", "size", "state", "process_server", "master_target")}
        | {"id": d}
        for d in record.get("disks", [])
        if d in disks
    ]
    return view


def machines(ctx: Context, caller: Caller, tenant: str) -> dict[str, Any]:
    """Every machine of the tenant."""
    require_operator(caller, tenant)
    disks = {d["disk"]: d for d in ctx.store.partition("disks", tenant)}
    records = sorted(ctx.store.partition("machines", tenant), key=lambda m: m["machine"])
    return {"machines": [machine_view(m, disks) for m in records]}


# -- machine commands ---------------------------------------------------------------------

MACHINE_COMMANDS = ("pause", "resume", "resync", "tag", "drain", "stop", "rotate-credentials",
                    "verify", "repair")  # fmt: skip
FAN_OUT = ("drain", "stop")
"""Commands sent to the machine's process server and master target too."""


def _command_args(command: str, args: Any, machine: dict[str, Any]) -> dict[str, Any]:
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise BadRequest("args must be an object")
    if command == "tag":
        validate.body_object(args, {"kind"})
        return {"kind": validate.choice(args, "kind", ["crash", "app"], required=False) or "crash"}
    if command == "resync":
        validate.body_object(args, {"disks"})
        wanted = args.get("disks")
        if wanted is None:
            return {"disks": list(machine.get("disks", []))}
        if not isinstance(wanted, list) or not all(isinstance(d, str) for d in wanted):
            raise BadRequest("args.disks must be an array of disk ids")
        unknown = sorted(set(wanted) - set(machine.get("disks", [])))
        if unknown:
            raise BadRequest(f"args.disks: {unknown[0][:60]!r} is not a disk of this machine")
        return {"disks": wanted}
    if command in ("verify", "repair"):
        return verify.command_args(command, args, machine)
    if command == "drain":
        validate.body_object(args, {"final"})
        final = args.get("final", False)
        if not isinstance(final, bool):
            raise BadRequest("args.final must be true or false")
        return {"final": True} if final else {}
    validate.body_object(args, set())
    return {}


def _idempotency_key(body: dict[str, Any]) -> str | None:
    return validate.pattern(
        body, "idempotency_key", validate.KEY_RE, "1-128 letters, digits and . _ : -",
        required=False,
    )  # fmt: skip


def _command_id(ctx: Context, tenant: str, key: str | None, what: str) -> str:
    """The command's id: derived from the idempotency key (claimed for ``what``), else new."""
    if not key:
        return commands.new_id()
    command_id = idempotency.derived_id("cmd", tenant, key)
    idempotency.claim(ctx, tenant, key, what, {"command_id": command_id})
    return command_id


def machine_command(
    ctx: Context, caller: Caller, tenant: str, machine_id: str, body: Any
) -> tuple[int, dict[str, Any]]:
    """Send a command to a machine's agent (and, to drain or stop, its PS and MT too)."""
    require_operator(caller, tenant)
    validate.check_route_id("machine", machine_id)
    body = validate.body_object(body, {"command", "args", "idempotency_key"})
    command = validate.choice(body, "command", MACHINE_COMMANDS)
    key = _idempotency_key(body)
    machine = ctx.store.get("machines", tenant, machine_id)
    if machine is None:
        raise NotFound(f"machine {machine_id} does not exist")
    args = _command_args(command, body.get("args"), machine)
    command_id = _command_id(ctx, tenant, key, f"command {command} {machine_id}")
    answer = {"command_id": command_id}
    if command == "verify":
        answer["verify_id"] = args["verify_id"] = verify.verify_id(command_id)
    targets = [machine["agent"]]
    if command in FAN_OUT:
        targets += [c for c in (machine.get("process_server"), machine.get("master_target")) if c]
    args = {"machine": machine_id, **args}
    commands.issue(ctx, tenant, command_id, command, args, targets, machine=machine_id)
    return 202, answer


def resume_replication(
    ctx: Context, caller: Caller, tenant: str, machine_id: str, body: Any
) -> tuple[int, dict[str, Any]]:
    """Resume replicating a machine whose cutover was not committed (its boot check failed).

    Fails the machine's active cutover job, then sends ``resume-replication``
    to its agent (read passes again, after the final tag) and its master
    target (the disks' fence is lifted and they are served again).  A machine
    that is ``cut-over`` is refused (409): a committed cutover is never undone.
    """
    require_operator(caller, tenant)
    validate.check_route_id("machine", machine_id)
    body = validate.body_object(body if body is not None else {}, {"idempotency_key"})
    key = _idempotency_key(body)
    machine = ctx.store.get("machines", tenant, machine_id)
    if machine is None:
        raise NotFound(f"machine {machine_id} does not exist")
    if machine.get("state") == "cut-over":
        raise Conflict(f"machine {machine_id} was cut over: a committed cutover is not resumed; "
                       "protect the machine afresh to replicate it again")  # fmt: skip
    if not machine.get("master_target"):
        raise Conflict(f"machine {machine_id} is not protected (no master target)")
    command_id = _command_id(ctx, tenant, key, f"resume-replication {machine_id}")
    if machine.get("cutover_job"):
        jobs.fail(ctx, tenant, machine["cutover_job"],
                  "not committed; replication resumed by the operator")  # fmt: skip
    args = {"machine": machine_id, "disks": list(machine.get("disks", []))}
    targets = [machine["agent"], machine["master_target"]]
    commands.issue(ctx, tenant, command_id, "resume-replication", args, targets,
                   machine=machine_id)  # fmt: skip
    return 202, {"command_id": command_id}


COMPONENT_COMMANDS = ("stop", "rotate-credentials")
"""Commands an operator sends to one component (a process server or master target serves many
machines, so a machine's command does not reach it)."""


def component_command(
    ctx: Context, caller: Caller, tenant: str, component_id: str, body: Any
) -> tuple[int, dict[str, Any]]:
    """Send ``stop`` or ``rotate-credentials`` to one component of the tenant."""
    require_operator(caller, tenant)
    prefix, _, name = (component_id or "").partition("-")
    if prefix not in KIND_PREFIX.values() or naming.check_id("component", name):
        raise NotFound(f"component {str(component_id)[:80]!r} does not exist")
    body = validate.body_object(body, {"command", "idempotency_key"})
    command = validate.choice(body, "command", COMPONENT_COMMANDS)
    key = _idempotency_key(body)
    if ctx.store.get("components", tenant, component_id) is None:
        raise NotFound(f"component {component_id} does not exist")
    command_id = _command_id(ctx, tenant, key, f"command {command} {component_id}")
    commands.issue(ctx, tenant, command_id, command, {}, [component_id])
    return 202, {"command_id": command_id}


def get_command(ctx: Context, caller: Caller, tenant: str, command_id: str) -> dict[str, Any]:
    """Operator: one command with each target's outcome (``queued``, ``done`` or ``failed``)."""
    require_operator(caller, tenant)
    if not validate.COMMAND_ID_RE.match(command_id or ""):
        raise NotFound(f"command {command_id[:80]!r} does not exist")
    record = ctx.store.get("commands", tenant, command_id)
    if record is None:
        raise NotFound(f"command {command_id} does not exist")
    return {"command": commands.public(record)}


def command_report(ctx: Context, caller: Caller, command_id: str, body: Any) -> None:
    """A component reports a command's outcome: a failed step fails its job, a done one moves it on."""
    record = commands.report(ctx, caller, command_id, body)
    if record and record.get("job_id"):
        mine = record["targets"][caller.component_id]
        if mine["state"] == "failed":
            jobs.fail(
                ctx,
                caller.tenant,
                record["job_id"],
                f"{caller.component_id}: {mine['detail'] or 'failed'}",
            )
        drive.after_report(ctx, caller.tenant, record)
