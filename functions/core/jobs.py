"""Jobs: protect a machine, cut it over, test a failover; each with states and a history.

| kind | states |
|---|---|
| protect | running → protected (when the master target reached a recovery point on every disk); failed |
| cutover | requested → draining → applied → cutover-complete; failed from any but the last |
| test-failover | requested → ready → cleaned; failed from any but the last |

A cutover or test failover opened with ``"drive": true`` is run to its end by
the configuration server itself (``functions.core.drive``); the others are
moved by the playbooks through ``progress``.

Every job is created under an idempotency key, and its id is derived from
the key: the same request asked twice answers the same job and makes one.
A job keeps its ``history`` as ``[{state, at, detail}]``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from ferry import naming
from functions.core import commands, components, defaults, idempotency, validate, verify
from functions.core.auth import Caller, require_operator
from functions.core.context import Context
from functions.core.errors import BadRequest, Conflict, NotFound

TRANSITIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "protect": {"running": ("protected", "failed")},
    "cutover": {
        "requested": ("draining", "failed"),
        "draining": ("applied", "failed"),
        "applied": ("cutover-complete", "failed"),
    },
    "test-failover": {"requested": ("ready", "failed"), "ready": ("cleaned", "failed")},
}
"""kind → state → the states it may move to (a state not listed is final)."""

RECORDED = ("passphrase", "acknowledge")
"""Operator actions done at once, recorded as jobs in state ``done`` so that every action
shows in the jobs list (never with a secret in it)."""

for _kind in RECORDED:
    TRANSITIONS[_kind] = {}

ACTIVE = {"protect": ("running", "protected"), "cutover": ("requested", "draining", "applied"),
          "test-failover": ("requested", "ready")}  # fmt: skip
"""States in which a job blocks another job of its kind on the same machine."""

POINTER = {"protect": "protect_job", "cutover": "cutover_job", "test-failover": "test_failover_job"}
"""Field of the machine record naming its current job of each kind."""

KEY_WHAT = "1-128 letters, digits and . _ : -"


HISTORY_CHARS = 100_000
"""Largest history kept per job, in characters of JSON (oldest entries go first)."""


def _history(job: dict[str, Any], state: str, at: float, detail: str | None) -> None:
    history = [*job.get("history", []), {"state": state, "at": at, "detail": detail}]
    history = history[-defaults.HISTORY_KEPT :]
    while len(history) > 1 and validate.json_size(history) > HISTORY_CHARS:
        history.pop(0)
    job["history"] = history


def _new_job(kind: str, job_id: str, machine: str, key: str, state: str, now: float, detail: str):
    job = {
        "job_id": job_id, "kind": kind, "machine": machine, "state": state,
        "idempotency_key": key, "created_at": now, "updated_at": now, "history": [],
    }  # fmt: skip
    _history(job, state, now, detail)
    return job


def record_action(ctx: Context, tenant: str, kind: str, detail: str, machine: str = "-") -> str:
    """Record an operator action that is done at once (``RECORDED``) as a job; its id."""
    now = ctx.now()
    job_id = f"job-{uuid.uuid4().hex[:24]}"
    job = _new_job(kind, job_id, machine, "-", "done", now, detail[: defaults.MAX_TEXT])
    ctx.store.create("jobs", tenant, job_id, job)
    return job_id


def _machine(ctx: Context, tenant: str, machine_id: str) -> dict[str, Any]:
    validate.check_route_id("machine", machine_id)
    machine = ctx.store.get("machines", tenant, machine_id)
    if machine is None:
        raise NotFound(f"machine {machine_id} does not exist")
    return machine


def _blocking_job(ctx: Context, tenant: str, machine: dict[str, Any], kind: str, job_id: str):
    current = machine.get(POINTER[kind])
    if not current or current == job_id:
        return None
    job = ctx.store.get("jobs", tenant, current)
    if job and job["state"] in ACTIVE[kind]:
        return job
    return None


def _claim(ctx: Context, tenant: str, machine_id: str, kind: str, job: dict[str, Any]) -> None:
    """Make ``job`` the machine's open job of its kind, or refuse (409) and withdraw it.

    The job exists before it is claimed, so a pointer always names a real job;
    the claim is one ETag-checked write of the machine record, so of several
    requests racing with different idempotency keys exactly one wins.
    """
    job_id = job["job_id"]

    def change(machine: dict[str, Any]) -> dict[str, Any] | None:
        blocking = _blocking_job(ctx, tenant, machine, kind, job_id)
        if blocking:
            raise Conflict(f"{kind} job {blocking['job_id']} is already {blocking['state']} "
                           f"for machine {machine_id}")  # fmt: skip
        if machine.get(POINTER[kind]) == job_id:
            return None
        return {**machine, POINTER[kind]: job_id}

    try:
        ctx.store.mutate("machines", tenant, machine_id, change, what=machine_id)
    except Conflict:
        ctx.store.delete("jobs", tenant, job_id)  # never opened: only the winner's job exists
        raise


# -- protect ------------------------------------------------------------------------------


def protect(ctx: Context, caller: Caller, tenant: str, machine_id: str, body: Any):
    """Protect every disk of a machine as one consistency group; answers 202 ``{job}``."""
    require_operator(caller, tenant)
    body = validate.body_object(
        body, {"idempotency_key", "process_server", "master_target", "rpo_threshold_s",
               "targets", *verify.SCHEDULE},
    )  # fmt: skip
    key = validate.pattern(body, "idempotency_key", validate.KEY_RE, KEY_WHAT)
    wanted_ps = validate.ident(body, "process_server", required=False)
    wanted_mt = validate.ident(body, "master_target", required=False)
    threshold = validate.integer(body, "rpo_threshold_s", 1, 86400, default=defaults.RPO_THRESHOLD)
    schedule = verify.schedule_body(body)
    machine = _machine(ctx, tenant, machine_id)
    targets = disk_targets(body.get("targets"), machine)
    job_id = idempotency.derived_id("job", tenant, key)
    idempotency.claim(ctx, tenant, key, f"protect {machine_id}", {"job_id": job_id})
    job = ctx.store.get("jobs", tenant, job_id)
    if job is None:
        job = _start_protect(ctx, tenant, machine, job_id, key, wanted_ps, wanted_mt, threshold,
                             schedule)  # fmt: skip
        if targets:
            job = ctx.store.mutate("jobs", tenant, job_id, lambda j: {**j, "targets": targets})
    _dispatch_protect(ctx, tenant, job)
    return 202, {"job": ctx.store.get("jobs", tenant, job_id) or job}


TARGET_KINDS = ("device", "file")
"""Kinds of a disk's target on its master target: a block device (e.g. a data disk's LUN by
its stable path) or an image file in the master target's ``target_dir``."""


