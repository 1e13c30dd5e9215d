"""Where the master target keeps each disk's state on its host (one owner of the layout).

``<state_dir>/<disk>/`` holds ``lock`` (held while the disk is served), ``cursor.json`` (the durable cursor,
mastertarget/cursor.py), ``staging/`` (verified segments waiting for their
group, mastertarget/staging.py), ``apply.lock`` (mastertarget/applylock.py) and,
while groups are being applied, ``applying.json`` (the target may be between two tags),
and ``journal/`` (undo records of older recovery points, mastertarget/journal.py).
The worker and the cutover tool both find them here.
"""

from __future__ import annotations

from pathlib import Path

STATE_LOCK = "lock"
"""Name of the state lock in a disk's state directory (see :func:`state_lock_path`)."""


def disk_dir(state_dir: str | Path, disk: str) -> Path:
    """The directory of one disk's state."""
    return Path(state_dir) / disk


def state_lock_path(state_dir: str | Path, disk: str) -> Path:
    """``flock``ed by the process serving the disk (mastertarget/ownership.py) for as long as
    it serves it, and by whatever changes the disk's state while nothing serves it."""
    return disk_dir(state_dir, disk) / STATE_LOCK


def cursor_path(state_dir: str | Path, disk: str) -> Path:
    """The disk's durable cursor."""
    return disk_dir(state_dir, disk) / "cursor.json"


def staging_dir(state_dir: str | Path, disk: str) -> Path:
    """The disk's staged segments."""
    return disk_dir(state_dir, disk) / "staging"


def apply_lock_path(state_dir: str | Path, disk: str) -> Path:
    """The lock held while a group is applied, and by whoever holds applying (test failover)."""
    return disk_dir(state_dir, disk) / "apply.lock"


def applying_path(state_dir: str | Path, disk: str) -> Path:
    """Present (durably) from before a group's first write until the cursor is past it: the
    target may be torn, and a copy of it is no recovery point."""
    return disk_dir(state_dir, disk) / "applying.json"


def journal_dir(state_dir: str | Path, disk: str) -> Path:
    """The disk's recovery journal: undo records back to older points (mastertarget/journal.py)."""
    return disk_dir(state_dir, disk) / "journal"
