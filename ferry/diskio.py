"""Whole disks and disk images read as bytes: sparse copies, digests and sizes.

Block devices are read with O_DIRECT (a buffered read of a device whose
filesystem is mounted can return stale cached blocks, docs/design.md); image
files with plain reads, skipping holes.  Bytes past the end read as zeros.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

from ferry.blockio import DirectReader, is_block_device

MiB = 1 << 20
COPY_CHUNK = 8 * MiB
"""Bytes read per copy or digest step."""


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """The (offset, length) ranges of ``fd`` that may hold data; holes read as zeros."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return [(0, size)]
    ranges, offset = [], 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from here on
                break
            return [(0, size)]  # no SEEK_DATA on this filesystem: copy everything
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        ranges.append((start, end - start))
        offset = end
    return ranges


class DiskSource:
    """Reads of a disk: O_DIRECT for block devices (a buffered read of a device whose
    filesystem is mounted can return stale cached blocks, docs/design.md invariant 2),
    plain reads for image files; bytes past the end read as zeros."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.direct = is_block_device(self.path)
        if self.direct:
            self.reader = DirectReader(self.path, COPY_CHUNK)
            self.size = self.reader.size
            self.fd = self.reader.fd
        else:
            self.fd = os.open(self.path, os.O_RDONLY)
            self.size = os.fstat(self.fd).st_size

    def read(self, offset: int, length: int) -> bytes:
        have = max(0, min(length, self.size - offset))
        if not have:
            data = b""
        elif self.direct:
            data = bytes(self.reader.read(offset, have))
        else:
            data = os.pread(self.fd, have, offset)
        return data + bytes(length - len(data))

    def close(self) -> None:
        if self.direct:
            self.reader.close()
        else:
            os.close(self.fd)


def copy_sparse(src: str | Path, dest_fd: int, size: int) -> None:
    """Copy the first ``size`` bytes of ``src`` into ``dest_fd`` at the same offsets, keeping holes."""
    source = DiskSource(src)
    try:
        ranges = [(0, size)] if source.direct else _data_ranges(source.fd, size)
        for start, length in ranges:
            for offset in range(start, start + length, COPY_CHUNK):
                chunk = source.read(offset, min(COPY_CHUNK, start + length - offset))
                if chunk.count(0) != len(chunk):
                    os.pwrite(dest_fd, chunk, offset)
    finally:
        source.close()


def sha256_of(path: str | Path, size: int) -> str:
    """sha256 of the first ``size`` bytes of a file or device (bytes past its end count as zeros)."""
    h = hashlib.sha256()
    source = DiskSource(path)
    try:
        for offset in range(0, size, COPY_CHUNK):
            h.update(source.read(offset, min(COPY_CHUNK, size - offset)))
    finally:
        source.close()
    return h.hexdigest()


def device_size(path: str | Path) -> int:
    """Size in bytes of a block device or a file."""
    with open(path, "rb") as f:
        return f.seek(0, os.SEEK_END)


def sha256_of_range(path: str | Path, start: int, end: int) -> str | None:
    """None when bytes ``start..end`` of ``path`` are all zeros, else their sha256."""
    h = hashlib.sha256()
    nonzero = False
    with open(path, "rb", buffering=0) as f:
        for offset in range(start, end, COPY_CHUNK):
            chunk = os.pread(f.fileno(), min(COPY_CHUNK, end - offset), offset)
            h.update(chunk)
            nonzero = nonzero or chunk.count(0) != len(chunk)
    return h.hexdigest() if nonzero else None
