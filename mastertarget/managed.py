"""The master target in server mode: disks, storage grant and commands from the configuration server.

``python -m mastertarget --server-credentials FILE`` loads the credentials
written at registration, fetches its settings (``tenant``, ``disks``,
``lease_seconds``; the state directory and segment key are local) and its
storage grant, and serves every listed disk.  A disk listed without a
``target`` is applied to ``<targets-dir>/<disk>.img`` (a sparse image;
``--targets-dir`` defaults to ``<state_dir>/targets``).  A lease held by
another master target is waited for (the server moved the disk here).

Reports: every applied tag as a recovery point, and each disk's applied
state (``gen``, ``applied_seq``, ``last_tag``, ``resync_required_gen`` …)
every few seconds.  Commands (a master target serves many machines, so a
machine's command never stops it):

| command | effect |
|---|---|
| ``protect`` | renew the grant, fetch the settings again, serve newly listed disks |
| ``drain`` | done at once: every whole group that arrives is applied anyway |
| ``stop`` | exit cleanly after the group in hand, unless it names a machine |
| ``rotate-credentials`` | switch to the new token and save it in the credentials file |
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from ferry import __version__, segment
from ferry.control.credentials import Credentials
from ferry.control.daemon import ManagedDaemon, start_up
from ferry.control.errors import CommandFailed
from ferry.control.reporting import Reporter
from ferry.process import StopFlag
from ferry.storage import Storage
from mastertarget import defaults
from mastertarget.service import Service
from mastertarget.settings import Settings

log = logging.getLogger("ferry.mastertarget")

REPORTED = (
    "gen",
    "applied_seq",
    "last_tag",
    "applied_at",
    "staged",
    "staged_bytes",
    "resync_required_gen",
    "reason",
    "bytes_applied",
    "fenced",
    "held",
)
"""The fields of a disk's state (see mastertarget.worker) sent in its report."""


class ManagedMasterTarget(ManagedDaemon):
    """One master target run as the configuration server directs."""

    kind = "master-target"

    def __init__(
        self,
        credentials: Credentials,
        local: dict[str, Any],
        targets: Path,
        stop: StopFlag,
        credentials_path: str | None = None,
    ) -> None:
        super().__init__(credentials, local, stop, credentials_path, Settings, self._adapt)
        self.targets = targets
        self.state_dir = Path(local["state_dir"])
        self.service: Service | None = None
        self.reporter = Reporter(self.client, self.metrics)
        self._lock = threading.Lock()
        self._storage: Storage | None = None
        self._key: bytes | None = None

    def _adapt(self, raw: dict[str, Any]) -> dict[str, Any]:
        raw.setdefault("tenant", self.credentials.tenant)
        disks = raw.get("disks")
        if isinstance(disks, list):
            raw["disks"] = [self._with_target(d) for d in disks]
        return raw

    def _with_target(self, disk: Any) -> Any:
        if isinstance(disk, dict) and isinstance(disk.get("id"), str) and not disk.get("target"):
            return {**disk, "target": str(self.targets / f"{disk['id']}.img")}
        return disk

    # -- life ---------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until a stop (signal or ``stop`` command) or a disk fails; the exit status."""
        event: threading.Event = self.stop.event
        self.state_dir.mkdir(parents=True, exist_ok=True)
        started = start_up(self.client, self.source, event)
        if started is None:
            return 0
        self._storage, raw = started
        self._serve_listed(raw)
        with self.control_threads(self._storage, self.state_dir, self.reporter):
            while not event.wait(0.5):
                service = self.service
                if service is not None and service.failed.is_set():
                    break
            service = self.service
            if service is not None:
                return service.run(until_idle=False)  # stops the disks, raises a disk's error
        return 0

    def _serve_listed(self, raw: dict[str, Any] | None) -> list[str]:
        """Start serving the disks ``raw`` lists that are not served yet; their ids."""
        if not raw or not raw.get("disks"):
            log.info("no disks are assigned to this master target yet; waiting for protect")
            return []
        settings = self.source.build(raw)
        with self._lock:
            if self.service is None:
                if self._key is None and settings.segment_key_file:
                    self._key = segment.load_key(settings.segment_key_file)
                storage = self._granted()
                self.service = Service(
                    settings,
                    lambda: storage,
                    self._key,
                    self.stop.event,
                    wait=True,
                    on_applied=self.reporter.recovery_point,
                )
            for disk in settings.disks:
                # An image file the server placed in a directory not made yet.
                if not os.path.exists(disk.target):
                    Path(disk.target).parent.mkdir(parents=True, exist_ok=True)
            added = [d.id for d in settings.disks if self.service.add(settings, d)]
        if added:
            log.info("serving %s", ", ".join(added))
        return added

    def _granted(self) -> Storage:
        """The storage of the grant; it is fetched at start, before disks or commands."""
        if self._storage is None:
            raise CommandFailed(detail="the master target has not started yet")
        return self._storage

    # -- commands -----------------------------------------------------------------------

    def commands(self) -> dict[str, Any]:
        """The master target's own command handlers (stop and rotation: ManagedDaemon's)."""
        return {"protect": self.cmd_protect, "drain": self.cmd_drain}

    def cmd_protect(self, _args: dict[str, Any]) -> str:
        """Fetch the settings again and serve newly listed disks (the grant is renewed first)."""
        self._granted().renew_grant()
        added = self._serve_listed(self.source.fetch_raw())
        served = self.service.serving() if self.service else []
        if added:
            return f"now serving {', '.join(added)}"
        return f"already serving {', '.join(served)}" if served else "no disks assigned"

    def cmd_drain(self, args: dict[str, Any]) -> str:
        """Nothing to hold back: whole groups are applied as they arrive."""
        return f"applying every whole group of {args.get('machine') or 'every disk'} as it arrives"

    # -- reports ------------------------------------------------------------------------

    def heartbeat(self) -> dict[str, Any]:
        """The status sent with each heartbeat."""
        service = self.service
        disks = service.board.snapshot() if service else {}
        return {
            "version": __version__,
            "state": "serving" if service else "waiting-for-protect",
            "disks": sorted(service.serving()) if service else [],
            "resync_required": sorted(
                d for d, s in disks.items() if s.get("resync_required_gen") is not None
            ),
        }

    def metrics(self) -> dict[str, dict[str, Any]]:
        """Each served disk's applied state, as its report."""
        service = self.service
        if service is None:
            return {}
        return {
            disk: {k: state.get(k) for k in REPORTED}
            for disk, state in service.board.snapshot().items()
        }


def run(credentials_path: str, local: dict[str, Any], targets: str | None, stop: StopFlag) -> int:
    """Server mode's entry: load the credentials and serve."""
    where = Path(targets) if targets else Path(local["state_dir"]) / defaults.TARGETS_SUBDIR
    return ManagedMasterTarget.serve(credentials_path, local, stop, targets=where)
