"""Change trackers: which blocks changed, and whether a read pass was clean.

Two implementations share one interface (:class:`Tracker`):

* :class:`TraceTracker` follows the kernel's block layer through a private
  tracefs instance: writes are marked dirty on completion; writes queued
  during a pass reveal collisions (docs/design.md, invariants 1 and 3).
* :class:`ScanTracker` digests the whole disk every pass.  It needs no
  privileges and serves image files and hosts without tracefs; it tags a
  pass only when nothing changed while it ran.

A pass is ``begin_pass`` (take the dirty sets at t0), any number of
``chunk_read`` calls as the pass reads, then ``end_pass`` (was it clean?).
"""

from __future__ import annotations

import array
import bisect
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import xxhash
from pyroaring import BitMap

from agent.tracefs import TraceInstance
from ferry.blockio import DirectReader, dev_number

log = logging.getLogger("ferry.agent.tracker")

SECTOR = 512


def mono() -> float:
    """Now on the trace clock (CLOCK_MONOTONIC), in seconds."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


@dataclass
class DiskTrack:
    """Per-disk tracking state."""

    id: str
    device: str
    size: int
    block: int
    dirty: BitMap = field(default_factory=BitMap)
    # Writes completed after the t0 of a pass being begun: the next pass's (see begin_pass).
    after: BitMap = field(default_factory=BitMap)
    # The pass in progress: its dirty set, and when each chunk's read finished.
    pass_set: BitMap | None = None
    read_ends: list[int] = field(default_factory=list)
    read_times: list[float] = field(default_factory=list)
    collided: bool = False
    # Online verify (agent.verify): blocks written during the pass in hand, and during the last.
    touched: BitMap | None = None
    last_touched: BitMap = field(default_factory=BitMap)

    @property
    def blocks(self) -> int:
        """Number of tracking blocks on the disk (the last may be short)."""
        return (self.size + self.block - 1) // self.block


class Tracker:
    """Interface of a change tracker over the disks of one machine."""

    kind = "abstract"
    description = ""

    def __init__(self, disks: list[DiskTrack]) -> None:
        self.disks = {d.id: d for d in disks}
        self.lock = threading.Lock()
        self.t0 = 0.0

    def start(self) -> None:
        """Begin tracking; every write completed afterwards is seen."""

    def close(self) -> None:
        """Stop tracking and release what ``start`` made."""

    def mark_dirty(self, disk: str, first: int, end: int) -> None:
        """Mark blocks ``[first, end)`` of ``disk`` dirty."""
        with self.lock:
            self.disks[disk].dirty.add_range(first, min(end, self.disks[disk].blocks))

    def dirty_count(self, disk: str) -> int:
        """Blocks of ``disk`` currently dirty (not counting a pass in progress)."""
        with self.lock:
            return len(self.disks[disk].dirty)

    def begin_pass(self, disks: list[str]) -> dict[str, BitMap]:
        """Take the dirty set of each of ``disks`` at one instant t0 (``self.t0``)."""
        raise NotImplementedError

    def chunk_read(self, disk: str, end_block: int) -> None:
        """Record that blocks of ``disk``'s pass set below ``end_block`` have been read."""

    def end_pass(self) -> bool:
        """Finish the pass; True if what it read is the disks' content at t0."""
        raise NotImplementedError

    def lost(self) -> bool:
        """True if tracking lost events since the last call (the disks need a resync)."""
        return False

    def touched(self, disk: str) -> BitMap:
        """Blocks of ``disk`` written during the last pass: queued or completed after its t0."""
        with self.lock:
            return BitMap(self.disks[disk].last_touched)


