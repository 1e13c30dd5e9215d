"""Verified segments waiting for their group: ``<state_dir>/<disk>/staging/``.

A staged file is the segment exactly as downloaded and verified, named
``<gen:08d>-<seq:012d>.seg`` and written with :func:`ferry.durable.write_atomic`
(temporary file, fsync, rename, fsync of the directory), so after a crash a
staged file is either whole or absent.  The queue notice is deleted only after
that, which is what lets a crash anywhere replay from staging.  A segment the
worker expects to apply in the same round may be held in memory only
(:meth:`Staging.hold`); its notice is then kept until it is applied or
written here (mastertarget.worker, ``_settle``).

The index kept in memory records, per staged batch, whether it closes a group
(carries a tag); it is rebuilt at start from the segment headers alone, so a
restart with a whole disk staged does not read the whole disk.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import xxhash

from ferry import durable, segment
from mastertarget import defaults

_NAME_RE = re.compile(r"^(\d{8})-(\d{12})\.seg$")
# The fixed prefix of a segment (magic, header length) and its trailing
# checksum, as laid out in ferry/segment.py.
_PREFIX = struct.Struct(">8sI")
_SUM_BYTES = 16
_MAX_HEADER = 64 << 20


@dataclasses.dataclass
class Staged:
    """One staged segment."""

    gen: int
    seq: int
    path: Path
    size: int
    tagged: bool
    pending: bytes | None = None
    """The segment while it is staged in memory only (:meth:`Staging.hold`), else None."""
    header: dict | None = None
    """Its verified header while staged in memory only."""


def file_name(gen: int, seq: int) -> str:
    """The staging file name of batch (gen, seq)."""
    return f"{gen:08d}-{seq:012d}.seg"


class Staging:
    """The staging directory of one disk and its in-memory index."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._index: dict[tuple[int, int], Staged] = {}

    def scan(self) -> list[Path]:
        """Rebuild the index from disk; return the staged files whose header is unreadable.

        Temporary files left by a crash in the middle of a write are removed.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        for path in self.directory.glob(".*"):
            path.unlink(missing_ok=True)  # a torn write_atomic temporary
        self._index.clear()
        unreadable = []
        for path, found in listing(self.directory):
            if found is None:
                unreadable.append(path)
            else:
                self._index[(found.gen, found.seq)] = found
        return unreadable

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self._index

    def __iter__(self) -> Iterator[Staged]:
        return iter(sorted(self._index.values(), key=lambda s: (s.gen, s.seq)))

    def __len__(self) -> int:
        return len(self._index)

    @property
    def total_bytes(self) -> int:
        """Bytes of all staged files."""
        return sum(s.size for s in self._index.values())

    def add(self, gen: int, seq: int, data: bytes, tagged: bool) -> None:
        """Stage a verified segment durably (fsync'ed file and directory)."""
        path = self.directory / file_name(gen, seq)
        durable.write_atomic(path, data)
        self._index[(gen, seq)] = Staged(gen, seq, path, len(data), tagged)

    def hold(self, gen: int, seq: int, data: bytes, header: dict) -> None:
        """Stage a verified segment in memory only: the worker applies it in this round or
        writes it with :meth:`persist` before deleting its notice (see worker._settle)."""
        path = self.directory / file_name(gen, seq)
        self._index[(gen, seq)] = Staged(gen, seq, path, len(data), header.get("tag") is not None,
                                         data, header)  # fmt: skip

    def persist(self, gen: int, seq: int) -> None:
        """Write a segment held in memory durably (as :meth:`add`); nothing if already on disk."""
        staged = self._index.get((gen, seq))
        if staged is not None and staged.pending is not None:
            durable.write_atomic(staged.path, staged.pending)
            staged.pending = staged.header = None

    def held(self, gen: int, seq: int) -> bool:
        """True while ``(gen, seq)`` is staged in memory only."""
        staged = self._index.get((gen, seq))
        return staged is not None and staged.pending is not None

    @property
    def held_bytes(self) -> int:
        """Bytes of the segments staged in memory only."""
        return sum(s.size for s in self._index.values() if s.pending is not None)

    def group_end(self, gen: int, after: int) -> int | None:
        """The seq closing the first whole group after ``after`` in ``gen``, or None.

        A group is whole when ``after+1 .. k`` are all staged and ``k`` carries a tag.
        """
        seq = after + 1
        while (gen, seq) in self._index:
            if self._index[(gen, seq)].tagged:
                return seq
            seq += 1
        return None

    def run_end(self, gen: int, after: int) -> int | None:
        """The last seq of the unbroken run of staged batches after ``after``, or None."""
        seq = after
        while (gen, seq + 1) in self._index:
            seq += 1
        return seq if seq > after else None

    def tag(self, gen: int, seq: int) -> dict | None:
        """The tag in the staged segment's header (unverified: a hint, checked when applied)."""
        tag = self.header(gen, seq).get("tag")
        return tag if isinstance(tag, dict) else None

    def header(self, gen: int, seq: int) -> dict:
        """The staged segment's header (unverified: check :meth:`intact` before trusting it)."""
        staged = self._index[(gen, seq)]
        if staged.header is not None:
            return staged.header
        return _peek_header(staged.path) or {}

    def read(self, gen: int, seq: int) -> bytes:
        """The staged segment of (gen, seq); KeyError if it is not staged."""
        staged = self._index[(gen, seq)]
        return staged.pending if staged.pending is not None else staged.path.read_bytes()

    def intact(self, gen: int, seq: int) -> bool:
        """True when the staged file's own checksum still holds (read in bounded chunks)."""
        staged = self._index[(gen, seq)]
        if staged.pending is not None:
            return _checksum_of(staged.pending)
        return _checksum_holds(staged.path)

    def remove(self, gen: int, seq: int) -> None:
        """Forget and delete a staged file; absent is fine.

        The directory is not fsync'ed: a removal lost in a crash leaves a file
        that the next start recognises as applied or stale and removes again.
        """
        staged = self._index.pop((gen, seq), None)
        if staged is not None and staged.pending is None:  # one held in memory has no file
            staged.path.unlink(missing_ok=True)

    def select(self, keep) -> list[Staged]:
        """The staged segments for which ``keep(gen, seq)`` is true, in (gen, seq) order."""
        return [s for s in self if keep(s.gen, s.seq)]


def listing(directory: Path) -> list[tuple[Path, Staged | None]]:
    """Each staged file in ``directory``, in order, with what its name and header say.

    Read-only (the cutover reads a live master target's staging with it); None
    for a file whose header is unreadable.
    """
    found: list[tuple[Path, Staged | None]] = []
    for path in sorted(directory.iterdir()):
        match = _NAME_RE.match(path.name)
        if not match:
            continue
        tagged = _peek_tagged(path)
        if tagged is None:
            found.append((path, None))
            continue
        gen, seq = int(match[1]), int(match[2])
        found.append((path, Staged(gen, seq, path, path.stat().st_size, tagged)))
    return found


def _peek_tagged(path: Path) -> bool | None:
    """Whether the staged segment at ``path`` carries a tag; None if its header is unreadable.

    Only a hint for grouping: every staged file is fully verified before it is applied.
    """
    header = _peek_header(path)
    return None if header is None else header.get("tag") is not None


def _peek_header(path: Path) -> dict | None:
    """The unverified header of the staged segment at ``path``; None if unreadable."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(_PREFIX.size)
            if len(prefix) != _PREFIX.size:
                return None
            magic, hlen = _PREFIX.unpack(prefix)
            if magic != segment.MAGIC or hlen > _MAX_HEADER:
                return None
            header = json.loads(f.read(hlen))
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def _checksum_holds(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < _SUM_BYTES:
                return False
            digest = xxhash.xxh3_128()
            left = size - _SUM_BYTES
            while left:
                chunk = f.read(min(left, defaults.CHECKSUM_CHUNK))
                if not chunk:
                    return False
                digest.update(chunk)
                left -= len(chunk)
            return digest.digest() == f.read(_SUM_BYTES)
    except OSError:
        return False


def _checksum_of(data: bytes) -> bool:
    """:func:`_checksum_holds` of a segment in memory."""
    view = memoryview(data)
    return len(view) >= _SUM_BYTES and xxhash.xxh3_128_digest(view[:-_SUM_BYTES]) == bytes(
        view[-_SUM_BYTES:]
    )
