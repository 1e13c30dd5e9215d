"""The recovery journal of one disk: undo records that take its target back to older points.

The one owner of ``<state_dir>/<disk>/journal/`` (format and invariants in
docs/design.md, "Recovery journal").  Before a group is written to the
target, the worker asks :meth:`Journal.before_group` to save the
*before-images* of every range the group will write (read from the target,
which then sits on the cursor's tag) as one undo record, durably.  Applying
the undo records newest first, down to the one whose ``from`` is a point,
takes a copy of the target back to that point (:func:`rewind`).

Why undo rather than redo over an older base: the target itself stays the
latest point and is written exactly as before; an older point costs only the
bytes each group overwrote, and the newest points (the ones most often
wanted) are the cheapest to reach.  Redo would need a second full copy of
every disk as its base.

Record file ``<to_gen:08d>-<to_seq:012d>.undo`` (all integers big-endian)::

    magic     8 bytes  b"FERRYUJ1"
    hlen      u32      length of the header
    header    hlen     JSON: {"format": 1, "disk", "from": {gen, seq, tag},
                       "to": {gen, seq, tag}, "extents": [[offset, length], ...],
                       "raw_len", "disk_size", "created_at"}
    body      ...      one zstd frame: the before-image bytes of the extents, in order
    checksum  16 bytes xxh3-128 of every byte before it

``to`` is where the target stands after the group(s), ``from`` where it stood
before: applying the record's extents to a copy at ``to`` gives ``from``.
Extents are sorted and never overlap.  Records are written with a temporary
file, fsync, rename and an fsync of the directory, so after a crash one is
whole or absent.

Everything that changes the journal (records, merges, pruning) runs in the
worker while it holds ``apply.lock``; whoever holds that lock sees a chain
that matches the target.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import shutil
import struct
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import xxhash
import zstandard

from ferry import durable

log = logging.getLogger("ferry.mastertarget.journal")

MAGIC = b"FERRYUJ1"
FORMAT = 1
_HEAD = struct.Struct(">8sI")
_SUM = 16
_MAX_HEADER = 256 << 20
CHUNK = 4 << 20
"""Bytes read from the target (or a record) at a time."""
MERGE_MAX_BYTES = 256 << 20
"""Largest run of records merged (in memory) when points are thinned out; a larger run stays
as it is (its points stay restorable) until the window or the budget removes it."""
MAINTAIN_EVERY = 2.0
"""Seconds between two retention passes of one disk (each pass runs inside one group's apply)."""
MAX_MERGES = 2
"""Merges per retention pass: thinning catches up over a few groups, never stalling one."""
SUFFIX = ".undo"
KEPT_REPORTED = 600
"""Older retained points named in a report at most (the newest): a report stays under 32 KB."""


class JournalCorrupt(Exception):
    """A record that fails its checksum or cannot be parsed."""


# -- retention policy --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Policy:
    """Which older points a disk keeps (settings ``journal_*``; docs/design.md)."""

    keep_all_s: float = 3600.0
    """Every point this young is kept."""
    thin_every_s: float = 300.0
    """Older points: the newest of each ``thin_every_s`` slice of wall-clock time is kept."""
    window_s: float = 86400.0
    """Nothing older is kept; app-consistent points are kept for the whole window."""
    budget_bytes: int = 10 << 30
    """Bytes of undo records at most; the oldest points go first when it is reached."""


def retained(points: list[dict[str, Any]], now: float, policy: Policy) -> list[str]:
    """The ids of ``points`` the policy keeps (before the byte budget), oldest first.

    ``points`` are tags (``id``, ``kind``, ``t0_wall``), oldest first; the last
    one is the target's own and always kept.  A point is kept when it is the
    newest, or younger than ``keep_all_s``, or younger than ``window_s`` and
    app-consistent or the newest point of its slice
    ``floor(t0_wall / thin_every_s)``.
    """
    newest_of_slice: dict[int, str] = {}
    if policy.thin_every_s > 0:
        for p in points:  # oldest first: the last one written per slice wins
            newest_of_slice[int(p["t0_wall"] // policy.thin_every_s)] = p["id"]
    kept = []
    for i, p in enumerate(points):
        age = now - p["t0_wall"]
        slice_ = int(p["t0_wall"] // policy.thin_every_s) if policy.thin_every_s > 0 else -1
        if (
            i == len(points) - 1
            or age < policy.keep_all_s
            or (
                age < policy.window_s
                and (p.get("kind") == "app" or newest_of_slice.get(slice_) == p["id"])
            )
        ):
            kept.append(p["id"])
    return kept


# -- extents -----------------------------------------------------------------------------


def coalesce(extents: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(offset, length)`` ranges sorted, overlaps and neighbours joined."""
    out: list[list[int]] = []
    for offset, length in sorted(e for e in extents if e[1] > 0):
        if out and offset <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], offset + length - out[-1][0])
        else:
            out.append([offset, length])
    return [(o, n) for o, n in out]


def overlay(
    below: list[tuple[int, bytes]], above: list[tuple[int, bytes]]
) -> list[tuple[int, bytes]]:
    """Pieces ``(offset, data)`` of ``below`` with ``above`` written over them; sorted, joined.

    Each list is sorted and non-overlapping.  Used to merge two undo records:
    the older record's before-images (``above``) win where both have a range.
    """
    starts = [o for o, _ in above]
    out: list[tuple[int, bytes]] = []
    for offset, data in below:
        end = offset + len(data)
        cursor = offset
        i = max(0, bisect.bisect_right(starts, offset) - 1)
        while cursor < end and i < len(above):
            a_off, a_data = above[i]
            a_end = a_off + len(a_data)
            if a_end <= cursor:
                i += 1
                continue
            if a_off >= end:
                break
            if a_off > cursor:
                out.append((cursor, data[cursor - offset : a_off - offset]))
            cursor = max(cursor, a_end)
            i += 1
        if cursor < end:
            out.append((cursor, data[cursor - offset :]))
    out.extend(above)
    out.sort(key=lambda p: p[0])
    joined: list[tuple[int, bytes]] = []
    for offset, data in out:
        if joined and joined[-1][0] + len(joined[-1][1]) == offset:
            joined[-1] = (joined[-1][0], joined[-1][1] + data)
        else:
            joined.append((offset, data))
    return joined


# -- the record format -------------------------------------------------------------------


def record_name(gen: int, seq: int) -> str:
    """The file name of the record whose ``to`` is batch (gen, seq)."""
    return f"{gen:08d}-{seq:012d}{SUFFIX}"


def write_record(path: Path, header: dict[str, Any], chunks: Iterable[bytes]) -> int:
    """Write one record durably (temporary file, fsync, rename, directory fsync); its size."""
    hbytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    digest = xxhash.xxh3_128()
    size = 0
    try:
        with open(tmp, "wb") as f:

            def put(data: bytes) -> None:
                nonlocal size
                digest.update(data)
                f.write(data)
                size += len(data)

            put(_HEAD.pack(MAGIC, len(hbytes)) + hbytes)
            compressor = zstandard.ZstdCompressor(level=1).compressobj()
            for chunk in chunks:
                out = compressor.compress(chunk)
                if out:
                    put(out)
            put(compressor.flush())
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()  # a full disk must not keep the partial copy
        raise
    durable.fsync_dir(path.parent)
    return size + _SUM


def read_header(path: Path) -> dict[str, Any]:
    """The header of the record at ``path`` (unverified; JournalCorrupt if unreadable)."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(_HEAD.size)
            if len(prefix) != _HEAD.size:
                raise JournalCorrupt(f"{path.name}: too short")
            magic, hlen = _HEAD.unpack(prefix)
            if magic != MAGIC or hlen > _MAX_HEADER:
                raise JournalCorrupt(f"{path.name}: not an undo record")
            header = json.loads(f.read(hlen))
    except (OSError, ValueError) as exc:
        raise JournalCorrupt(f"{path.name}: {exc}")
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise JournalCorrupt(f"{path.name}: unknown header")
    return header


def verify(path: Path) -> None:
    """Check the record's checksum; JournalCorrupt if it does not hold."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size - _SUM
            if size < _HEAD.size:
                raise JournalCorrupt(f"{path.name}: too short")
            digest = xxhash.xxh3_128()
            left = size
            while left:
                chunk = f.read(min(left, CHUNK))
                if not chunk:
                    raise JournalCorrupt(f"{path.name}: truncated")
                digest.update(chunk)
                left -= len(chunk)
            if digest.digest() != f.read(_SUM):
                raise JournalCorrupt(f"{path.name}: checksum does not hold")
    except OSError as exc:
        raise JournalCorrupt(f"{path.name}: {exc}")


def pieces(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(offset, before-image)`` of each extent of a verified record, in order, in bounded chunks."""
    header = read_header(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        _, hlen = _HEAD.unpack(f.read(_HEAD.size))
        f.seek(_HEAD.size + hlen)
        body_left = size - _HEAD.size - hlen - _SUM
        reader = zstandard.ZstdDecompressor().stream_reader(_Limited(f, body_left))  # type: ignore[arg-type]
        for offset, length in header["extents"]:
            while length:
                n = min(length, CHUNK)
                data = _read_exactly(reader, n, path)
                yield offset, data
                offset += n
                length -= n


class _Limited:
    """A file object that ends after ``left`` bytes (the body, not the checksum)."""

    def __init__(self, f: Any, left: int) -> None:
        self.f, self.left = f, left

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data


def _read_exactly(reader: Any, n: int, path: Path) -> bytes:
    parts, left = [], n
    while left:
        data = reader.read(left)
        if not data:
            raise JournalCorrupt(f"{path.name}: body shorter than its extents")
        parts.append(data)
        left -= len(data)
    return b"".join(parts)


# -- the chain ---------------------------------------------------------------------------


class Record:
    """One undo record as the index knows it.

    The index holds one for every point the policy keeps, and it keeps every
    point of the last hour: 14,400 per disk at four points a second.  So a
    record is small: slots, its path as a string, and the ``from`` of a record
    that follows its predecessor in the chain is that record's ``to`` itself,
    not an equal copy (:meth:`follow`).  A soak measured the copies at 0.75 MiB
    a minute of the master target's memory.
    """

    __slots__ = ("_path", "src", "dst", "size", "raw_len", "key", "from_id", "to_id")

    def __init__(
        self, path: Path | str, src: dict[str, Any], dst: dict[str, Any], size: int, raw_len: int
    ) -> None:
        self._path = os.fspath(path)
        self.src = src
        """``from``: {gen, seq, tag}."""
        self.dst = dst
        """``to``: {gen, seq, tag}."""
        self.size, self.raw_len = size, raw_len
        # Derived once (they are read for every record at every group): ``to``'s (gen, seq),
        # and the ids of the tags it leads from and to.
        self.key: tuple[int, int] = (dst["gen"], dst["seq"])
        self.from_id: str | None = (src.get("tag") or {}).get("id")
        self.to_id: str | None = (dst.get("tag") or {}).get("id")

    @property
    def path(self) -> Path:
        return Path(self._path)

    def follow(self, before: Record | None) -> None:
        """Share ``before``'s ``to`` as this record's ``from`` where the two are equal."""
        if before is not None and before.dst is not self.src and before.dst == self.src:
            self.src, self.from_id = before.dst, before.to_id

    def __repr__(self) -> str:
        return f"Record({self._path!r}, {self.from_id!r} -> {self.to_id!r}, key={self.key})"


def scan(directory: Path) -> list[Record]:
    """Every readable record in ``directory``, by ``to`` (gen, seq); unreadable ones skipped."""
    found: list[Record] = []
    if not directory.is_dir():
        return found
    for path in directory.iterdir():
        if not path.name.endswith(SUFFIX) or path.name.startswith("."):
            continue
        try:
            header = read_header(path)
            found.append(Record(path, header["from"], header["to"], path.stat().st_size,
                                int(header["raw_len"])))  # fmt: skip
        except (JournalCorrupt, KeyError, TypeError, ValueError, OSError):
            log.warning("journal %s: unreadable record %s ignored", directory, path.name)
    found.sort(key=lambda r: r.key)
    for before, record in itertools.pairwise(found):
        record.follow(before)
    return found


def signature(cursor: dict[str, Any]) -> tuple[int, int, str | None]:
    """What of a cursor the chain depends on: its (gen, applied_seq) and its tag's id."""
    return (cursor.get("gen", 0), cursor.get("applied_seq", 0),
            (cursor.get("last_tag") or {}).get("id"))  # fmt: skip


def is_pending(record: Record, cursor: dict[str, Any]) -> bool:
    """True for the record of the group in hand: after the cursor, from the cursor's tag."""
    gen, seq = cursor.get("gen", 0), cursor.get("applied_seq", 0)
    after = record.key > (gen, seq)
    return after and record.from_id == (cursor.get("last_tag") or {}).get("id")


def chain(records: list[Record], cursor: dict[str, Any]) -> tuple[list[Record], Record | None]:
    """``(chain newest first, pending record or None)`` for a disk whose cursor is ``cursor``.

    The chain starts at the record whose ``to`` is the cursor's tag and goes on
    while each record's ``from`` is the next one's ``to``.  Records in neither
    are garbage (a merge or reset interrupted by a crash).
    """
    head = (cursor.get("last_tag") or {}).get("id")
    pending = None
    for r in records:
        if is_pending(r, cursor):
            pending = r
    out: list[Record] = []
    want = head
    for r in sorted((r for r in records if r is not pending), key=lambda r: r.key, reverse=True):
        if (
            want is not None
            and r.to_id == want
            and r.key <= (cursor.get("gen", 0), cursor.get("applied_seq", 0))
        ):
            out.append(r)
            want = r.from_id
    return out, pending


def points(chain_: list[Record], cursor: dict[str, Any]) -> list[dict[str, Any]]:
    """The points a chain reaches, oldest first, the target's own (the cursor's tag) last."""
    tags = [r.src["tag"] for r in reversed(chain_)]
    if cursor.get("last_tag"):
        tags.append(cursor["last_tag"])
    return [t for t in tags if t]


def rewind(fd: int, records: list[Record]) -> None:
    """Apply ``records`` (newest first) to the copy open at ``fd``; each verified first."""
    for r in records:
        verify(r.path)
        for offset, data in pieces(r.path):
            view = memoryview(data)
            while view:
                n = os.pwrite(fd, view, offset)
                view = view[n:]
                offset += n


# -- the journal of one disk (the worker's side) -----------------------------------------


class Journal:
    """Writes and trims one disk's undo records; all calls from the worker, under ``apply.lock``."""

    def __init__(self, directory: Path, disk: str, policy: Policy | None, now=time.time) -> None:
        self.directory = Path(directory)
        self.disk = disk
        self.policy = policy
        self.now = now
        self.records: list[Record] = []
        self.cut_short: dict[str, Any] | None = None
        """Set when the budget (or a failure) cost points the policy would keep: the alert."""
        self._maintained = float("-inf")
        self._bytes, self._bytes_of = 0, self.records  # total_bytes, and of which list
        self._clean_for: tuple[int, int, str | None] | None = None
        """The cursor :attr:`records` are exactly the chain of, oldest first, with no pending
        record and no garbage; None when not known.  Each group's record extends the chain
        by one, so this spares :func:`chain` (linear in the points kept: an hour at four
        tags a second is 14,400 records) at every group: it cost 74 ms per group at 6,000."""
        self._older_upto: tuple[int, int] | None = None
        """The key of the newest record whose point :meth:`state` found older than keep_all."""

    def _is_chain(self, cursor: dict[str, Any]) -> bool:
        """Whether :attr:`records` are known to be exactly the chain of ``cursor``."""
        return self._clean_for is not None and self._clean_for == signature(cursor)

    def _chain(self, cursor: dict[str, Any]) -> tuple[list[Record], Record | None]:
        """:func:`chain` of the records for ``cursor``, without a walk when they are known."""
        if self._is_chain(cursor):
            return self.records[::-1], None
        return chain(self.records, cursor)

    @property
    def enabled(self) -> bool:
        return self.policy is not None

    def open(self, cursor: dict[str, Any]) -> None:
        """Index the records; remove garbage; with the journal off, remove every record."""
        if not self.enabled:
            shutil.rmtree(self.directory, ignore_errors=True)  # its chain would go stale
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        for path in self.directory.glob(".*"):
            path.unlink(missing_ok=True)  # a torn temporary
        self.records = scan(self.directory)
        self._clean_for = self._older_upto = None
        self._drop_garbage(cursor)

    def _drop_garbage(self, cursor: dict[str, Any]) -> None:
        """Remove records outside the chain; reset if one says a group was begun and abandoned.

        Such a record starts at the cursor's tag but is neither the chain nor
        the group in hand (a group that broke, then a resync): the target
        was written past the chain, so no older point is reachable any more.
        """
        if self._is_chain(cursor):
            return  # the records are the chain: nothing is outside it
        kept, pending = chain(self.records, cursor)
        keep = {id(r) for r in kept} | ({id(pending)} if pending else set())
        head = (cursor.get("last_tag") or {}).get("id")
        if any(id(r) not in keep and r.from_id == head for r in self.records):
            self.reset("a group was begun and never finished (the target was resynced)")
            return
        for r in self.records:
            if id(r) not in keep:
                r.path.unlink(missing_ok=True)
        self.records = sorted([r for r in self.records if id(r) in keep], key=lambda r: r.key)
        if pending is None:
            self._clean_for = signature(cursor)

    @property
    def total_bytes(self) -> int:
        if self._bytes_of is not self.records:  # a new list: count it once
            self._bytes, self._bytes_of = sum(r.size for r in self.records), self.records
        return self._bytes

    # -- writing -------------------------------------------------------------------------

    def before_group(
        self,
        cursor: dict[str, Any],
        to: dict[str, Any],
        extents: list[tuple[int, int]],
        read: Any,
        disk_size: int,
    ) -> None:
        """Make the group's undo record durable before its first write; never raises.

        ``to`` is ``{gen, seq, tag}`` after the group, ``read(offset, length)``
        reads the target.  A record of this very group left by a crash is
        kept as it is (the target may be torn now; the record was read before).
        If the record cannot be written (too big for the budget, a full or
        failing disk), every record is dropped first, so that no chain ever
        spans a write it does not cover, and replication goes on.
        """
        if not self.enabled or not cursor.get("last_tag"):
            return
        head = (cursor["last_tag"] or {}).get("id")
        key = (to["gen"], to["seq"])
        at = bisect.bisect_left(self.records, key, key=lambda r: r.key)  # records are by key
        mine = self.records[at] if at < len(self.records) else None
        if mine is not None and mine.key == key and mine.from_id == head:
            return  # this group's record, left by a crash
        _, pending = self._chain(cursor)
        if pending is not None:  # another group was begun here: the target may be torn
            self.reset(f"the group up to {pending.key} was begun and not finished")
        self._drop_garbage(cursor)
        clean = self._is_chain(cursor)
        ranges = coalesce(extents)
        raw = sum(n for _, n in ranges)
        assert self.policy is not None
        if raw > self.policy.budget_bytes:
            self.reset(f"a group overwrites {raw} bytes, more than the budget")
            return
        src = {
            "gen": cursor.get("gen", 0),
            "seq": cursor.get("applied_seq", 0),
            "tag": cursor["last_tag"],
        }
        header = {"format": FORMAT, "disk": self.disk, "from": src, "to": to,
                  "extents": [list(e) for e in ranges], "raw_len": raw,
                  "disk_size": disk_size, "created_at": self.now()}  # fmt: skip
        path = self.directory / record_name(to["gen"], to["seq"])
        try:
            size = write_record(path, header, _before_images(ranges, read))
        except OSError as exc:
            self.reset(f"cannot write an undo record: {exc}")
            return
        record = Record(path, src, to, size, raw)
        record.follow(self.records[-1] if self.records else None)
        if self.records and self.records[-1].key >= key:
            clean = False  # not the chain's next link (a cursor behind its records)
        total = self.total_bytes  # of the list before the append (the same list after it)
        self.records.append(record)
        self._bytes = total + size
        if not clean:
            self.records.sort(key=lambda r: r.key)
        # Once the group is applied the cursor is ``to``, and this record heads the chain.
        self._clean_for = (key[0], key[1], record.to_id) if clean and record.to_id else None

    def reset(self, why: str) -> None:
        """Drop every record (durably, newest first) because the next write goes unrecorded."""
        lost = len(self.records)
        for r in sorted(self.records, key=lambda r: r.key, reverse=True):
            r.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            durable.fsync_dir(self.directory)
        self.records = []
        self._clean_for = self._older_upto = None
        if lost:
            self.cut_short = {"at": self.now(), "reason": why}
        log.warning("disk %s: recovery journal dropped %d older points: %s", self.disk, lost, why)

    # -- retention -----------------------------------------------------------------------

    def after_group(self, cursor: dict[str, Any], force: bool = False) -> None:
        """Thin and trim by the policy and the budget (at most every MAINTAIN_EVERY s)."""
        now = self.now()
        if not self.enabled or (not force and now - self._maintained < MAINTAIN_EVERY):
            return
        self._maintained = now
        try:
            self._maintain(cursor, now)
        except (OSError, JournalCorrupt) as exc:
            self.reset(f"retention failed: {exc}")

    def _maintain(self, cursor: dict[str, Any], now: float) -> None:
        assert self.policy is not None
        self._drop_garbage(cursor)
        links, _ = self._chain(cursor)
        links = list(reversed(links))  # oldest first: links[i] leads to points()[i]
        pts = points(list(reversed(links)), cursor)
        keep = set(retained(pts, now, self.policy))
        # The oldest points the policy drops: their records go.
        while links and links[0].src["tag"]["id"] not in keep:
            self._remove(links.pop(0))
        # Points in between: each run of dropped points becomes one record, once the run is
        # final (the kept point after it is past keep_all, so no later point joins it): every
        # record is rewritten at most once, never grown one point at a time.
        merges, i = 0, 1
        while i < len(links) and merges < MAX_MERGES:
            if links[i].src["tag"]["id"] in keep:
                i += 1
                continue
            j = i
            while j + 1 < len(links) and links[j + 1].src["tag"]["id"] not in keep:
                j += 1
            end = links[j].dst["tag"] or {}
            final = now - end.get("t0_wall", now) >= self.policy.keep_all_s
            run = links[i - 1 : j + 1]
            if final and sum(r.raw_len for r in run) <= MERGE_MAX_BYTES:
                links[i - 1 : j + 1] = [self._merge(run)]
                merges += 1
            else:
                i = j + 1
        # The byte budget: the oldest points go first.
        window = {p["id"] for p in pts if now - p["t0_wall"] < self.policy.window_s}
        while links and self.total_bytes > self.policy.budget_bytes:
            gone = links.pop(0)
            self._remove(gone)
            if gone.src["tag"]["id"] in window:
                self.cut_short = {"at": now, "reason": f"budget of {self.policy.budget_bytes} bytes reached",
                                  "oldest_t0_wall": links[0].src["tag"]["t0_wall"] if links else None}  # fmt: skip
        if self.cut_short and now - self.cut_short["at"] > self.policy.window_s:
            self.cut_short = None

    def _remove(self, record: Record) -> None:
        record.path.unlink(missing_ok=True)
        self.records = [r for r in self.records if r is not record]

    def _merge(self, run: list[Record]) -> Record:
        """One record from ``run[0].from`` to ``run[-1].to``, written over the newest's file.

        The older records' before-images win where ranges overlap.  A crash
        after the rename leaves the older records outside the chain (garbage,
        removed at the next start); before it, all as they were.
        """
        newer = run[-1]
        merged = _load(newer.path)
        for older in reversed(run[:-1]):
            merged = overlay(merged, _load(older.path))
        raw = sum(len(d) for _, d in merged)
        header = read_header(newer.path)
        header.update({"from": run[0].src, "extents": [[o, len(d)] for o, d in merged],
                       "raw_len": raw, "created_at": self.now()})  # fmt: skip
        size = write_record(newer.path, header, (d for _, d in merged))
        for older in run[:-1]:
            older.path.unlink(missing_ok=True)
        record = Record(newer.path, run[0].src, newer.dst, size, raw)
        gone = {id(r) for r in run}
        self.records = sorted(
            [r for r in self.records if id(r) not in gone] + [record], key=lambda r: r.key
        )
        return record

    # -- reporting -----------------------------------------------------------------------

    def state(self, cursor: dict[str, Any]) -> dict[str, Any]:
        """What the disk's state blob says of its retained points (compact).

        Points younger than ``keep_all_s`` are all kept: the report says where that
        run starts (``all_since``) and lists the older ones (``kept``).  This runs at
        every publish, four times a second under dense writes, while the records
        grow by as many for the hour the policy keeps every point: while they are
        the cursor's chain it costs no walk (a point's ``t0_wall`` grows along the
        chain, and where the young run starts only moves forward; a soak measured
        the walk at a third of the master target's time after 26 minutes).
        """
        if not self.enabled:
            return {"enabled": False}
        if not self._is_chain(cursor):
            return self._state_walked(cursor)
        assert self.policy is not None
        cutoff = self.now() - self.policy.keep_all_s
        records, head = self.records, cursor.get("last_tag")
        at = 0  # records whose point (their ``from``) is older than the cutoff: a prefix
        if self._older_upto is not None:
            at = bisect.bisect_right(records, self._older_upto, key=lambda r: r.key)
        while at < len(records) and records[at].src["tag"]["t0_wall"] <= cutoff:
            at += 1
        self._older_upto = records[at - 1].key if at else None

        def point(i: int) -> dict[str, Any]:  # the points: each record's from, the cursor's tag
            return records[i].src["tag"] if i < len(records) else head or {}

        n = len(records) + (1 if head else 0)
        older = at + (1 if head and at == len(records) and head["t0_wall"] <= cutoff else 0)
        tail = [point(i) for i in range(max(0, older - KEPT_REPORTED - 1), older)]
        return self._report(n, tail, point(older) if older < n else None,
                            point(0) if n else None)  # fmt: skip

    def _state_walked(self, cursor: dict[str, Any]) -> dict[str, Any]:
        """:meth:`state` from a walk of the chain (the reference; also where no chain is known)."""
        assert self.policy is not None
        links, _ = self._chain(cursor)
        pts = points(links, cursor)
        cutoff = self.now() - self.policy.keep_all_s
        young = [p for p in pts if p["t0_wall"] > cutoff]
        older = [p for p in pts if p["t0_wall"] <= cutoff] if len(young) < len(pts) else []
        return self._report(len(pts), older[-KEPT_REPORTED - 1 :], young[0] if young else None,
                            pts[0] if pts else None)  # fmt: skip

    def _report(self, n: int, older_tail: list[dict[str, Any]], first_young: dict[str, Any] | None,
                oldest: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
        """The report of ``n`` points: the newest older ones (one more than are named, to say
        whether the list was cut), the first of the young run, the oldest."""
        assert self.policy is not None
        return {
            "enabled": True,
            "points": n,
            "bytes": self.total_bytes,
            "budget_bytes": self.policy.budget_bytes,
            "oldest_t0_wall": oldest["t0_wall"] if oldest else None,
            "all_since": first_young["t0_wall"] if first_young else None,
            "kept": [p["id"] for p in older_tail][-KEPT_REPORTED:],
            "kept_truncated": len(older_tail) > KEPT_REPORTED,
            "cut_short": self.cut_short,
        }


def _before_images(ranges: list[tuple[int, int]], read: Any) -> Iterator[bytes]:
    for offset, length in ranges:
        while length:
            n = min(length, CHUNK)
            data = read(offset, n)
            if len(data) < n:  # past the end of an image file that grows: zeros
                data = data + bytes(n - len(data))
            yield data
            offset += n
            length -= n


def _load(path: Path) -> list[tuple[int, bytes]]:
    verify(path)
    out: list[tuple[int, bytes]] = []
    for offset, data in pieces(path):
        if out and out[-1][0] + len(out[-1][1]) == offset:
            out[-1] = (out[-1][0], out[-1][1] + data)
        else:
            out.append((offset, data))
    return out
