"""One run of the agent with fixed settings: tracker, shipper, replicator, control socket.

The TOML path runs one session until it is stopped; the server mode
(:mod:`agent.managed`) replaces its session when a ``protect`` command
changes the settings.  Every start of a session asks for a resync of each
disk (invariant 4: an agent start is lost tracking).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from agent import defaults, restart, state
from agent.control import ControlServer
from agent.disks import check_whole_disk, identity
from agent.replicator import DiskState, Replicator
from agent.settings import Settings
from agent.shipper import Shipper
from agent.tracefs import remove_instance, remove_stale_instances
from agent.tracker import DiskTrack, TraceTracker, choose
from ferry import agentsocket
from ferry.blockio import DirectReader
from ferry.durable import write_json
from ferry.errors import DeviceError

log = logging.getLogger("ferry.agent")


def open_disks(settings: Settings, state_dir: Path) -> list[DiskState]:
    """Check every disk and build its state; DeviceError names the first bad one.

    A partition or volume is refused (Ferry protects whole disks).  A device
    whose identity differs from the one recorded at first protection is kept
    in phase ``identity-mismatch``: nothing of it is read or shipped.
    """
    states = []
    for disk in settings.disks:
        if not os.path.exists(disk.device):
            raise DeviceError(device=disk.device, problem="no such device or file")
        check_whole_disk(disk.device)
        reader = DirectReader(disk.device, settings.block_size)
        size = reader.size
        reader.close()
        if size == 0:
            raise DeviceError(device=disk.device, problem="it is empty (0 bytes)")
        track = DiskTrack(disk.id, disk.device, size, settings.block_size)
        recorded, problem = state.check_identity(
            state_dir, disk.id, disk.device, identity(disk.device), size
        )
        disk_state = DiskState(track, disk.mountpoint, identity=recorded, problem=problem)
        if problem:
            disk_state.phase = "identity-mismatch"
            log.error("disk %s: refused: %s", disk.id, problem)
        states.append(disk_state)
    return states


class Session:
    """Replication of the disks in ``settings``; :meth:`start`, then :meth:`close`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_dir = Path(settings.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        disks = open_disks(settings, self.state_dir)
        records = {d.id: state.take_stop(self.state_dir, d.id) for d in disks}
        adopt = self._restore_maps(disks, records)
        if settings.tracker != "scan":  # instances left by agents that were killed and forgotten
            remove_stale_instances(defaults.TRACEFS, keep=adopt)
        self.tracker = choose(
            settings.tracker,
            [d.track for d in disks],
            defaults.TRACEFS,
            adopt or f"ferry-{settings.machine}-{os.getpid()}",
            settings.trace_buffer_kb,
            adopt=adopt is not None,
        )
        log.info("tracking %s with %s", ", ".join(d.id for d in disks), self.tracker.description)
        self._resume(disks, records)
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
            for disk in disks:  # a resumed disk's last batches go before anything new
                self.shipper.preload(disk.resend)
                disk.resend = []
            self.replicator = Replicator(settings, self.tracker, self.shipper, disks)
            self.control = ControlServer(
                settings.control_socket or agentsocket.path_in(self.state_dir), self.replicator
            )
        except BaseException:
            self.tracker.close()
            raise
        self.worker = threading.Thread(target=self.replicator.run, name="replicator", daemon=True)

    def _restore_maps(self, disks: list[DiskState], records: dict) -> str | None:
        """Load the dirty maps of an orderly stop; return the trace instance to adopt.

        The maps are in place before tracking resumes, so the events the
        adopted instance recorded while the agent was down land in them.
        """
        adopt = None
        for disk in disks:
            rec = records[disk.id]
            if restart.usable(rec, disk, self.settings.block_size) is None:
                disk.track.dirty = state.bitmap_from(rec["dirty"])
                adopt = adopt or rec.get("instance")
        return adopt

    def _resume(self, disks: list[DiskState], records: dict) -> None:
        """Resume each disk whose record proves nothing escaped tracking; the others resync."""
        mine = getattr(getattr(self.tracker, "instance", None), "path", None)
        for rec in records.values():  # an instance left for us that we did not adopt
            if rec and rec.get("instance") and (mine is None or rec["instance"] != mine.name):
                remove_instance(defaults.TRACEFS, rec["instance"])
        for disk in disks:
            rec = records[disk.id]
            why = restart.usable(rec, disk, self.settings.block_size)
            if why is None and self.tracker.kind != "tracefs":
                why = f"the {self.tracker.kind} tracker keeps no map across restarts"
            if why is None:
                why = restart.unseen_writes(rec, disk, self.tracker)
            if why is not None:
                disk.start_reason = f"agent start: {why}"
                continue
            disk.gen, disk.next_seq, disk.last_tag = rec["gen"], rec["next_seq"], rec["last_tag"]
            disk.target_zero = state.bitmap_from(rec["target_zero"])
            disk.phase, disk.start_reason = rec["phase"], "resumed"
            disk.resend = [b for b in rec["batches"] if b.gen == disk.gen]
            log.info(
                "disk %s: resumed generation %d at seq %d with %d dirty blocks and %d batches "
                "to send again (no resync)", disk.id, disk.gen, disk.next_seq,
                self.tracker.dirty_count(disk.id), len(disk.resend),
            )  # fmt: skip

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

    def close(self, hand_over: bool = True) -> None:
        """Stop the passes, the socket, the connection and the tracker; write the last status.

        An orderly stop (the replicator was running and stops at a pass
        boundary) hands tracking over to the next start (:mod:`agent.restart`)
        unless ``hand_over`` is False (the machine is no longer protected).
        """
        orderly = self.alive and hand_over
        self.replicator.halt()
        if self.worker is not None and self.worker.ident is not None:
            self.worker.join(timeout=5)
            if self.worker.is_alive():  # perhaps held in a send the peer no longer reads
                self.shipper.interrupt()
            self.worker.join(timeout=25)
            orderly = orderly and not self.worker.is_alive()
        if self.alive and hand_over and not orderly:
            log.warning("the replicator did not stop within 30 s; the next start resyncs; it was at:\n%s",
                        _stack_of(self.worker))  # fmt: skip
        if orderly:
            self._wait_acked()
        if self.control is not None:
            self.control.close()
        if self.shipper is not None:
            self.shipper.close()
        if not (orderly and self._hand_over()):
            self.tracker.close()
        self.write_status()

    def _wait_acked(self) -> None:
        # Fewer batches to keep and send again; at a reboot the network may be gone already.
        deadline = time.monotonic() + defaults.STOP_ACK_WAIT
        while self.shipper.unacked() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _hand_over(self) -> bool:
        """Leave the trace instance running and record each resumable disk; False if none.

        A disk's batches still unacknowledged (the process server or the
        network went first, as at a reboot) are recorded with it, verbatim:
        the next start sends them again, same seqs, before anything new.
        """
        disks = [
            d
            for d in self.replicator.disks.values()
            if d.gen is not None and d.request_id is None and d.phase in restart.RESUMABLE
        ]  # fmt: skip
        tracker = self.tracker
        if not isinstance(tracker, TraceTracker) or not disks:
            why = "no trace instance" if disks else "none replicating"
            log.info("stopped: no disk to resume at the next start (%s)", why)
            return False
        if any((d.last_tag or {}).get("final") for d in disks):
            return False  # cut over: the master target has fenced these disks for good
        if not tracker.detach():
            log.warning("tracking could not be handed over whole; the next start resyncs")
            return False
        kept = 0
        try:
            for disk in disks:
                unacked = self.shipper.pending(disk.id, disk.gen)
                kept += len(unacked)
                record = restart.record(disk, self.tracker)
                state.save_stop(self.state_dir, disk.id, record, unacked)
        except OSError as exc:
            log.error("cannot record the dirty maps (%s); the next start resyncs", exc)
            return False
        log.info(
            "stopped: %s resume at the next start (trace instance %s left running, "
            "%d unacknowledged batches kept to send again)",
            ", ".join(d.id for d in disks), tracker.instance.path, kept,
        )  # fmt: skip
        return True


def _stack_of(thread: threading.Thread | None) -> str:
    """Where ``thread`` is now (what kept a stop from handing over; the log says it)."""
    frame = sys._current_frames().get(thread.ident or 0) if thread is not None else None
    return "".join(traceback.format_stack(frame)) if frame is not None else "(gone)"
