"""The monitoring sweep (the timer's work) and the alert records operators list.

Each sweep, per tenant: components that sent heartbeats but none for
HEARTBEAT_TTL become ``lost``; then the set of alert conditions is computed
(``heartbeat-lost``, ``spool``, ``rpo``, ``resync``; docs/api.md, "Alerts")
and reconciled with the open alerts: a new condition raises an alert, a
condition that ended clears its alert (``cleared_at``), and the record stays
for operators.  Alert ids are ``<kind>.<subject>.<n>``, created with
create-only semantics, so two sweeps running at once raise one alert.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any

from functions.core import defaults, health, validate
from functions.core.auth import Caller, require_operator
from functions.core.context import Context
from functions.core.errors import NotFound
from functions.core.store import TENANTS_PARTITION
from functions.core.tenants import iso

log = logging.getLogger("ferry.functions.monitoring")

Conditions = dict[tuple[str, str], dict[str, Any]]


def sweep(ctx: Context, tenants: Iterable[str] | None = None) -> dict[str, int]:
    """Run the monitoring rules over ``tenants`` (all by default); counts of what changed."""
    if tenants is None:
        tenants = [t["tenant"] for t in ctx.store.partition("tenants", TENANTS_PARTITION)]
    totals = {"lost": 0, "raised": 0, "cleared": 0}
    for tenant in tenants:
        try:
            for key, value in sweep_tenant(ctx, tenant).items():
                totals[key] += value
        except Exception as exc:  # one tenant's trouble must not stop the others
            log.error("monitoring tenant %s failed: %s", tenant, type(exc).__name__)
    return totals


def sweep_tenant(ctx: Context, tenant: str) -> dict[str, int]:
    """One tenant: mark lost components, then raise and clear its alerts."""
    now = ctx.now()
    components = ctx.store.partition("components", tenant)
    lost = 0
    unreadable: Conditions = {}
    for component in components:
        try:
            if component.get("state") != "lost" and health.is_lost(component, now):
                _mark_lost(ctx, tenant, component["component_id"], now)
                component["state"] = "lost"
                lost += 1
        except BAD_RECORD as exc:
            unreadable.update(_unreadable("component", component.get("component_id"), exc))
    conditions = _conditions(ctx, tenant, components, now) | unreadable
    raised, cleared = _reconcile(ctx, tenant, conditions, now)
    _prune(ctx, tenant, now)
    return {"lost": lost, "raised": raised, "cleared": cleared}


def _mark_lost(ctx: Context, tenant: str, component_id: str, now: float) -> None:
    def change(record: dict[str, Any]) -> dict[str, Any] | None:
        if record.get("state") == "lost" or not health.is_lost(record, now):
            return None
        record["state"] = "lost"
        return record

    ctx.store.mutate("components", tenant, component_id, change)


BAD_RECORD = (TypeError, ValueError, KeyError, OverflowError, AttributeError)
"""What a record the monitor cannot read raises: it is alerted on, never stops the sweep."""


def _unreadable(what: str, subject: Any, exc: BaseException) -> Conditions:
    """An alert for one record the rules cannot read; the tenant's other alerts go on."""
    subject = str(subject or "unknown")[:80]
    log.warning(
        "monitoring: %s %s has an unreadable record (%s)", what, subject, type(exc).__name__
    )
    return {("unreadable", subject): {
        "severity": "warning",
        "message": f"{what} {subject} reported a record the monitor cannot read "
                   f"({type(exc).__name__}); its own alerts are off until it reports again",
    }}  # fmt: skip


def _conditions(ctx: Context, tenant: str, components: list[dict], now: float) -> Conditions:
    found: Conditions = {}
    for c in components:
        try:
            found.update(_component_conditions(c))
        except BAD_RECORD as exc:
            found.update(_unreadable("component", c.get("component_id"), exc))
    disks = {d.get("disk"): d for d in ctx.store.partition("disks", tenant)}
    for machine in ctx.store.partition("machines", tenant):
        try:
            found.update(_machine_conditions(machine, disks, now))
        except BAD_RECORD as exc:
            found.update(_unreadable("machine", machine.get("machine"), exc))
    return found