class TraceTracker(Tracker):
    """Block-layer tracking through a private tracefs instance."""

    kind = "tracefs"
    description = "kernel block-layer tracing (tracefs instance)"

    def __init__(
        self, disks: list[DiskTrack], root: str, name: str, buffer_kb: int, adopt: bool = False
    ) -> None:
        super().__init__(disks)
        self.adopt = adopt
        self.adopted = False
        self.by_dev = {dev_number(d.device): d for d in disks}
        self.instance = TraceInstance(
            root, name, list(self.by_dev), buffer_kb, self._complete, self._queue, self._mark
        )
        self.description += f" {self.instance.path}"
        self._marks: dict[int, float] = {}
        self._mark_cv = threading.Condition(self.lock)
        self._mark_no = 0
        self._opening = False  # begin_pass wrote its marker and waits for it
        self._collecting = False  # that marker was read: t0 is _t0_read
        self._t0_read = 0.0
        self._early: list[tuple[int, int, int, float]] = []
        self._lost_seen = 0

    def start(self) -> None:
        self.adopted = self.instance.start(self.adopt)
        self._lost_seen = self.instance.lost_events()

    def close(self) -> None:
        self.instance.close()

    def detach(self) -> bool:
        """Stop reading but leave the instance recording (see TraceInstance.detach).

        False if an event may be lost in the hand-over, or events were lost
        since the last pass looked (a resync is owed then).
        """
        return self.instance.detach() and not self.lost()

    # -- callbacks from the reader thread -----------------------------------------

    def _blocks(self, disk: DiskTrack, sector: int, n: int) -> tuple[int, int]:
        start = sector * SECTOR
        return start // disk.block, (start + n * SECTOR + disk.block - 1) // disk.block

    def _complete(self, dev: int, sector: int, n: int, ts: float) -> None:
        disk = self.by_dev.get(dev)
        if disk is None:
            return
        first, end = self._blocks(disk, sector, n)
        end = min(end, disk.blocks)
        with self.lock:
            if self._collecting and ts > self._t0_read:
                # Completed after t0, read before begin_pass took the dirty sets: the
                # next pass's.  In this pass's set its own queue event (after t0 too)
                # would collide with it: a false collision on every busy disk.
                disk.after.add_range(first, end)
                return
            disk.dirty.add_range(first, end)
            if disk.pass_set is not None and ts <= self.t0:
                # Completed before t0 yet read after the pass took its set (the per-CPU
                # buffers merged late): the pass lacks a write it must hold.
                disk.collided = True

    def _queue(self, dev: int, sector: int, n: int, ts: float) -> None:
        disk = self.by_dev.get(dev)
        if disk is None:
            return
        with self.lock:
            if disk.pass_set is not None:
                self._touch(disk, sector, n)
                self._check_collision(disk, sector, n, ts)
            elif self._collecting:
                self._early.append((dev, sector, n, ts))

    def _mark(self, number: int, ts: float) -> None:
        with self.lock:
            self._marks[number] = ts
            if self._opening:  # the marker of a pass's t0
                self._opening, self._collecting, self._t0_read = False, True, ts
            self._mark_cv.notify_all()

    def _touch(self, disk: DiskTrack, sector: int, n: int) -> None:
        # Called with the lock held: a write queued during the pass (online verify).
        if disk.touched is not None:
            first, end = self._blocks(disk, sector, n)
            disk.touched.add_range(first, min(end, disk.blocks))

    def _check_collision(self, disk: DiskTrack, sector: int, n: int, ts: float) -> None:
        # Called with the lock held.  Reads go in rising block order, so the
        # last pass block inside the write's range is the last one read: if
        # it was read before the write was queued, all of them were.
        pass_set = disk.pass_set
        if disk.collided or pass_set is None or ts < self.t0:
            return  # a write queued before t0 (merged late from another CPU) is no collision
        first, end = self._blocks(disk, sector, n)
        rank = pass_set.rank(end - 1)
        if rank == 0:
            return
        last = pass_set[rank - 1]
        if last < first:
            return
        i = bisect.bisect_right(disk.read_ends, last)
        if i == len(disk.read_ends) or disk.read_times[i] >= ts:
            disk.collided = True
            if log.isEnabledFor(logging.DEBUG):
                log.debug("pass collided on %s: write to blocks %d-%d queued at t0%+.4f s; "
                          "pass block %d %s; pass holds %d blocks, %d chunks read",
                          disk.id, first, end - 1, ts - self.t0, last,
                          "not read yet" if i == len(disk.read_ends)
                          else f"read at t0{disk.read_times[i] - self.t0:+.4f} s",
                          len(pass_set), len(disk.read_ends))  # fmt: skip

    # -- passes ---------------------------------------------------------------------

    def sync(self, timeout: float = 10.0) -> float:
        """Write a marker and wait until the reader consumed it; return its time."""
        with self.lock:
            self._mark_no += 1
            number = self._mark_no
        self.instance.write_marker(number)
        deadline = time.monotonic() + timeout
        with self.lock:
            while number not in self._marks:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("trace reader did not consume the marker")
                self._mark_cv.wait(left)
            return self._marks.pop(number)

    def begin_pass(self, disks: list[str]) -> dict[str, BitMap]:
        with self.lock:
            self._opening = True
        try:
            self.t0 = self.sync()
        except BaseException:
            with self.lock:
                self._opening = self._collecting = False
                for disk in self.disks.values():
                    disk.dirty |= disk.after
                    disk.after = BitMap()
            raise
        taken = {}
        with self.lock:
            for disk in self.disks.values():  # writes completed after t0 wait for the next pass
                if disk.id in disks:
                    taken[disk.id], disk.dirty = disk.dirty, disk.after
                    disk.pass_set = taken[disk.id]
                else:
                    disk.dirty |= disk.after
                disk.after = BitMap()
            for disk_id in disks:
                disk = self.disks[disk_id]
                disk.read_ends, disk.read_times, disk.collided = [], [], False
                disk.touched = BitMap()
            early, self._early, self._collecting = self._early, [], False
            for dev, sector, n, ts in early:
                track = self.by_dev.get(dev)
                if track is not None and track.pass_set is not None:
                    self._touch(track, sector, n)
                    self._check_collision(track, sector, n, ts)
        return taken

    def chunk_read(self, disk: str, end_block: int) -> None:
        done = mono()
        with self.lock:
            track = self.disks[disk]
            track.read_ends.append(end_block)
            track.read_times.append(done)

    def end_pass(self) -> bool:
        self.sync()
        with self.lock:
            clean = True
            for disk in self.disks.values():
                if disk.pass_set is not None:
                    clean = clean and not disk.collided
                    # Completed after t0 (the new dirty map) or queued during the pass.
                    disk.last_touched = disk.dirty | (disk.touched or BitMap())
                disk.pass_set = None
                disk.touched = None
                disk.read_ends, disk.read_times = [], []
            self._collecting = False
            self._early = []
        return clean

    def lost(self) -> bool:
        now = self.instance.lost_events()
        lost, self._lost_seen = now > self._lost_seen, now
        return lost


