"""One run of the agent with fixed settings: tracker, shipper, replicator, control socket.

The TOML path runs one session until it is stopped; the server mode
(:mod:`agent.managed`) replaces its session when a ``protect`` command
changes the settings.  Every start of a session asks for a resync of each
disk (invariant 4: an agent start is lost tracking).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from agent import defaults
from agent.control import ControlServer
from agent.replicator import DiskState, Replicator
from agent.settings import Settings
from agent.shipper import Shipper
from agent.tracker import DiskTrack, choose
from ferry.blockio import DirectReader, is_block_device
from ferry.durable import write_json
from ferry.errors import DeviceError

log = logging.getLogger("ferry.agent")


def find_mountpoint(device: str) -> str | None:
    """The mount point of the filesystem on ``device`` (per /proc/self/mountinfo), if any."""
    if not is_block_device(device):
        return None
    rdev = os.stat(device).st_rdev
    wanted = f"{os.major(rdev)}:{os.minor(rdev)}"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 4 and fields[2] == wanted:
            return fields[4].replace("\\040", " ")
    return None


def open_disks(settings: Settings) -> list[DiskState]:
    """Check every disk and build its state; DeviceError names the first bad one."""
    states = []
    for disk in settings.disks:
        if not os.path.exists(disk.device):
            raise DeviceError(device=disk.device, problem="no such device or file")
        reader = DirectReader(disk.device, settings.block_size)
        size = reader.size
        reader.close()
        if size == 0:
            raise DeviceError(device=disk.device, problem="it is empty (0 bytes)")
        track = DiskTrack(disk.id, disk.device, size, settings.block_size)
        states.append(DiskState(track, disk.mountpoint or find_mountpoint(disk.device)))
    return states


class Session:
    """Replication of the disks in ``settings``; :meth:`start`, then :meth:`close`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_dir = Path(settings.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        disks = open_disks(settings)
        self.tracker = choose(
            settings.tracker,
            [d.track for d in disks],
            defaults.TRACEFS,
            f"ferry-{settings.machine}-{os.getpid()}",
            settings.trace_buffer_kb,
        )
        log.info("tracking %s with %s", ", ".join(d.id for d in disks), self.tracker.description)
        try:
            self.shipper = Shipper(
                settings.address,
                settings.server_name or settings.address[0],
                settings.ca,
                settings.cert,
                settings.key,
                {
                    "tenant": settings.tenant,
                    "machine": settings.machine,
                    "disks": [d.id for d in disks],
                },
                settings.window,
            )
            self.replicator = Replicator(settings, self.tracker, self.shipper, disks)
            self.control = ControlServer(
                settings.control_socket or str(self.state_dir / "agent.sock"), self.replicator
            )
        except BaseException:
            self.tracker.close()
            raise
        self.worker = threading.Thread(target=self.replicator.run, name="replicator", daemon=True)

    def start(self) -> Session:
        """Connect, serve the control socket and start the read passes."""
        self.shipper.start()
        self.control.start()
        self.worker.start()
        return self

    @property
    def alive(self) -> bool:
        """True while the replicator thread runs."""
        return self.worker is not None and self.worker.is_alive()

    def status(self) -> dict[str, Any]:
        """The replicator's status (see Replicator.status)."""
        return self.replicator.status()

    def write_status(self) -> None:
        """Rewrite ``status.json`` in the state directory."""
        write_json(self.state_dir / "status.json", self.status(), durable=False)

    def close(self) -> None:
        """Stop the passes, the socket, the connection and the tracker; write the last status."""
        self.replicator.stop.set()
        if self.worker is not None and self.worker.ident is not None:
            self.worker.join(timeout=30)
        if self.control is not None:
            self.control.close()
        if self.shipper is not None:
            self.shipper.close()
        self.tracker.close()
        self.write_status()
