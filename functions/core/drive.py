"""Driven jobs: the configuration server runs a test failover or a cutover to its end.

A cutover or test-failover job opened with ``"drive": true`` is carried out
by the server itself, step by step, through the components' command queues;
each step starts when the previous command's outcome is reported (a
component's ``POST /components/self/commands/{id}``), so no step waits on a
timer and a retried report changes nothing:

- test failover: ``test-failover`` to the master target (clone every disk at
  its tag into fixed VHDs); done → ``ready``.  ``POST .../jobs/{id}/cleanup``
  sends ``test-failover-cleanup``; done → ``cleaned``.
- cutover: the job moves to ``draining`` at once, which sends the final
  ``drain`` to the agent, process server and master target; all done →
  ``cutover`` to the master target with the final tag and the source
  digests the agent took after it (wait until every disk is fenced at the
  final tag, make fixed VHDs, check them against those digests); done →
  ``applied``, then
  ``cutover-complete`` (the machine is ``cut-over``).

A job not driven (the playbooks' path) is moved by
``POST .../jobs/{id}/progress`` as before.  A failed step fails the job
(``functions.core.replication.command_report``).  Command ids derive from the
job id and the step, so each step is sent once.
"""

from __future__ import annotations

import json
from typing import Any

from functions.core import commands, idempotency, jobs
from functions.core.auth import Caller, require_operator
from functions.core.context import Context
from functions.core.errors import BadRequest, Conflict

STEPS = ("test-failover", "test-failover-cleanup", "cutover")
"""Command types only the server sends, as steps of a driven job (to the master target)."""


def _step_id(tenant: str, job_id: str, step: str) -> str:
    return idempotency.derived_id("cmd", tenant, f"{job_id}|{step}")


def _send(ctx: Context, tenant: str, job: dict[str, Any], step: str, args: dict[str, Any]):
    machine = ctx.store.get("machines", tenant, job["machine"]) or {}
    target = machine.get("master_target")
    if not target:
        raise Conflict(f"machine {job['machine']} has no master target")
    args = {"machine": job["machine"], "disks": list(machine.get("disks", [])), **args}
    command_id = _step_id(tenant, job["job_id"], step)
    commands.issue(ctx, tenant, command_id, step, args, [target], machine=job["machine"],
                   job_id=job["job_id"])  # fmt: skip
    jobs.note_command(ctx, tenant, job["job_id"], command_id)


def open_job(ctx: Context, caller: Caller, tenant: str, machine: str, body: Any, kind: str):
    """Open a cutover or test-failover job; with ``"drive": true`` the server runs it (202 ``{job}``)."""
    driven = isinstance(body, dict) and body.get("drive") is True
    if isinstance(body, dict):
        if body.get("drive", False) not in (True, False):
            raise BadRequest("drive must be true or false")
        body = {k: v for k, v in body.items() if k != "drive"}
    status, answer = jobs.failover(ctx, caller, tenant, machine, body, kind)
    if driven:
        answer = {"job": start(ctx, tenant, answer["job"])}
    return status, answer


def start(ctx: Context, tenant: str, job: dict[str, Any]) -> dict[str, Any]:
    """Mark a new cutover or test-failover job driven and send its first step (idempotent)."""
    if job["state"] != "requested":
        return job
    job = ctx.store.mutate("jobs", tenant, job["job_id"], lambda j: {**j, "driven": True})
    if job["kind"] == "test-failover":
        _send(
            ctx, tenant, job, "test-failover", {"job_id": job["job_id"], **(job.get("point") or {})}
        )
        return job
    return jobs.progress_as_server(ctx, tenant, job["job_id"], "draining",
                                   "the configuration server sent the final drain")  # fmt: skip


def cleanup(ctx: Context, caller: Caller, tenant: str, job_id: str) -> tuple[int, dict[str, Any]]:
    """Operator: remove what a driven test failover made; answers 202 ``{job}``."""
    require_operator(caller, tenant)
    job = jobs.get_job(ctx, caller, tenant, job_id)
    if job["kind"] != "test-failover" or not job.get("driven"):
        raise Conflict(f"job {job_id} is not a test failover run by the configuration server")
    if job["state"] not in ("ready", "cleaned"):
        raise Conflict(f"job {job_id} is {job['state']}; only a ready test failover is cleaned up")
    if job["state"] == "ready":
        _send(ctx, tenant, job, "test-failover-cleanup", {"job_id": job_id})
    return 202, {"job": job}


def after_report(ctx: Context, tenant: str, record: dict[str, Any] | None) -> None:
    """Take the next step of the driven job a command belongs to, once all its targets are done."""
    if not record or not record.get("job_id"):
        return
    targets = record.get("targets", {}).values()
    if any(t["state"] != "done" for t in targets):
        return  # still running, or failed (the job is failed by the caller)
    job = ctx.store.get("jobs", tenant, record["job_id"])
    if not job or not job.get("driven"):
        return
    kind, step = job["kind"], record["type"]
    detail = _summary(step, [t.get("detail") or "" for t in targets])
    if kind == "test-failover" and step == "test-failover" and job["state"] == "requested":
        jobs.progress_as_server(ctx, tenant, job["job_id"], "ready", detail)
    elif kind == "test-failover" and step == "test-failover-cleanup" and job["state"] == "ready":
        jobs.progress_as_server(ctx, tenant, job["job_id"], "cleaned", detail)
    elif kind == "cutover" and step == "drain" and job["state"] == "draining":
        final_tag, digests = _drained(record)
        _send(ctx, tenant, job, "cutover", {"job_id": job["job_id"], "final_tag": final_tag,
                                             "digests": digests, **(job.get("point") or {})})  # fmt: skip
    elif kind == "cutover" and step == "cutover" and job["state"] == "draining":
        final = record["args"].get("final_tag")
        jobs.progress_as_server(ctx, tenant, job["job_id"], "applied",
                                f"final tag {final} applied and fenced on every disk")  # fmt: skip
        jobs.progress_as_server(ctx, tenant, job["job_id"], "cutover-complete", detail)


def _drained(record: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """The final tag's id and the source digests from the agent's outcome of a drain.

    The agent answers ``{"tag": {"id": ...}, "digests": {disk: {"size", "sha256"}}}``;
    without digests (an older agent, or an outcome cut to fit) the master
    target checks its VHDs against the fenced targets instead.
    """
    for target in record.get("targets", {}).values():
        try:
            detail = json.loads(target.get("detail") or "")
        except ValueError:
            continue
        if isinstance(detail, dict) and isinstance(detail.get("tag"), dict):
            digests = detail.get("digests")
            return detail["tag"].get("id"), digests if isinstance(digests, dict) else {}
    return None, {}


def _summary(step: str, details: list[str]) -> str:
    """One sentence for the job's history from a step's outcomes (JSON from the master target)."""
    parsed = []
    for text in details:
        try:
            parsed.append(json.loads(text))
        except ValueError:
            parsed.append(text)
    parts = []
    for outcome in parsed:
        if not isinstance(outcome, dict):
            parts.append(str(outcome))
        elif step == "test-failover":
            parts += [f"{d.get('id')} cloned at tag {d.get('tag')} to {d.get('vhd')}"
                      for d in outcome.get("disks", [])]  # fmt: skip
        elif step == "test-failover-cleanup":
            parts.append(f"removed {outcome.get('removed')} file(s)")
        elif step == "cutover":
            parts.append(f"VHDs {', '.join(outcome.get('vhds', []))} verified against the "
                         f"{outcome.get('checked_against', 'target')} "
                         f"(manifest {outcome.get('manifest')})")  # fmt: skip
    return "; ".join(parts)[:900]