class ScanTracker(Tracker):
    """Finds changes by digesting every block each pass; tags only quiet passes."""

    kind = "scan"
    description = "hash scan of the whole disk each pass (no block-layer tracing)"

    def __init__(self, disks: list[DiskTrack], chunk: int = 8 << 20) -> None:
        super().__init__(disks)
        self.chunk = chunk
        self._known: dict[str, list[array.array] | None] = {d: None for d in self.disks}
        self._pass_disks: list[str] = []

    def _scan(self, disk: DiskTrack) -> list[array.array]:
        """The 64-bit digest of every block, one array per chunk read."""
        reader = DirectReader(disk.device, self.chunk)
        try:
            out = []
            for offset in range(0, disk.size, self.chunk):
                view = reader.read(offset, min(self.chunk, disk.size - offset))
                digests = (
                    xxhash.xxh3_64_intdigest(view[i : i + disk.block])
                    for i in range(0, len(view), disk.block)
                )
                out.append(array.array("Q", digests))
            return out
        finally:
            reader.close()

    def _changes(self, disk_id: str) -> BitMap:
        disk = self.disks[disk_id]
        new = self._scan(disk)
        old = self._known[disk_id]
        self._known[disk_id] = new
        changed = BitMap()
        if old is None or [len(a) for a in old] != [len(a) for a in new]:
            changed.add_range(0, disk.blocks)
            return changed
        base = 0
        for before, now in zip(old, new, strict=True):
            if before != now:  # equal chunks (the usual case) compare in one memcmp
                changed.update(
                    base + i for i, (a, b) in enumerate(zip(before, now, strict=True)) if a != b
                )
            base += len(now)
        return changed

    def begin_pass(self, disks: list[str]) -> dict[str, BitMap]:
        self.t0 = mono()
        self._pass_disks = list(disks)
        taken = {}
        for disk_id in disks:
            changed = self._changes(disk_id)
            with self.lock:
                disk = self.disks[disk_id]
                disk.dirty.update(changed)
                taken[disk_id], disk.dirty = disk.dirty, BitMap()
        return taken

    def end_pass(self) -> bool:
        clean = True
        for disk_id in self._pass_disks:
            changed = self._changes(disk_id)
            with self.lock:
                self.disks[disk_id].last_touched = changed
            if len(changed):
                clean = False
                with self.lock:
                    self.disks[disk_id].dirty.update(changed)
        return clean


def choose(
    kind: str,
    disks: list[DiskTrack],
    root: str,
    name: str,
    buffer_kb: int,
    adopt: bool = False,
) -> Tracker:
    """Pick the tracker for ``kind`` (auto, tracefs or scan) and start it.

    ``auto`` uses tracefs when every disk is a block device and tracefs can be
    used (root), and the scan tracker otherwise, saying why in the log.
    With ``adopt`` a trace instance ``name`` left by an orderly stop is taken over.
    """
    from ferry.blockio import is_block_device
    from ferry.errors import TrackerUnavailable

    if kind in ("auto", "tracefs"):
        problem = None
        if not all(is_block_device(d.device) for d in disks):
            problem = "not every disk is a block device"
        elif os.geteuid() != 0:
            problem = "tracefs needs root"
        if problem is None:
            tracker = TraceTracker(disks, root, name, buffer_kb, adopt)
            try:
                tracker.start()
                return tracker
            except TrackerUnavailable as exc:
                problem = str(exc)
        if kind == "tracefs":
            raise TrackerUnavailable(device=", ".join(d.device for d in disks), problem=problem)
        log.warning("using the scan tracker: %s", problem)
    scan = ScanTracker(disks)
    scan.start()
    return scan