def disk_targets(value: Any, machine: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The protect request's ``targets``: ``{disk: {kind, path}}``, checked (400 if wrong).

    The master target checks them again against its host (the device exists,
    is large enough, the file is in its target directory) before serving.
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest("targets must be an object: {disk id: {kind, path}}")
    result = {}
    for disk, spec in value.items():
        if disk not in machine.get("disks", []):
            raise BadRequest(f"targets: {str(disk)[:60]!r} is not a disk of this machine")
        spec = validate.body_object(spec, {"kind", "path"})
        kind = validate.choice(spec, "kind", TARGET_KINDS)
        path = validate.text(spec, "path", required=True, limit=255) or ""
        if not path.startswith("/") or ".." in path.split("/"):
            raise BadRequest(f"targets.{disk}.path must be an absolute path without '..'")
        if kind == "device" and not path.startswith("/dev/"):
            raise BadRequest(f"targets.{disk}.path: a device target is a path under /dev/")
        result[disk] = {"kind": kind, "path": path}
    return result


def _start_protect(ctx, tenant, machine, job_id, key, wanted_ps, wanted_mt, threshold, schedule):
    machine_id = machine["machine"]
    if not machine.get("disks"):
        raise Conflict(f"machine {machine_id} registered no disks; nothing to protect")
    blocking = _blocking_job(ctx, tenant, machine, "protect", job_id)
    if blocking:
        raise Conflict(
            f"machine {machine_id} is already protected by job {blocking['job_id']} "
            f"({blocking['state']})"
        )
    everyone = ctx.store.partition("components", tenant)
    disks = ctx.store.partition("disks", tenant)
    ps = _choose(everyone, disks, "process-server", "process_server", wanted_ps)
    mt = _choose(everyone, disks, "master-target", "master_target", wanted_mt)
    address = components.process_server_address(ps)
    if not address:
        raise Conflict(
            f"process server {ps['component_id']} registered no reachable listen address "
            "(register it with listen=host:port)"
        )
    now = ctx.now()
    job = _new_job("protect", job_id, machine_id, key, "running", now,
                   f"protecting {len(machine['disks'])} disk(s) through {ps['component_id']} "
                   f"to {mt['component_id']}")  # fmt: skip
    job.update(
        process_server=ps["component_id"], master_target=mt["component_id"],
        process_server_address=address, disks=list(machine["disks"]),
        command_id=idempotency.derived_id("cmd", tenant, job_id), rpo_threshold_s=threshold,
        schedule=schedule,
    )  # fmt: skip
    if not ctx.store.create("jobs", tenant, job_id, job):
        return ctx.store.get("jobs", tenant, job_id) or job
    _claim(ctx, tenant, machine_id, "protect", job)
    return job


def _choose(everyone, disks, kind: str, field: str, wanted: str | None) -> dict[str, Any]:
    """The named component of ``kind``, or the one carrying the fewest disks."""
    candidates = [c for c in everyone if c.get("kind") == kind]
    if wanted is not None:
        for c in candidates:
            if wanted in (c["component_id"], c.get("name")):
                return c
        raise NotFound(f"{kind} {wanted} is not registered in this tenant")
    if not candidates:
        raise Conflict(f"no {kind} is registered in this tenant; register one first")
    load = {c["component_id"]: 0 for c in candidates}
    for disk in disks:
        if disk.get(field) in load:
            load[disk[field]] += 1
    return min(candidates, key=lambda c: (load[c["component_id"]], c["component_id"]))


def _dispatch_protect(ctx: Context, tenant: str, job: dict[str, Any]) -> None:
    """Record the assignment and send ``protect`` to the three components (idempotent)."""
    if job["state"] != "running" or job.get("dispatched"):
        return
    machine_id = job["machine"]

    def change_machine(m: dict[str, Any]) -> dict[str, Any]:
        m.update(
            state="protecting", process_server=job["process_server"],
            master_target=job["master_target"], process_server_address=job["process_server_address"],
            rpo_threshold_s=job["rpo_threshold_s"], protect_job=job["job_id"],
            protected_disks=job["disks"],
        )  # fmt: skip
        m["settings"] = {**(m.get("settings") or {}), **job.get("schedule", {})}
        return m

    machine = ctx.store.mutate("machines", tenant, machine_id, change_machine, what=machine_id)
    disks = []
    for disk_id in job["disks"]:

        def change_disk(d: dict[str, Any]) -> dict[str, Any]:
            d.update(process_server=job["process_server"], master_target=job["master_target"])
            d["state"] = "protecting"
            d["target"] = job.get("targets", {}).get(d["disk"])  # None: the default image file
            return d

        disk = ctx.store.mutate("disks", tenant, disk_id, change_disk, what=f"disk {disk_id}")
        disks.append({"id": disk_id, "device": disk.get("device"), "size": disk.get("size")})
        queue = naming.disk_queue(tenant, disk_id)
        ctx.account.ensure_queue(queue)
        ctx.account.ensure_queue(naming.poison_queue(queue))
    args = {
        "machine": machine_id, "consistency_group": machine_id, "disks": disks,
        "process_server": job["process_server_address"],
        "process_server_id": job["process_server"], "master_target": job["master_target"],
    }  # fmt: skip
    targets = [machine["agent"], job["process_server"], job["master_target"]]
    commands.issue(
        ctx, tenant, job["command_id"], "protect", args, targets, machine=machine_id,
        job_id=job["job_id"],
    )  # fmt: skip
    ctx.store.mutate("jobs", tenant, job["job_id"], lambda j: {**j, "dispatched": True})


def check_protected(ctx: Context, tenant: str, machine_id: str) -> None:
    """Mark a machine's running protect job ``protected`` once every disk has a recovery point."""
    machine = ctx.store.get("machines", tenant, machine_id)
    if not machine or not machine.get("protect_job"):
        return
    job = ctx.store.get("jobs", tenant, machine["protect_job"])
    if not job or job["state"] != "running":
        return
    for disk_id in job["disks"]:
        disk = ctx.store.get("disks", tenant, disk_id) or {}
        if not disk.get("last_recovery_point"):
            return
    _advance(ctx, tenant, job["job_id"], "protected", "every disk reached a recovery point")
    for disk_id in job["disks"]:
        ctx.store.mutate("disks", tenant, disk_id, lambda d: {**d, "state": "protected"})
    ctx.store.mutate("machines", tenant, machine_id, lambda m: {**m, "state": "protected"})


# -- cutover and test failover ------------------------------------------------------------


def failover(ctx: Context, caller: Caller, tenant: str, machine_id: str, body: Any, kind: str):
    """Open a cutover or test-failover job (state ``requested``); answers 202 ``{job}``."""
    require_operator(caller, tenant)
    body = validate.body_object(body, {"idempotency_key", "point", "point_time"})
    key = validate.pattern(body, "idempotency_key", validate.KEY_RE, KEY_WHAT)
    point = _point(body)
    machine = _machine(ctx, tenant, machine_id)
    job_id = idempotency.derived_id("job", tenant, key)
    idempotency.claim(ctx, tenant, key, f"{kind} {machine_id}", {"job_id": job_id})
    job = ctx.store.get("jobs", tenant, job_id)
    if job is None:
        if machine.get("state") != "protected":
            raise Conflict(
                f"machine {machine_id} is {machine.get('state')}, not protected; "
                f"a {kind} needs every disk at a recovery point"
            )
        blocking = _blocking_job(ctx, tenant, machine, kind, job_id)
        if blocking:
            raise Conflict(f"{kind} job {blocking['job_id']} is already {blocking['state']} "
                           f"for machine {machine_id}")  # fmt: skip
        job = _new_job(kind, job_id, machine_id, key, "requested", ctx.now(), f"{kind} requested")
        if point:
            job["point"] = point
        if not ctx.store.create("jobs", tenant, job_id, job):
            job = ctx.store.get("jobs", tenant, job_id) or job
        _claim(ctx, tenant, machine_id, kind, job)
    return 202, {"job": job}


def _point(body: dict[str, Any]) -> dict[str, Any]:
    """The recovery point a test failover or cutover asks for: ``{point?: tag id, point_time?: Unix s}``."""
    out: dict[str, Any] = {}
    if body.get("point") is not None:
        out["point"] = validate.pattern(body, "point", validate.TAG_ID_RE, "a tag id")
    if body.get("point_time") is not None:
        out["point_time"] = validate.number(body, "point_time", 0, 1e11)
    if len(out) > 1:
        raise BadRequest("give point or point_time, not both")
    return out


# -- progress, listing --------------------------------------------------------------------


def _advance(ctx: Context, tenant: str, job_id: str, state: str, detail: str | None):
    now = ctx.now()

    def change(job: dict[str, Any]) -> dict[str, Any] | None:
        if job["state"] == state:
            return None
        allowed = TRANSITIONS[job["kind"]].get(job["state"], ())
        if state not in allowed:
            raise Conflict(
                f"job {job_id} is {job['state']}; it can go to "
                f"{', '.join(allowed) or 'no other state'}, not {state}"
            )
        job["state"] = state
        job["updated_at"] = now
        _history(job, state, now, detail)
        return job

    return ctx.store.mutate("jobs", tenant, job_id, change, what=f"job {job_id}")


def fail(ctx: Context, tenant: str, job_id: str, detail: str) -> None:
    """Mark a job failed unless it is already final."""
    job = ctx.store.get("jobs", tenant, job_id)
    if job and "failed" in TRANSITIONS[job["kind"]].get(job["state"], ()):
        try:
            _advance(ctx, tenant, job_id, "failed", detail[: defaults.MAX_TEXT])
        except Conflict:
            pass  # it moved on meanwhile


def progress(ctx: Context, caller: Caller, tenant: str, job_id: str, body: Any):
    """Record a step of a job (used by the playbooks); answers 200 ``{job}``."""
    require_operator(caller, tenant)
    job = _job(ctx, tenant, job_id)
    body = validate.body_object(body, {"state", "detail"})
    states = sorted({s for steps in TRANSITIONS[job["kind"]].values() for s in steps})
    state = validate.choice(body, "state", states)
    detail = validate.text(body, "detail")
    if job["kind"] == "protect" and state == "protected":
        raise BadRequest("a protect job becomes protected by itself, from recovery points")
    if job.get("driven") and state != "failed":
        raise Conflict(f"job {job_id} is run by the configuration server; it moves by itself")
    return {"job": progress_as_server(ctx, tenant, job_id, state, detail)}


def progress_as_server(ctx: Context, tenant: str, job_id: str, state: str, detail: str | None):
    """Move a job to ``state`` with the step's side effects (the drain, the machine cut over)."""
    job = _advance(ctx, tenant, job_id, state, detail)
    if job["kind"] == "cutover" and state == "draining":
        _send_drain(ctx, tenant, job)
    if job["kind"] == "cutover" and state == "cutover-complete":
        ctx.store.mutate("machines", tenant, job["machine"], lambda m: {**m, "state": "cut-over"})
    return ctx.store.get("jobs", tenant, job_id) or job


def _send_drain(ctx: Context, tenant: str, job: dict[str, Any]) -> None:
    machine = ctx.store.get("machines", tenant, job["machine"]) or {}
    targets = [c for c in (machine.get("agent"), machine.get("process_server"),
                           machine.get("master_target")) if c]  # fmt: skip
    command_id = idempotency.derived_id("cmd", tenant, f"{job['job_id']}|drain")
    # final: the agent's last tag, after which the master target fences the disks.
    args = {"machine": job["machine"], "disks": list(machine.get("disks", [])), "final": True}
    if job.get("driven"):
        args["digest"] = True  # the agent digests the quiet source for the VHDs' check
    commands.issue(ctx, tenant, command_id, "drain", args, targets, machine=job["machine"],
                   job_id=job["job_id"])  # fmt: skip
    note_command(ctx, tenant, job["job_id"], command_id)


def note_command(ctx: Context, tenant: str, job_id: str, command_id: str) -> None:
    """Name a command in its job's ``commands`` (so operators find each step's outcome)."""

    def change(job: dict[str, Any]) -> dict[str, Any] | None:
        if command_id in job.get("commands", []):
            return None
        return {**job, "commands": [*job.get("commands", []), command_id]}

    ctx.store.mutate("jobs", tenant, job_id, change, what=f"job {job_id}")


def _job(ctx: Context, tenant: str, job_id: str) -> dict[str, Any]:
    if not validate.JOB_ID_RE.match(job_id or ""):
        raise NotFound(f"job {job_id[:80]!r} does not exist")
    job = ctx.store.get("jobs", tenant, job_id)
    if job is None:
        raise NotFound(f"job {job_id} does not exist")
    return job


def get_job(ctx: Context, caller: Caller, tenant: str, job_id: str) -> dict[str, Any]:
    """One job with its history."""
    require_operator(caller, tenant)
    return _job(ctx, tenant, job_id)


def list_jobs(ctx: Context, caller: Caller, tenant: str, params: Mapping[str, str]):
    """Every job of the tenant, newest first, without their histories."""
    require_operator(caller, tenant)
    machine = validate.query_param(params, "machine")
    jobs = ctx.store.partition("jobs", tenant)
    if machine is not None:
        jobs = [j for j in jobs if j["machine"] == machine]
    jobs.sort(key=lambda j: j["created_at"], reverse=True)
    return {"jobs": [{k: v for k, v in j.items() if k != "history"} for j in jobs]}
