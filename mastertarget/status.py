"""``<state_dir>/status.json``: what every disk of this master target is doing, for operators.

Example::

    {"component": "master-target", "pid": 4242, "updated_at": 1795671240.9,
     "disks": {"web01-disk0": {<the disk's state, as in its state blob>}}}

Written atomically (a reader never sees a torn file) but not fsync'ed: it is a
report, rebuilt from the cursors after a crash.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from ferry import durable


class StatusBoard:
    """Collects each disk's state and rewrites the status file; safe across threads."""

    def __init__(self, path: Path | None) -> None:
        self.path = Path(path) if path else None
        self._disks: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def update(self, disk: str, state: dict[str, Any]) -> None:
        """Record ``state`` for ``disk`` and rewrite the file."""
        with self._lock:
            self._disks[disk] = state
            self._write()

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """A copy of every disk's last recorded state."""
        with self._lock:
            return {disk: dict(state) for disk, state in self._disks.items()}

    def _write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "component": "master-target",
            "pid": os.getpid(),
            "updated_at": time.time(),
            "disks": self._disks,
        }
        durable.write_json(self.path, doc, durable=False)