def _component_conditions(c: dict[str, Any]) -> Conditions:
    found: Conditions = {}
    cid = c["component_id"]
    if c.get("state") == "lost":
        found[("heartbeat-lost", cid)] = {
            "severity": "critical",
            "message": f"{c['kind']} {cid} sent no heartbeat since {iso(c['last_heartbeat'])}",
        }
    elif c.get("kind") == "process-server":
        free = health.spool_free(c.get("status"))
        severity = health.spool_severity(free)
        if severity:
            found[("spool", cid)] = {
                "severity": severity,
                "message": f"process server {cid} spool has {free:.0%} free",
            }
    return found


def _machine_conditions(
    machine: dict[str, Any], disks: dict[Any, dict], now: float | None = None
) -> Conditions:
    found: Conditions = {}
    if not machine.get("protect_job") or machine.get("state") in ("cut-over", "stopped"):
        return found
    now = time.time() if now is None else now
    threshold = machine.get("rpo_threshold_s", defaults.RPO_THRESHOLD)
    for disk_id in machine.get("protected_disks") or machine.get("disks", []):
        if disk_id not in disks:
            continue
        view = health.disk_view(disks[disk_id], threshold, now)
        where = f"disk {disk_id} of machine {machine['machine']}"
        if health.over_rpo(view, threshold):
            found[("rpo", disk_id)] = {
                "severity": "warning",
                "message": f"{where}: RPO {view['rpo_s']:.0f} s is over {threshold} s"
                + _behind(view),
            }
        if health.needs_resync(view):
            found[("resync", disk_id)] = {
                "severity": "warning",
                "message": f"{where} needs a resync",
            }
        found.update(_journal_conditions(disks[disk_id], disk_id, where))
    return found


def _journal_conditions(disk: dict[str, Any], disk_id: str, where: str) -> Conditions:
    """``journal``: the master target's recovery journal lost points its policy would keep."""
    journal = (disk.get("master_target_report") or {}).get("journal") or {}
    cut = journal.get("cut_short")
    if not journal.get("enabled") or not isinstance(cut, dict):
        return {}
    oldest = journal.get("oldest_t0_wall")
    since = (
        f"; the oldest point left is from {iso(oldest)}" if isinstance(oldest, int | float) else ""
    )
    return {("journal", disk_id): {
        "severity": "warning",
        "message": f"{where}: the recovery journal keeps fewer points than its policy asks "
                   f"({str(cut.get('reason'))[:120]}){since}; raise journal_budget_mib",
    }}  # fmt: skip


def _behind(view: dict[str, Any]) -> str:
    """Where the lag is, when the target lags what the process server holds (RPO is applied)."""
    shipped = view.get("shipped_rpo_s")
    if view.get("applied_rpo_s") is None or not isinstance(shipped, int | float):
        return ""
    return (f" (the newest point the master target applied; the process server holds one "
            f"{shipped:.0f} s old)")  # fmt: skip


def _alert_id(kind: str, subject: str, n: int) -> str:
    return f"{kind}.{subject}.{n:06d}"


def _reconcile(ctx: Context, tenant: str, conditions: Conditions, now: float) -> tuple[int, int]:
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    alert: dict[str, Any] | None
    for alert in ctx.store.partition("alerts", tenant):
        key = (alert["kind"], alert["subject"])
        if key not in latest or alert["n"] > latest[key]["n"]:
            latest[key] = alert
    raised = cleared = 0
    for key, condition in conditions.items():
        alert = latest.get(key)
        if alert and alert["cleared_at"] is None:
            if (alert["severity"], alert["message"]) != (
                condition["severity"],
                condition["message"],
            ):
                _update(ctx, tenant, alert["id"], condition, now)
            continue
        n = alert["n"] + 1 if alert else 1
        record = {
            "id": _alert_id(*key, n), "kind": key[0], "subject": key[1], "n": n,
            "severity": condition["severity"], "message": condition["message"],
            "raised_at": now, "updated_at": now, "cleared_at": None,
        }  # fmt: skip
        if ctx.store.create("alerts", tenant, record["id"], record):
            raised += 1
    for key, alert in latest.items():
        if alert["cleared_at"] is None and key not in conditions:
            _clear(ctx, tenant, alert["id"], now)
            cleared += 1
    return raised, cleared


