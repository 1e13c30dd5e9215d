"""Online verify and scheduled points at the configuration server: settings, commands, repair.

The work is the agent's and the master target's (docs/design.md, "Online
verify"); the server

* keeps each machine's schedule (``app_consistent_interval_s``,
  ``verify_interval_s``, set with ``protect``) in the machine's agent
  settings (``app_tag_interval``, ``verify_interval``) and shows it;
* checks the ``verify`` and ``repair`` machine commands;
* keeps the master target's verify report with the disk (``verify``) and,
  when a verify asked for repair is done and found blocks that differ,
  sends the agent ``repair`` with exactly those blocks (one command per
  verify and disk: its id derives from them).  More differing runs than a
  report holds are repaired by a resync of the disk, which compares digests
  and ships only the blocks that differ.
"""

from __future__ import annotations

from typing import Any

from functions.core import commands, idempotency, validate
from functions.core.auth import Caller, require_operator
from functions.core.context import Context
from functions.core.errors import BadRequest

SCHEDULE = {"app_consistent_interval_s": "app_tag_interval", "verify_interval_s": "verify_interval"}
"""Field of ``protect`` (and of a machine's ``schedule``) → the agent setting it becomes."""

REPORT_CHARS = 12000
"""Largest verify report kept with a disk, in characters of JSON."""


def schedule_body(body: dict[str, Any]) -> dict[str, Any]:
    """The agent settings a ``protect`` body's schedule fields ask for (0 turns one off)."""
    out = {}
    for field, setting in SCHEDULE.items():
        value = validate.integer(body, field, 0, 7 * 86400, default=None)
        if value is not None:
            out[setting] = value
    return out


def schedule_of(machine: dict[str, Any]) -> dict[str, Any]:
    """A machine's schedule as operators see it (seconds; 0 is off)."""
    settings = machine.get("settings") or {}
    return {field: settings.get(setting, 0) for field, setting in SCHEDULE.items()}


def checked_report(value: Any) -> dict[str, Any] | None:
    """A master target's (or agent's) verify report, checked for shape and size."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest("verify must be an object or null")
    if validate.json_size(value) > REPORT_CHARS:
        raise BadRequest(f"verify is larger than {REPORT_CHARS} characters of JSON")
    return value


def command_args(command: str, args: dict[str, Any], machine: dict[str, Any]) -> dict[str, Any]:
    """The checked arguments of a ``verify`` or ``repair`` machine command."""
    disks = list(machine.get("disks", []))
    if command == "verify":
        validate.body_object(args, {"disks", "repair"})
        wanted = args.get("disks")
        if wanted is not None and (
            not isinstance(wanted, list) or not all(isinstance(d, str) for d in wanted)
        ):
            raise BadRequest("args.disks must be an array of disk ids")
        unknown = sorted(set(wanted or []) - set(disks))
        if unknown:
            raise BadRequest(f"args.disks: {unknown[0][:60]!r} is not a disk of this machine")
        repair = args.get("repair", False)
        if not isinstance(repair, bool):
            raise BadRequest("args.repair must be true or false")
        return {"disks": wanted, "repair": repair}
    validate.body_object(args, {"disk", "blocks"})
    disk = validate.ident(args, "disk")
    if disk not in disks:
        raise BadRequest(f"args.disk: {disk!r} is not a disk of this machine")
    blocks = args.get("blocks")
    if not isinstance(blocks, list) or not blocks or len(blocks) > 10000 or not all(
        isinstance(b, list) and len(b) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 40 for x in b)
        for b in blocks
    ):  # fmt: skip
        raise BadRequest("args.blocks must be 1-10000 [first, count] block runs")
    return {"disk": disk, "blocks": blocks}


def verify_id(command_id: str) -> str:
    """The verify id of a ``verify`` command (shown in its answer and in each disk's report)."""
    return "v-" + command_id.removeprefix("cmd-")[:16]


def after_report(ctx: Context, tenant: str, disk: dict[str, Any] | None) -> None:
    """Repair what a finished verify found, if it was asked to (once per verify and disk)."""
    report = ((disk or {}).get("master_target_report") or {}).get("verify")
    if not isinstance(report, dict) or report.get("state") != "done" or not report.get("repair"):
        return
    differing = report.get("differing") or []
    if not report.get("differing_blocks") or not differing or not disk:
        return
    machine = ctx.store.get("machines", tenant, disk.get("machine") or "") or {}
    if not machine.get("agent"):
        return
    key = f"repair|{disk['disk']}|{report.get('id')}"
    command_id = idempotency.derived_id("cmd", tenant, key)
    if ctx.store.get("commands", tenant, command_id) is not None:
        return
    args: dict[str, Any]
    if report.get("truncated"):
        kind, args = "resync", {"disks": [disk["disk"]]}
    else:
        kind, args = "repair", {"disk": disk["disk"], "blocks": differing}
    args = {"machine": machine["machine"], "verify_id": report.get("id"), **args}
    commands.issue(ctx, tenant, command_id, kind, args, [machine["agent"]],
                   machine=machine["machine"])  # fmt: skip


def set_schedule(
    ctx: Context, caller: Caller, tenant: str, machine_id: str, body: Any
) -> tuple[int, dict[str, Any]]:
    """Operator: change a machine's schedule; its agent fetches its settings again at once.

    ``{app_consistent_interval_s?, verify_interval_s?}`` → 200 ``{schedule, command_id}``
    (``command_id``: the ``protect`` that makes a protected machine's agent take the new
    settings; null for a machine not protected yet, which gets them with ``protect``).
    """
    require_operator(caller, tenant)
    validate.check_route_id("machine", machine_id)
    body = validate.body_object(body, set(SCHEDULE))
    wanted = schedule_body(body)

    def change(machine: dict[str, Any]) -> dict[str, Any]:
        return {**machine, "settings": {**(machine.get("settings") or {}), **wanted}}

    machine = ctx.store.mutate("machines", tenant, machine_id, change, what=machine_id)
    command_id = None
    if machine.get("protect_job") and machine.get("agent"):
        command_id = commands.new_id()
        commands.issue(ctx, tenant, command_id, "protect", {"machine": machine_id},
                       [machine["agent"]], machine=machine_id)  # fmt: skip
    return 200, {"schedule": schedule_of(machine), "command_id": command_id}
