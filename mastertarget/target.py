"""The target of one disk: a block device or a regular (sparse) image file.

Writes are plain ``pwrite`` calls followed by one ``fsync`` per group: the
cursor moves only after that fsync (invariant 8), so buffered writes are as
safe as O_DIRECT ones here and much cheaper for small extents.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from ferry import blockio
from ferry.batch import Batch
from ferry.errors import DeviceError
from mastertarget import defaults

_ZEROS = bytes(defaults.ZERO_CHUNK)


class Target:
    """An open target; use :meth:`open` before writing and :meth:`close` when done."""

    def __init__(self, path: str | Path, kind: str = "auto") -> None:
        self.path = str(path)
        self.kind = kind
        """``device``, ``file`` or ``auto``: a device target is never created (a missing
        device must not become a regular file under /dev)."""
        self.fd: int | None = None
        self.is_device = False

    def open(self) -> Target:
        """Open the target for writing; a missing image file is created empty (sparse)."""
        create = 0 if self.kind == "device" else os.O_CREAT
        try:
            self.fd = os.open(self.path, os.O_RDWR | create | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise DeviceError(device=self.path, problem=exc.strerror or str(exc))
        mode = os.fstat(self.fd).st_mode
        self.is_device = stat.S_ISBLK(mode)
        wanted = {"device": self.is_device, "file": stat.S_ISREG(mode)}.get(
            self.kind, self.is_device or stat.S_ISREG(mode)
        )
        if not wanted:
            self.close()
            what = {"device": "a block device", "file": "a regular file"}.get(
                self.kind, "a block device or a regular file"
            )
            raise DeviceError(device=self.path, problem=f"not {what}")
        return self

    def close(self) -> None:
        """Close the target; safe to call twice."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @property
    def _open_fd(self) -> int:
        """The descriptor; using a target before :meth:`open` is a bug."""
        if self.fd is None:
            raise RuntimeError(f"target {self.path} is not open")
        return self.fd

    @property
    def size(self) -> int:
        """Current size in bytes."""
        return blockio.device_size(self._open_fd)

    def ensure_size(self, disk_size: int) -> None:
        """Make room for ``disk_size`` bytes: extend an image file (sparse); check a device."""
        size = self.size
        if size >= disk_size:
            return
        if self.is_device:
            raise DeviceError(
                device=self.path,
                problem=f"device holds {size} bytes, the source disk has {disk_size}",
            )
        os.ftruncate(self._open_fd, disk_size)

    def write_batch(self, batch: Batch, check: Callable[[], None] = lambda: None) -> int:
        """Write every extent of ``batch``; return the bytes written.

        ``check`` runs before each extent and stops the writes by raising
        (used to stop at once when the owner lease is lost).
        """
        self.ensure_size(batch.disk_size)
        written = 0
        for offset, data, length in batch.pieces():
            check()
            if data is None:
                self._write_zeros(offset, length)
            else:
                self._write(offset, data)
            written += length
        return written

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (short past the end): the journal's before-images."""
        return os.pread(self._open_fd, length, offset)

    def _write(self, offset: int, data: memoryview) -> None:
        while data:
            n = os.pwrite(self._open_fd, data, offset)
            data = data[n:]
            offset += n

    def _write_zeros(self, offset: int, length: int) -> None:
        # One shared zero buffer: a zero extent may span the whole disk.
        view = memoryview(_ZEROS)
        while length:
            n = min(length, len(view))
            self._write(offset, view[:n])
            offset += n
            length -= n

    def sync(self) -> None:
        """fsync the target: everything written so far is on stable storage."""
        os.fsync(self._open_fd)

    def digest_map(self, block_size: int) -> tuple[bytes, bool]:
        """The target's digest map and whether it reads as zeros everywhere."""
        return blockio.digest_map(self.path, block_size, chunk=defaults.DIGEST_CHUNK)
