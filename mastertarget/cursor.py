"""The cursor: what a disk's target durably holds, ``<state_dir>/<disk>/cursor.json``.

Example::

    {"tenant": "demo", "disk": "web01-disk0", "gen": 3, "applied_seq": 17,
     "last_tag": {"id": "3-17", "kind": "crash", "t0_wall": 1795671234.125, ...},
     "applied_at": 1795671240.5, "bytes_applied": 1048576,
     "resync_request": "b9f0...", "resync_inserted_at": 1795671200.0,
     "resync_required_gen": null, "reason": null}

The cursor is written with :func:`ferry.durable.write_json` (temporary file,
fsync, rename, fsync of the directory): a crash leaves the old or the new
cursor, never a torn one.  ``resync_request`` names the request that started
``gen``, so a crash between the cursor and the answer blob reuses the
generation instead of starting another one; ``resync_inserted_at`` (when the
queue took that request) makes a request queued before it, delivered late,
recognisably stale.  ``fenced`` is set, in the same
write as the cursor that reached it, when the disk's final tag (a cutover) is
applied: from then on the disk is never served again, unless an operator
resumes replication of a cutover that was not committed (``resumed``: the
final tag it names fences no more; mastertarget/cutover.py ``resume``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ferry import durable
from mastertarget.errors import CursorUnreadable


@dataclasses.dataclass
class Cursor:
    """A disk's applied position plus the few facts that must survive a restart."""

    tenant: str
    disk: str
    gen: int = 0
    applied_seq: int = 0
    last_tag: dict[str, Any] | None = None
    applied_at: float | None = None
    bytes_applied: int = 0
    resync_request: str | None = None
    resync_inserted_at: float | None = None
    """When the queue took the notice of ``resync_request`` (the queue service's clock)."""
    resync_required_gen: int | None = None
    reason: str | None = None
    fenced: dict[str, Any] | None = None
    """Set once the disk is fenced (a cutover): ``{"tag", "reason", "at"}``; nothing is applied after."""
    resumed: dict[str, Any] | None = None
    """Set when an operator resumed replication after a cutover that was not committed:
    ``{"tag", "reason", "at"}`` (``tag``: the id of the final tag that no longer fences)."""

    def is_stale(self, gen: int, seq: int) -> bool:
        """True when batch (gen, seq) is already applied or belongs to a finished generation."""
        return gen < self.gen or (gen == self.gen and seq <= self.applied_seq)


_INTS = ("gen", "applied_seq", "bytes_applied")


def load(path: Path, tenant: str, disk: str) -> Cursor:
    """Read the cursor at ``path``; a fresh one (gen 0) if absent; CursorUnreadable if bad."""
    try:
        raw = durable.read_json(path)
    except (OSError, ValueError) as exc:
        raise CursorUnreadable(path=path, problem=str(exc))
    if raw is None:
        return Cursor(tenant=tenant, disk=disk)
    if not isinstance(raw, dict):
        raise CursorUnreadable(path=path, problem="not a JSON object")
    known = {f.name for f in dataclasses.fields(Cursor)}
    try:
        cursor = Cursor(**{k: v for k, v in raw.items() if k in known})
    except TypeError as exc:
        raise CursorUnreadable(path=path, problem=str(exc))
    problem = _problem(cursor, tenant, disk)
    if problem:
        raise CursorUnreadable(path=path, problem=problem)
    return cursor


def peek(path: Path) -> dict[str, Any]:
    """The cursor at ``path`` as saved, for readers that do not serve the disk (the cutover
    tool, recovery points): ``{}`` before anything was applied; CursorUnreadable if bad.

    Read without the disk's locks: the cursor is replaced whole (durable.write_json),
    so a reader sees one saved cursor or the next (docs/design.md, "Read ordering").
    """
    try:
        raw = durable.read_json(path)
    except (OSError, ValueError) as exc:
        raise CursorUnreadable(path=path, problem=str(exc))
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CursorUnreadable(path=path, problem="not a JSON object")
    return raw


def _problem(cursor: Cursor, tenant: str, disk: str) -> str | None:
    # A state directory copied from another disk would make us skip or replay
    # the wrong batches: refuse it rather than guess.
    if (cursor.tenant, cursor.disk) != (tenant, disk):
        return f"it belongs to {cursor.tenant}/{cursor.disk}, not {tenant}/{disk}"
    for name in _INTS:
        value = getattr(cursor, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"{name} must be a non-negative integer, not {value!r}"
    return None


def save(path: Path, cursor: Cursor) -> None:
    """Write ``cursor`` durably; when this returns it survives a crash."""
    durable.write_json(path, dataclasses.asdict(cursor))
