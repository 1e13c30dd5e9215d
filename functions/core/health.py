"""How healthy a disk, machine or process server is: the rules shared by status and alerts.

A disk record keeps the latest report of each reporter (``agent_report``,
``master_target_report``); the agent knows the phase, bytes to go, backlog,
throughput and RPO, the master target knows what it applied.  Health, worst
first: ``lost`` (the machine's agent sent no heartbeat for HEARTBEAT_TTL),
``resync`` (a disk waits for or needs a resync), ``lagging`` (a disk's RPO
is over its machine's threshold), ``ok``.

RPO is measured from what the target holds: ``rpo_s`` is the age of the
newest tag the master target *applied* (its report's ``last_tag``), aged
on the server's clock at the moment the status is read, so a master target
that is stuck, held or gone shows an RPO that grows.  The agent's own
figure, the age of its newest tag the process server holds durably, is
``shipped_rpo_s``; the difference is what waits between the process server
and the target.  The tag's time is the agent's clock: the agent's last
report says how far its clock is from the server's, and that offset is
taken off.
"""

from __future__ import annotations

from typing import Any

from functions.core import defaults

RANK = {"ok": 0, "lagging": 1, "resync": 2, "lost": 3}
"""Health values, worst last."""

VIEW_FIELDS = (
    "phase", "gen", "bytes_to_go", "backlog", "throughput", "rpo_s", "last_tag", "applied_seq",
)  # fmt: skip


def disk_view(record: dict[str, Any], threshold: float, now: float | None = None) -> dict[str, Any]:
    """A disk as the status shows it: the reports merged, and its health (``now``: server time)."""
    agent = record.get("agent_report") or {}
    target = record.get("master_target_report") or {}
    view: dict[str, Any] = {"disk": record["disk"]}
    for field in VIEW_FIELDS:
        first, second = (
            (target, agent)
            if field in ("gen", "applied_seq", "last_tag")
            else (
                agent,
                target,
            )
        )
        view[field] = first.get(field, second.get(field))
    if view["phase"] is None:
        view["phase"] = record.get("state")
    view["size"] = record.get("size")
    view["resync_required_gen"] = target.get("resync_required_gen")
    view["fenced"] = target.get("fenced")
    view["shipped_rpo_s"] = view["rpo_s"]
    applied = applied_rpo(agent, target, now)
    view["applied_rpo_s"] = applied
    if applied is not None:
        view["rpo_s"] = applied
    view["verify"] = target.get("verify")
    if view["fenced"]:
        view["phase"] = "fenced"  # cut over: the master target applies nothing more
    view["health"] = disk_health(view, threshold)
    return view


def applied_rpo(agent: dict[str, Any], target: dict[str, Any], now: float | None) -> float | None:
    """Seconds since the source time of the newest tag the master target applied, or None.

    ``now`` is the server's clock; the agent's report (its ``rpo_s`` against
    its tag's ``t0_wall``, received at ``reported_at``) gives the offset of
    the agent's clock, in which tags are stamped.
    """
    tag = target.get("last_tag")
    t0 = _number(tag.get("t0_wall")) if isinstance(tag, dict) else None
    if now is None or t0 is None:
        return None
    offset = 0.0
    agent_tag = agent.get("last_tag")
    agent_t0 = agent_tag.get("t0_wall") if isinstance(agent_tag, dict) else None
    parts = [_number(agent_t0), _number(agent.get("rpo_s")), _number(agent.get("reported_at"))]
    if all(p is not None for p in parts):
        sent_t0, sent_rpo, received = parts
        offset = (sent_t0 + sent_rpo) - received  # type: ignore[operator]  # agent ahead by this
    return round(max(0.0, now + offset - t0), 1)


def needs_resync(view: dict[str, Any]) -> bool:
    """True when the disk waits for a resync or the master target asked for one."""
    return view.get("phase") == "resync-wait" or view.get("resync_required_gen") is not None


def over_rpo(view: dict[str, Any], threshold: float) -> bool:
    """True when the disk's reported RPO is over ``threshold`` seconds."""
    rpo = view.get("rpo_s")
    return isinstance(rpo, int | float) and rpo > threshold


def disk_health(view: dict[str, Any], threshold: float) -> str:
    """``resync``, ``lagging`` or ``ok``."""
    if needs_resync(view):
        return "resync"
    if over_rpo(view, threshold):
        return "lagging"
    return "ok"


def machine_health(agent_state: str | None, disk_views: list[dict[str, Any]]) -> str:
    """The worst of the machine's disks, or ``lost`` when its agent is lost."""
    if agent_state == "lost":
        return "lost"
    worst = "ok"
    for view in disk_views:
        if RANK[view["health"]] > RANK[worst]:
            worst = view["health"]
    return worst


def is_lost(component: dict[str, Any], now: float) -> bool:
    """True when a component that has sent heartbeats sent none for HEARTBEAT_TTL seconds."""
    last = component.get("last_heartbeat")
    return last is not None and now - last > defaults.HEARTBEAT_TTL


def spool_free(status: dict[str, Any] | None) -> float | None:
    """Free fraction of a process server's spool from its heartbeat status, or None.

    The smaller of what ``status.spool`` reports: ``free_fraction`` (of the
    configured limit); ``free_bytes``/``total_bytes`` and
    ``fs_free_bytes``/``fs_total_bytes`` (the spool's filesystem, which may
    fill before the limit is reached); ``bytes``/``limit_bytes`` (used
    against the configured limit).
    """
    spool = (status or {}).get("spool")
    if not isinstance(spool, dict):
        return None
    found = []
    value = _number(spool.get("free_fraction"))
    if value is not None:
        found.append(value)
    for free_key, total_key, inverted in (
        ("free_bytes", "total_bytes", False), ("fs_free_bytes", "fs_total_bytes", False),
        ("bytes", "limit_bytes", True),
    ):  # fmt: skip
        part, total = _number(spool.get(free_key)), _number(spool.get(total_key))
        if part is not None and total is not None and total > 0:
            fraction = part / total
            found.append(1 - fraction if inverted else fraction)
    return max(0.0, min(1.0, min(found))) if found else None


def _number(value: Any) -> float | None:
    """``value`` as a float if it is a JSON number (not a boolean), else None."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def spool_severity(free: float | None) -> str | None:
    """``critical`` under 25% free, ``warning`` under 30%, else None."""
    if free is None:
        return None
    if free < defaults.SPOOL_CRITICAL_FREE:
        return "critical"
    if free < defaults.SPOOL_WARNING_FREE:
        return "warning"
    return None
