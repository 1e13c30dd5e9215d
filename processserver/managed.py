"""The process server in server mode: settings and storage grant from the configuration server.

``python -m processserver --server-credentials FILE`` loads the credentials
written at registration, fetches its settings (the keys of its TOML file
but the local ones: certificates, state directory, segment key) and its
storage grant (segments and control containers, the disks' queues), then
serves agents as with a settings file.  Its heartbeat carries the spool's
use as ``status.spool``: ``bytes``, ``files``, ``limit_bytes``,
``free_fraction`` (of the limit) and ``fs_free_bytes``/``fs_total_bytes``.

Commands (a process server serves many machines, so a machine's command
never stops it):

| command | effect |
|---|---|
| ``protect`` | renew the storage grant (a newly protected disk's queue is only in the next one) |
| ``drain`` | wait until every batch of ``args.machine`` spooled when it came is uploaded |
| ``stop`` | exit cleanly, unless it names a machine (then done, nothing stops) |
| ``rotate-credentials`` | switch to the new token and save it in the credentials file |
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from ferry import __version__, naming, segment
from ferry.control.credentials import Credentials
from ferry.control.daemon import ManagedDaemon, start_up
from ferry.control.errors import CommandFailed
from ferry.process import StopFlag
from processserver import defaults
from processserver.server import Server, tls_context
from processserver.settings import Settings

log = logging.getLogger("ferry.processserver")

DRAIN_TIMEOUT = 600.0
"""Longest a ``drain`` waits for a machine's spooled batches to be uploaded, in seconds."""

DRAIN_POLL = 0.5
"""How often a ``drain`` looks at the spool, in seconds."""


class ManagedProcessServer(ManagedDaemon):
    """One process server run as the configuration server directs."""

    kind = "process-server"

    def __init__(
        self,
        credentials: Credentials,
        local: dict[str, Any],
        stop: StopFlag,
        credentials_path: str | None = None,
    ) -> None:
        super().__init__(credentials, local, stop, credentials_path, Settings)
        self.local = local
        self.server: Server | None = None
        self._machines: dict[str, set[str]] = {}
        """Machine id → disk ids, learned from the agents' hellos (for drain)."""

    def run(self) -> int:
        """Serve until a stop (signal or ``stop`` command); returns the exit status."""
        event: threading.Event = self.stop.event
        started = start_up(self.client, self.source, event)
        if started is None:
            return 0
        storage, raw = started
        settings = self.source.build(raw or dict(self.local))
        key = segment.load_key(settings.segment_key_file)
        self.server = Server(settings, storage, tls_context(settings, self.source.source), key)
        self.server.start()
        try:
            with self.control_threads(storage, settings.state_dir):
                while not event.wait(1.0):
                    self._learn_machines()
        finally:
            log.info("stopping (a second signal exits at once)")
            self.server.stop(defaults.STOP_GRACE)
        return 0

    def commands(self) -> dict[str, Any]:
        """The process server's own command handlers (stop and rotation: ManagedDaemon's)."""
        return {"protect": self.cmd_protect, "drain": self.cmd_drain}

    # -- commands -----------------------------------------------------------------------

    def cmd_protect(self, _args: dict[str, Any]) -> str:
        """Renew the storage grant (newly protected disks' queues are only in the next one)
        and learn which machines and disks this process server now accepts."""
        server = self._started()
        server.ctx.storage.renew_grant()
        raw = self.source.fetch_raw()
        if raw is not None:
            fresh = self.source.build(raw)
            server.settings.agents = fresh.agents
        machines = ", ".join(sorted(server.settings.agents or {})) or "none"
        return f"storage grant renewed; accepting machines: {machines}"

    def cmd_drain(self, args: dict[str, Any]) -> str:
        """Wait until the batches of ``args.machine`` spooled now are uploaded and announced."""
        machine = args.get("machine")
        if not isinstance(machine, str):
            raise CommandFailed(detail="drain needs args.machine")
        self._learn_machines()
        disks = sorted(self._machines.get(machine, set()))
        pending = self._spooled(disks)
        deadline = time.monotonic() + float(args.get("timeout") or DRAIN_TIMEOUT)
        while pending:
            if time.monotonic() > deadline:
                raise CommandFailed(detail=f"{len(pending)} batches of {machine} still spooled")
            if self.stop.event.wait(DRAIN_POLL):
                raise CommandFailed(detail="the process server is stopping")
            pending = {p for p in pending if p.exists()}
        return f"nothing of {machine} left in the spool ({', '.join(disks) or 'no disks seen'})"

    def _started(self) -> Server:
        """The server; commands run only once it is started."""
        if self.server is None:
            raise CommandFailed(detail="the process server is not started yet")
        return self.server

    def _learn_machines(self) -> None:
        if self.server is None:
            return
        for peer in self.server.ctx.peers.live():
            machine = getattr(peer, "machine", None)
            if peer.tenant == self.credentials.tenant and machine:
                self._machines.setdefault(machine, set()).update(peer.disks)

    def _spooled(self, disks: list[str]) -> set[Path]:
        root = self._started().settings.spool_dir / self.credentials.tenant
        found: set[Path] = set()
        for disk in disks:
            if naming.check_id("disk", disk) is None:
                found.update((root / disk).glob("*.batch"))
        return found

    # -- reports ------------------------------------------------------------------------

    def heartbeat(self) -> dict[str, Any]:
        """The status sent with each heartbeat: spool use, agents, storage health, counters."""
        if self.server is None:
            return {"version": __version__, "state": "starting"}
        snap = self.server.status.snapshot()
        spool = dict(snap["spool"])
        spool["free_fraction"] = round(
            max(0.0, 1 - spool["bytes"] / max(1, spool["limit_bytes"])), 4
        )
        spool.update(_filesystem(self.server.settings.state_dir))
        return {
            "version": __version__,
            "state": "stopping" if snap["stopping"] else "running",
            "listen": snap["listen"],
            "spool": spool,
            "connections": snap["connections"],
            "machines": len({a.get("machine") for a in snap["agents"]}),
            "throttling": snap["throttling"],
            "storage_available": snap["storage_available"],
            "last_storage_error": snap["last_storage_error"],
            "upload_bytes_per_second": snap["upload_bytes_per_second"],
            "segments_uploaded": snap["segments_uploaded"],
            "batches_quarantined": snap["batches_quarantined"],
        }


def _filesystem(path: str) -> dict[str, Any]:
    """Free space of the spool's filesystem (the limit may be set above it)."""
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return {}
    return {"fs_free_bytes": usage.free, "fs_total_bytes": usage.total}


def run(credentials_path: str, local: dict[str, Any], stop: StopFlag) -> int:
    """Server mode's entry: load the credentials and serve."""
    return ManagedProcessServer.serve(credentials_path, local, stop)
