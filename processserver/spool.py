"""The spool: accepted batches, durable on local disk until they are uploaded and announced.

One file per batch, ``<root>/<tenant>/<disk>/<gen:08d>-<seq:012d>.batch``,
holding the batch packed as the segment that will be uploaded, byte for byte
(compressed and sealed: :mod:`ferry.segment`), so the spool writes, keeps and
holds what compression leaves (a third, for the bench's disk).  A file of an earlier version holds
a u32 big-endian header length, the batch header (JSON) and the raw payload
instead; it is packed when it is uploaded.  A batch is acknowledged only once
its file and directory are fsync'ed (invariant 5); the file is deleted only
after its segment was uploaded and announced (invariant 6).  A resent batch
has the same name and simply replaces the file.

The spool also hands files to the uploaders: oldest first, in (gen, seq)
order within a disk, never the same file to two uploaders at once.  A file
rewritten while it is being uploaded is kept and uploaded again, so an
acknowledged write is never deleted unseen.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import heapq
import itertools
import json
import logging
import os
import re
import struct
import threading
from pathlib import Path
from typing import NamedTuple

from ferry import durable, segment
from ferry.batch import Batch
from ferry.errors import Exit, FerryError, SegmentCorrupt
from ferry.naming import check_id
from processserver import defaults

log = logging.getLogger("ferry.processserver.spool")

_LEN = struct.Struct(">I")
_NAME_RE = re.compile(r"^(\d{8,})-(\d{12,})\.batch$")
_TMP_RE = re.compile(r"^\..*\.tmp\d*$")
"""Temporary files of ferry.durable.write_atomic, left behind by a crash."""
_STRIPES = 64


class SpoolError(FerryError):
    """cannot use the spool {path}: {problem}"""

    exit_code = Exit.SPOOL


class SpoolKey(NamedTuple):
    """Names one spooled batch."""

    tenant: str
    disk: str
    gen: int
    seq: int

    @classmethod
    def of(cls, batch: Batch) -> SpoolKey:
        """The key of ``batch``."""
        return cls(batch.tenant, batch.disk, batch.gen, batch.seq)

    @property
    def filename(self) -> str:
        """File name inside the disk's spool directory."""
        return f"{self.gen:08d}-{self.seq:012d}.batch"

    def __str__(self) -> str:
        return f"{self.tenant}/{self.disk} gen {self.gen} seq {self.seq}"


@dataclasses.dataclass(frozen=True)
class Spooled:
    """A batch as the spool keeps it: packed as the segment its upload sends."""

    key: SpoolKey
    data: bytes
    """The segment, as it is written to the spool file and uploaded."""
    checksum: str
    raw_len: int
    """The batch's payload bytes before compression."""
    tag: str | None
    """The id of the tag the batch carries, if any (named in its notice)."""

    @classmethod
    def pack(
        cls, batch: Batch, key: bytes | None, level: int, cipher: str = segment.CIPHER
    ) -> Spooled:
        """Compress and seal ``batch`` (:func:`ferry.segment.pack`)."""
        data, checksum = segment.pack(batch, key, level, cipher)
        tag = batch.tag.get("id") if isinstance(batch.tag, dict) else None
        return cls(SpoolKey.of(batch), data, checksum, len(batch.payload), tag)

    @classmethod
    def read(cls, key: SpoolKey, data: bytes) -> Spooled:
        """A spool file's segment; ValueError if it is damaged or holds another batch."""
        try:
            header, checksum = segment.peek(data, str(key))
        except SegmentCorrupt as exc:
            raise ValueError(str(exc)) from None
        tag = header.get("tag")
        raw_len = header.get("raw_len")
        found = (header.get("tenant"), header.get("disk"), header.get("gen"), header.get("seq"))
        if found != tuple(key) or not isinstance(raw_len, int):
            raise ValueError(f"the file holds a segment of {found}")
        return cls(key, data, checksum, raw_len, tag.get("id") if isinstance(tag, dict) else None)


def is_segment(data: bytes) -> bool:
    """True if a spool file's content is a segment (else: a raw batch of an earlier version)."""
    return data[: len(segment.MAGIC)] == segment.MAGIC


def decode(data: bytes) -> Batch:
    """The batch in a spool file of an earlier version; ValueError if it is damaged."""
    if len(data) < _LEN.size:
        raise ValueError(f"truncated spool file ({len(data)} bytes)")
    (hlen,) = _LEN.unpack_from(data)
    end = _LEN.size + hlen
    if end > len(data):
        raise ValueError("spool file header runs past the end")
    header = json.loads(data[_LEN.size : end])
    if not isinstance(header, dict):
        raise ValueError("spool file header is not an object")
    return Batch.from_header(header, data[end:])


