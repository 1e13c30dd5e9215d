"""The agent's side of an online verify: digest one range per read pass, under its tag.

A verify of a disk walks it in ranges of ``verify_chunk_bytes``.  Each read
pass of the replicator that runs while a verify is active reads the next
range after the pass's *t0* (with O_DIRECT, as every read), digests it
block by block, and, if the pass ends clean, puts the digests into the
pass's tag (``ferry.verify``); the master target compares them with the
target once it sits on that tag.  A pass that collided carries no tag, and
the same range is tried again in the next one.

Blocks of the range that a write touched during the pass (queued after *t0*,
or completed after it: in flight at *t0*) may have been read after they
changed, so their digest is not the source at the tag: they are sent as
``unsettled``, left out of the comparison, and tried again after the whole
disk was walked, up to RECHECK_ROUNDS times.  Blocks still unsettled then
(written all the time) are counted as ``unverified`` in the last section.

Nothing here holds replication back: the read of one range is part of a
normal pass, and a tag is taken as for any pass.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from pyroaring import BitMap

from ferry import blockio
from ferry import verify as fmt

log = logging.getLogger("ferry.agent.verify")

RECHECK_ROUNDS = 3
"""Times unsettled blocks are tried again before they are reported unverified, a count."""

READ_BYTES = 8 << 20
"""Largest single read of a verify range, in bytes (the buffer each verified disk holds)."""


def new_id() -> str:
    """A fresh verify id."""
    return f"v-{uuid.uuid4().hex[:16]}"


@dataclass
class DiskVerify:
    """One disk's verify in progress: what is left to digest."""

    id: str
    disk: str
    size: int
    block: int
    chunk: int
    repair: bool = False
    scheduled: bool = False
    next_offset: int = 0
    recheck: BitMap = field(default_factory=BitMap)
    rounds: int = 0
    sections: int = 0
    pending: tuple[list[list[int]], list[bytes]] | None = None
    """The ranges read in the pass in hand and their digests (until the pass ends)."""

    def next_ranges(self) -> list[list[int]]:
        """The ``[offset, length]`` ranges the next pass digests (empty: nothing left)."""
        if self.next_offset < self.size:
            length = min(self.chunk, self.size - self.next_offset)
            return [[self.next_offset, length]]
        if not self.recheck or self.rounds >= RECHECK_ROUNDS:
            return []
        out, total = [], 0
        for first, count in fmt.runs(self.recheck):
            if total >= self.chunk:
                break
            count = min(count, max(1, (self.chunk - total) // self.block))
            offset = first * self.block
            out.append([offset, min(count * self.block, self.size - offset)])
            total += count * self.block
        return out

    def read(self, reader: blockio.DirectReader) -> None:
        """Digest the next ranges from the source (in the pass, after its *t0*)."""
        ranges = self.next_ranges()
        digests: list[bytes] = []
        for offset, length in ranges:
            for at in range(offset, offset + length, READ_BYTES):
                n = min(READ_BYTES, offset + length - at)
                digests += blockio.block_digests(reader.read(at, n), self.block)
        self.pending = (ranges, digests)

    def section(self, touched: BitMap) -> dict[str, Any] | None:
        """The verify section for the clean pass that read :meth:`read`'s ranges; None if none.

        ``touched``: tracking blocks written during the pass (queued or completed
        after *t0*); in units of ``block``, since verify digests tracking blocks.
        """
        if self.pending is None:
            return None
        ranges, digests = self.pending
        self.pending = None
        blocks = fmt.blocks_of(ranges, self.block)
        wanted = BitMap(blocks)
        unsettled = wanted & touched
        if self.next_offset < self.size:
            self.next_offset = ranges[0][0] + ranges[0][1]
        else:
            self.recheck -= wanted
            self.rounds += 1
        self.recheck |= unsettled
        self.sections += 1
        last = not self.next_ranges()
        section: dict[str, Any] = {
            "id": self.id,
            "ranges": ranges,
            "block": self.block,
            "digests": fmt.encode_digests(digests),
            "unsettled": fmt.runs(unsettled),
            "last": last,
            "repair": self.repair,
            "scheduled": self.scheduled,
        }
        if last:
            section["unverified"] = len(self.recheck)
        return section

    def discard(self) -> None:
        """Forget the pass in hand's digests (it collided: no tag, try again)."""
        self.pending = None

    def progress(self) -> dict[str, Any]:
        """How far the verify got, for the agent's status."""
        return {"id": self.id, "done_bytes": min(self.next_offset, self.size),
                "size": self.size, "recheck_blocks": len(self.recheck),
                "repair": self.repair}  # fmt: skip


class Verifier:
    """The verifies of one replicator's disks; called from its thread, started from any.

    ``start`` may be called from a command thread; the replicator thread calls
    :meth:`read_pass` inside each pass (after *t0*, before the end marker) and
    :meth:`end_pass` after it.
    """

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.active: dict[str, DiskVerify] = {}
        self.finished: dict[str, dict[str, Any]] = {}
        self._readers: dict[str, blockio.DirectReader] = {}
        self._lock = threading.Lock()

    def start(
        self,
        disks: list[tuple[str, str, int, int]],
        repair: bool = False,
        scheduled: bool = False,
        verify_id: str | None = None,
    ) -> str:
        """Verify each ``(disk, device, size, block)``; the verify's id (all of them share it).

        An operator's verify replaces one in progress on the same disk (its report
        would never finish otherwise); a scheduled one leaves a disk being verified alone.
        """
        verify_id = verify_id or new_id()
        with self._lock:
            for disk, device, size, block in disks:
                if disk in self.active:
                    if scheduled:
                        continue
                    log.info("disk %s: verify %s replaced by %s", disk, self.active[disk].id,
                             verify_id)  # fmt: skip
                    del self.active[disk]
                    self._readers.pop(disk).close()
                self.active[disk] = DiskVerify(verify_id, disk, size, block, self.chunk,
                                               repair=repair, scheduled=scheduled)  # fmt: skip
                self._readers[disk] = blockio.DirectReader(device, min(self.chunk, READ_BYTES))
                log.info("disk %s: verify %s started (%s%s)", disk, verify_id,
                         "scheduled" if scheduled else "on demand",
                         ", repair" if repair else "")  # fmt: skip
        return verify_id

    def busy(self) -> bool:
        """True while a verify is in progress (passes must run even when nothing changed)."""
        return bool(self.active)

    def read_pass(self, disks: list[str]) -> None:
        """Digest the next range of each of ``disks`` being verified (in the pass, after t0)."""
        with self._lock:
            plans = [(d, self.active[d], self._readers[d]) for d in disks if d in self.active]
        for _, plan, reader in plans:
            plan.read(reader)

    def end_pass(self, disks: list[str], clean: bool, touched) -> dict[str, dict[str, Any]]:
        """The verify section of each disk for a clean pass (``touched(disk)``: its written
        blocks); nothing, and the digests dropped, for one that collided."""
        out = {}
        with self._lock:
            for disk in disks:
                plan = self.active.get(disk)
                if plan is None or plan.pending is None:
                    continue
                if not clean:
                    plan.discard()
                    continue
                section = plan.section(touched(disk))
                if section is None:
                    continue
                out[disk] = section
                if section["last"]:
                    self._finish(disk, plan, section)
        return out

    def _finish(self, disk: str, plan: DiskVerify, section: dict[str, Any]) -> None:
        del self.active[disk]
        self._readers.pop(disk).close()
        self.finished[disk] = {"id": plan.id, "sections": plan.sections,
                               "unverified": section.get("unverified", 0),
                               "repair": plan.repair}  # fmt: skip
        log.info("disk %s: verify %s sent its last range (%d ranges); the master target "
                 "reports the result", disk, plan.id, plan.sections)  # fmt: skip

    def cancel(self, disk: str) -> None:
        """Drop ``disk``'s verify (a resync or a refused device: its generation ended)."""
        with self._lock:
            plan = self.active.pop(disk, None)
            if plan is not None:
                self._readers.pop(disk).close()
                log.info("disk %s: verify %s cancelled", disk, plan.id)

    def close(self) -> None:
        """Release every reader."""
        with self._lock:
            for reader in self._readers.values():
                reader.close()
            self._readers.clear()
            self.active.clear()

    def status(self, disk: str) -> dict[str, Any] | None:
        """The disk's verify in progress, or the last one it finished, for status."""
        with self._lock:
            plan = self.active.get(disk)
            if plan is not None:
                return {"state": "running", **plan.progress()}
            done = self.finished.get(disk)
            return {"state": "sent", **done} if done else None