def _update(ctx: Context, tenant: str, alert_id: str, condition: dict[str, Any], now: float):
    def change(alert: dict[str, Any]) -> dict[str, Any] | None:
        if alert["cleared_at"] is not None:
            return None
        alert.update(condition, updated_at=now)
        return alert

    ctx.store.mutate("alerts", tenant, alert_id, change)


def _clear(ctx: Context, tenant: str, alert_id: str, now: float) -> None:
    def change(alert: dict[str, Any]) -> dict[str, Any] | None:
        if alert["cleared_at"] is not None:
            return None
        alert["cleared_at"] = now
        alert["updated_at"] = now
        return alert

    ctx.store.mutate("alerts", tenant, alert_id, change)


def _prune(ctx: Context, tenant: str, now: float) -> None:
    """Drop cleared alerts past ALERTS_KEPT_SECONDS and recovery points past RECOVERY_POINTS_KEPT."""
    for alert in ctx.store.partition("alerts", tenant):
        cleared = alert.get("cleared_at")
        if cleared is not None and now - cleared > defaults.ALERTS_KEPT_SECONDS:
            ctx.store.delete("alerts", tenant, alert["id"])
    keep = defaults.RECOVERY_POINTS_KEPT
    for disk in ctx.store.partition("disks", tenant):
        if disk.get("recovery_points", 0) <= keep + keep // 10:
            continue
        rows = ctx.store.range_keys("recoverypoints", tenant, f"{disk['disk']}|")
        rows = sorted(rows, key=lambda kv: (kv[1]["gen"], kv[1]["seq"]), reverse=True)
        for row_key, _ in rows[keep:]:
            ctx.store.delete("recoverypoints", tenant, row_key)
        count = min(len(rows), keep)
        ctx.store.mutate("disks", tenant, disk["disk"], partial(_counted, count))


def _counted(count: int, disk: dict[str, Any]) -> dict[str, Any]:
    """``disk`` keeping ``count`` recovery points."""
    return {**disk, "recovery_points": count}


def list_alerts(ctx: Context, caller: Caller, tenant: str, params: Mapping[str, str]):
    """The tenant's alerts, newest first (``open=true``: only those not cleared)."""
    require_operator(caller, tenant)
    only_open = validate.query_bool(params, "open")
    alerts = ctx.store.partition("alerts", tenant)
    if only_open:
        alerts = [a for a in alerts if a["cleared_at"] is None]
    alerts.sort(key=lambda a: (a["raised_at"], a["id"]), reverse=True)
    fields = ("id", "kind", "severity", "subject", "message", "raised_at", "cleared_at",
              "acknowledged_at", "acknowledged_by")  # fmt: skip
    return {"alerts": [{k: a.get(k) for k in fields} for a in alerts]}


def acknowledge(ctx: Context, caller: Caller, tenant: str, alert_id: str, body: Any):
    """An operator has seen an alert: record when and by whom (``{by?}``); answers ``{alert}``.

    Acknowledging changes nothing else: the alert still clears when its
    condition ends.  A second acknowledgement keeps the first.
    """
    require_operator(caller, tenant)
    body = validate.body_object(body or {}, {"by"})
    by = validate.text(body, "by", limit=200) or "operator"
    if not ALERT_ID_RE.match(alert_id or ""):
        raise NotFound(f"alert {alert_id[:80]!r} does not exist")
    now = ctx.now()

    def change(alert: dict[str, Any]) -> dict[str, Any] | None:
        if alert.get("acknowledged_at"):
            return None
        return {**alert, "acknowledged_at": now, "acknowledged_by": by}

    alert = ctx.store.mutate("alerts", tenant, alert_id, change, what=f"alert {alert_id}")
    if alert.get("acknowledged_at") == now:  # this request acknowledged it: record the action
        from functions.core import jobs

        jobs.record_action(ctx, tenant, "acknowledge", f"alert {alert_id} acknowledged by {by}")
    return {"alert": alert}


ALERT_ID_RE = re.compile(r"^[a-z-]{1,20}\.[a-z0-9.|-]{1,120}\.[0-9]{1,12}$")
"""An alert id: ``<kind>.<subject>.<n>``."""