class Spool:
    """The spool directory and its queue of batches waiting for upload."""

    def __init__(
        self, root: Path, limit: int, quarantine: Path, held: int = defaults.SPOOL_HELD_BYTES
    ) -> None:
        self.root = Path(root)
        self.limit = limit
        self.quarantine_dir = Path(quarantine)
        self._cond = threading.Condition()
        self._stamp = itertools.count()
        self._stamps: dict[SpoolKey, int] = {}
        self._sizes: dict[SpoolKey, int] = {}
        self._bytes = 0
        self._queues: dict[tuple[str, str], list[tuple[int, int]]] = {}
        self._arrivals: list[tuple[int, SpoolKey]] = []
        self._queued: set[SpoolKey] = set()
        self._claimed: set[SpoolKey] = set()
        self._rewritten: set[SpoolKey] = set()
        self._writing: collections.Counter[SpoolKey] = collections.Counter()
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._dirs: set[Path] = set()
        self._held: dict[SpoolKey, Spooled] = {}
        """Segments as written, until claimed: reading a file just written back (a copy)
        costs the process server CPU for nothing."""
        self._held_bytes = 0
        self._held_limit = held

    def path(self, key: SpoolKey) -> Path:
        """Where the batch of ``key`` is spooled."""
        return self.root / key.tenant / key.disk / key.filename

    # -- startup ------------------------------------------------------------------------

    def recover(self) -> int:
        """Index what a previous run left (removing its temporary files); return the batch count.

        SpoolError if the spool directory cannot be created or read.
        """
        found: list[tuple[int, SpoolKey, int]] = []
        try:
            self._ensure_dir(self.root)
            for disk_dir in self._disk_dirs():
                for entry in os.scandir(disk_dir):
                    found.extend(self._recover_entry(disk_dir, entry))
        except OSError as exc:
            raise SpoolError(path=self.root, problem=exc.strerror or str(exc))
        # Arrival order is lost with the process; modification time is its best witness.
        with self._cond:
            for _mtime, key, size in sorted(found):
                self._add(key, size)
        return len(found)

    def _disk_dirs(self) -> list[Path]:
        dirs = []
        for tenant in sorted(self.root.iterdir()):
            if not tenant.is_dir() or check_id("tenant", tenant.name):
                log.warning("ignoring %s: not a tenant directory", tenant)
                continue
            for disk in sorted(tenant.iterdir()):
                if disk.is_dir() and not check_id("disk", disk.name):
                    dirs.append(disk)
                else:
                    log.warning("ignoring %s: not a disk directory", disk)
        return dirs

    def _recover_entry(self, disk_dir: Path, entry: os.DirEntry) -> list[tuple[int, SpoolKey, int]]:
        if _TMP_RE.match(entry.name):
            # Never acknowledged: the crash came before its rename.
            os.unlink(entry.path)
            log.info("removed %s, an unfinished write of a previous run", entry.path)
            return []
        match = _NAME_RE.match(entry.name)
        if not match or not entry.is_file():
            log.warning("ignoring %s: not a spooled batch", entry.path)
            return []
        key = SpoolKey(disk_dir.parent.name, disk_dir.name, int(match[1]), int(match[2]))
        st = entry.stat()
        return [(st.st_mtime_ns, key, st.st_size)]

    # -- receiving -----------------------------------------------------------------------

    def store(self, item: Spooled) -> SpoolKey:
        """Write ``item`` durably (file and directory fsync'ed); return its key.

        Only after this returns may the batch be acknowledged.
        """
        return self.store_group([item])[0]

    def store_group(self, items: list[Spooled]) -> list[SpoolKey]:
        """Write ``items`` durably at once (group commit); return their keys.

        Every file is fsync'ed and each directory once (``ferry.durable.write_group``):
        only after this returns may any of them be acknowledged.  On an error none
        is queued for upload nor may be acknowledged, and every file is whole or absent.
        """
        keys = [item.key for item in items]
        parts: list[list[bytes | bytearray | memoryview]] = [[item.data] for item in items]
        with self._cond:
            for key in keys:  # seen by finish(): an uploader must not delete a file being rewritten
                self._writing[key] += 1
        written = False
        try:
            with contextlib.ExitStack() as held:
                for stripe in sorted({hash(k) % _STRIPES for k in keys}):  # one order: no deadlock
                    held.enter_context(self._stripes[stripe])
                for key in keys:
                    self._ensure_dir(self.path(key).parent)
                durable.write_group([(self.path(k), p) for k, p in zip(keys, parts, strict=True)])
            written = True
        finally:
            with self._cond:
                for key, item in zip(keys, items, strict=True):
                    self._writing[key] -= 1
                    if not self._writing[key]:
                        del self._writing[key]
                    if written:
                        self._hold(key, item)
                        self._add(key, len(item.data))
        return keys

    def _ensure_dir(self, directory: Path) -> None:
        """Create ``directory`` and make its entry durable in its parent."""
        if directory in self._dirs:
            return
        missing = []
        probe = directory
        while not probe.is_dir():
            missing.append(probe)
            probe = probe.parent
        for new in reversed(missing):
            new.mkdir(exist_ok=True)
            durable.fsync_dir(new.parent)
        self._dirs.add(directory)

    def _add(self, key: SpoolKey, size: int) -> None:
        """Account for a file just written; queue it unless it is queued or in upload."""
        self._bytes += size - self._sizes.get(key, 0)
        self._sizes[key] = size
        if key in self._claimed:
            self._rewritten.add(key)
        elif key not in self._queued:
            self._stamps[key] = next(self._stamp)
            self._enqueue(key)
        self._cond.notify_all()

    def _hold(self, key: SpoolKey, item: Spooled) -> None:
        """Keep the segment just written to ``key``'s file in memory, if the budget allows."""
        self._unhold(key)
        if self._held_bytes + len(item.data) <= self._held_limit:
            self._held[key] = item
            self._held_bytes += len(item.data)

    def _unhold(self, key: SpoolKey) -> Spooled | None:
        item = self._held.pop(key, None)
        if item is not None:
            self._held_bytes -= len(item.data)
        return item

    def _enqueue(self, key: SpoolKey) -> None:
        heapq.heappush(self._queues.setdefault((key.tenant, key.disk), []), (key.gen, key.seq))
        heapq.heappush(self._arrivals, (self._stamps[key], key))
        self._queued.add(key)

    # -- backpressure ----------------------------------------------------------------------

    def over_limit(self) -> bool:
        """True while the spool holds more than its limit."""
        with self._cond:
            return self._bytes > self.limit

    def wait_for_room(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the spool to drop under its limit; True if it has."""
        with self._cond:
            return self._cond.wait_for(lambda: self._bytes <= self.limit, timeout)

    def usage(self) -> tuple[int, int]:
        """``(bytes, files)`` held in the spool."""
        with self._cond:
            return self._bytes, len(self._sizes)

    # -- uploading ---------------------------------------------------------------------------

    def claim(self, timeout: float) -> SpoolKey | None:
        """The oldest batch waiting for upload, now reserved for the caller; None on timeout."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._queued, timeout):
                return None
            disk = self._longest_waiting_disk()
            queue = self._queues[disk]
            key = SpoolKey(*disk, *heapq.heappop(queue))
            if not queue:
                del self._queues[disk]
            self._queued.discard(key)
            self._claimed.add(key)
            return key

    def _longest_waiting_disk(self) -> tuple[str, str]:
        """The disk holding the batch that has waited longest.

        Its batches then go in (gen, seq) order, which lets the master target
        apply them as they arrive.  Entries of batches claimed meanwhile are
        dropped from ``_arrivals`` here, lazily.
        """
        while True:
            stamp, key = self._arrivals[0]
            if key in self._queued and self._stamps.get(key) == stamp:
                return key.tenant, key.disk
            heapq.heappop(self._arrivals)

    def read(self, key: SpoolKey) -> bytes:
        """The content of a claimed batch's file."""
        return self.path(key).read_bytes()

    def load(self, key: SpoolKey) -> Spooled | Batch:
        """What a claimed key's file holds: its segment (as written, if still held), or the
        raw batch of a file an earlier version spooled (to be packed before its upload).

        OSError or ValueError if the file cannot be read, is damaged or holds
        another batch.  A held segment is the very bytes the file holds, fsync'ed.
        """
        with self._cond:
            held = self._unhold(key)
        if held is not None:
            return held
        data = self.read(key)
        if is_segment(data):
            return Spooled.read(key, data)
        batch = decode(data)
        if SpoolKey.of(batch) != key:
            raise ValueError(f"the file holds {SpoolKey.of(batch)}")
        return batch

    def finish(self, key: SpoolKey) -> None:
        """A claimed batch was uploaded and announced: delete its file (unless rewritten since)."""
        with self._cond:
            if self._requeue_if_rewritten(key):
                return
            self.path(key).unlink(missing_ok=True)
            self._forget(key)

    def _requeue_if_rewritten(self, key: SpoolKey) -> bool:
        """Unclaim ``key``; if a resend replaced its file meanwhile, queue it again (True)."""
        self._claimed.discard(key)
        if key not in self._rewritten and not self._writing[key]:
            return False
        self._rewritten.discard(key)
        self._enqueue(key)
        self._cond.notify_all()
        return True

    def release(self, key: SpoolKey) -> None:
        """Give a claimed batch back without uploading it (it stays spooled)."""
        with self._cond:
            self._claimed.discard(key)
            self._rewritten.discard(key)
            self._enqueue(key)
            self._cond.notify_all()

    def quarantine(self, key: SpoolKey) -> Path | None:
        """Move a claimed batch whose file is damaged out of the spool; return where it went.

        None if a resend replaced the file meanwhile (it is queued again instead).
        """
        target = self.quarantine_dir / key.tenant / key.disk / key.filename
        with self._cond:
            if self._requeue_if_rewritten(key):
                return None  # the resent file may well be sound: try it
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.path(key), target)
            except OSError as exc:
                log.error("cannot move %s to %s: %s", self.path(key), target, exc)
            self._forget(key)
        return target

    def _forget(self, key: SpoolKey) -> None:
        self._unhold(key)
        self._bytes -= self._sizes.pop(key, 0)
        self._stamps.pop(key, None)
        self._cond.notify_all()
