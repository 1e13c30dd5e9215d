"""Cheap restarts: carry the dirty map across an orderly stop when that is provably safe.

At an orderly stop (SIGTERM, ``stop``) the agent hands its tracking over to
its successor instead of throwing it away: it stops its trace reader (every
event it consumed is in the dirty map, every other one is still in the
instance's ring buffer), leaves the trace instance running, and records per
disk (:func:`agent.state.save_stop`) the dirty map, generation, next seq and
last tag, plus what tells its successor whether anything may have been
written unseen since: the instance, its lost-event count, the disk's write
counters and their epoch (the boot id), and the filesystems and swap that
were in use read-write.

At start, a disk resumes (no resync) only if one of these holds, checked
after the new tracker is running (see docs/design.md, "Restarts"):

1. its instance survived and was adopted, and lost no event meanwhile;
2. the same boot, and the disk's completed writes and discards
   (``/sys/block/<disk>/stat``) did not move since the stop;
3. a new boot, nothing on the disk was in use read-write at the stop, and
   the disk has completed no write since the boot.

Anything else (a crash, a record that cannot be read, another identity,
unacknowledged batches at the stop) means a resync, as on every start before.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from agent import state
from agent.disks import filesystems_on, stacked, sys_dir
from ferry.blockio import is_block_device

log = logging.getLogger("ferry.agent")

RESUMABLE = ("initial-sync", "resync", "replicating")
"""Phases a disk can resume in: it has a generation and a seq to go on from."""


def epoch() -> str:
    """What the disks' counters count from: this boot.

    A disk that goes and comes back within a boot may keep its counters (a
    loop device does) or start again from zero (a re-probed disk): either
    way a moved counter means a resync, so the boot is the epoch.
    """
    return state.boot_id()


def writes(device: str) -> int | None:
    """Writes and discards the disk has completed since it appeared (None if unknown)."""
    try:
        fields = (sys_dir(device) / "stat").read_text().split()
    except OSError:
        return None
    # Fields 0-3 are reads, 4-7 writes, 11-14 discards (Documentation/block/stat.rst).
    return int(fields[4]) + (int(fields[11]) if len(fields) > 11 else 0)


def in_use(device: str) -> list[str]:
    """Filesystems mounted read-write and swap areas on the disk, its partitions or volumes."""
    if not is_block_device(device):
        return ["an image file (its writes are not traced)"]
    used = [m.mountpoint for m in filesystems_on([device]) if m.read_write]
    names = stacked(device)
    try:
        swaps = Path("/proc/swaps").read_text().splitlines()[1:]
    except OSError:
        swaps = []
    for line in swaps:
        path = line.split()[0] if line.split() else ""
        if path.startswith("/dev/") and Path(os.path.realpath(path)).name in names:
            used.append(f"swap {path}")
    return used


def record(disk: Any, tracker: Any) -> dict[str, Any]:
    """What a successor needs to resume ``disk`` (a replicator DiskState) without a resync."""
    device = disk.track.device
    return {
        "identity": disk.identity,
        "size": disk.track.size,
        "block": disk.track.block,
        "phase": disk.phase,
        "gen": disk.gen,
        "next_seq": disk.next_seq,
        "last_tag": disk.last_tag,
        "dirty": state.bitmap_text(disk.track.dirty),
        "target_zero": state.bitmap_text(disk.target_zero),
        "instance": tracker.instance.path.name,
        "devs": sorted(tracker.by_dev),
        "lost_events": tracker.instance.lost_events(),
        "epoch": epoch(),
        "writes": writes(device),
        "in_use": in_use(device),
        "stopped_at": time.time(),
    }


def usable(rec: dict[str, Any] | None, disk: Any, block: int) -> str | None:
    """Why ``rec`` cannot describe ``disk`` at all (None if it can)."""
    if rec is None:
        return "no record of an orderly stop (a first start or a crash)"
    if rec.get("unreadable"):
        return "its stop record could not be read"
    if disk.problem:
        return disk.problem
    if rec.get("identity") != disk.identity or rec.get("size") != disk.track.size:
        return "the record is of another disk"
    if rec.get("block") != block or rec.get("phase") not in RESUMABLE or rec.get("gen") is None:
        return "the record cannot be resumed (block size or phase)"
    return None


def unseen_writes(rec: dict[str, Any], disk: Any, tracker: Any) -> str | None:
    """Why writes may have escaped tracking since the stop (None: none can have).

    Called once the new tracker runs: a write completed before it started
    shows in the counters read here; one completed after is tracked.
    """
    device = disk.track.device
    if getattr(tracker, "adopted", False) and tracker.instance.path.name == rec["instance"]:
        if tracker.instance.lost_events() > rec["lost_events"]:
            return "trace events were lost while the agent was down"
        return None
    now = writes(device)
    if now is None or rec.get("writes") is None:
        return "the disk's write counters cannot be read"
    if epoch() == rec["epoch"]:
        if now != rec["writes"]:
            return f"{now - rec['writes']} writes completed while the agent was down"
        return None
    if rec["in_use"]:
        return f"{', '.join(rec['in_use'])} was in use read-write when the agent stopped"
    if now:
        return f"{now} writes completed since the boot, before the agent started"
    return None
