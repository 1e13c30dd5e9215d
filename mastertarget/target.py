"""The target of one disk: a block device or a regular (sparse) image file.

Writes are plain ``pwrite`` calls followed by one ``fsync`` per group: the
cursor moves only after that fsync (invariant 8), so buffered writes are as
safe as O_DIRECT ones here and much cheaper for small extents.

Long data extents (``DIRECT_MIN``) go through a second descriptor opened with
O_DIRECT, from a reused aligned buffer: in an initial sync the kernel's copy
of each byte into the page cache was a third of the master target's CPU (perf;
on this VM new page cache is memory the host had taken back, faulted in and
zeroed again first), O_DIRECT writes cost 0.05-0.07 CPU s per GiB
(``bench/writepaths.py``).  The kernel keeps the two paths coherent (a direct
write flushes and drops the cached pages of its range); reads and fsync use
the buffered descriptor.  Where O_DIRECT is refused (an alignment the device
rejects, a filesystem without it) every write is buffered.

In an image file each buffered data extent's range is allocated
(``fallocate``) before it is written: into allocated blocks the same writes
took 0.16-0.17 CPU s per GiB against 0.27 into holes (2.5 MiB extents, warm
memory; ``bench/writepaths.py``), and the file holds the same blocks either
way: only what is written is allocated.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
from collections.abc import Callable
from pathlib import Path

from ferry import blockio
from ferry.batch import Batch
from ferry.errors import DeviceError
from mastertarget import defaults

_ZEROS = bytes(defaults.ZERO_CHUNK)

log = logging.getLogger("ferry.mastertarget")


class Target:
    """An open target; use :meth:`open` before writing and :meth:`close` when done."""

    def __init__(self, path: str | Path, kind: str = "auto") -> None:
        self.path = str(path)
        self.kind = kind
        """``device``, ``file`` or ``auto``: a device target is never created (a missing
        device must not become a regular file under /dev)."""
        self.fd: int | None = None
        self.is_device = False
        self.direct_fd: int | None = None
        """The O_DIRECT descriptor for long extents, None where O_DIRECT is refused."""
        self._bounce: mmap.mmap | None = None
        self.allocate = False
        """Allocate each data extent before writing it (an image file whose
        filesystem supports ``fallocate``; see the module's docstring)."""

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
        self.allocate = not self.is_device
        try:
            self.direct_fd = os.open(self.path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as exc:
            log.info("target %s: no O_DIRECT here (%s); every write is buffered",
                     self.path, exc.strerror)  # fmt: skip
        return self

    def close(self) -> None:
        """Close the target; safe to call twice."""
        if self.direct_fd is not None:
            os.close(self.direct_fd)
            self.direct_fd = None
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None
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
            elif self._direct_ok(offset, length):
                self._write_direct(offset, data)
            else:
                if self.allocate:
                    self._allocate(offset, length)
                self._write(offset, data)
            written += length
        return written

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (short past the end): the journal's before-images."""
        return os.pread(self._open_fd, length, offset)

    def _direct_ok(self, offset: int, length: int) -> bool:
        return (
            self.direct_fd is not None
            and length >= defaults.DIRECT_MIN
            and offset % blockio.ALIGN == 0
        )

    def _write_direct(self, offset: int, data: memoryview) -> None:
        """Write ``data`` at ``offset`` (aligned) through the O_DIRECT descriptor.

        Whole aligned chunks go through the bounce buffer, unless ``data`` itself
        starts at an aligned address (a reused, page-aligned decompression
        buffer: ``mastertarget.worker.DECODED``); an unaligned tail, or
        everything from a write O_DIRECT refused (EINVAL: the device wants a
        larger alignment), is written buffered instead.
        """
        assert self.direct_fd is not None
        bounce = None
        if not blockio.aligned(data):  # else written from where it lies (segment.decode's buffer)
            if self._bounce is None:
                self._bounce = blockio.page_buffer(defaults.DIRECT_CHUNK)
            bounce = memoryview(self._bounce)
        whole = len(data) - len(data) % blockio.ALIGN
        done = 0
        try:
            while done < whole:
                if bounce is None:
                    chunk = data[done:whole]
                else:
                    chunk = bounce[: min(whole - done, len(bounce))]
                    chunk[:] = data[done : done + len(chunk)]
                wrote = os.pwrite(self.direct_fd, chunk, offset + done)
                done += wrote - wrote % blockio.ALIGN  # a short write: the rest goes again
                if wrote % blockio.ALIGN:
                    break
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            log.info("target %s: O_DIRECT write refused (%s); writing buffered from now on",
                     self.path, exc.strerror)  # fmt: skip
            os.close(self.direct_fd)
            self.direct_fd = None
        finally:
            if bounce is not None:
                bounce.release()
        if done < len(data):
            self._write(offset + done, data[done:])

    def _allocate(self, offset: int, length: int) -> None:
        try:
            blockio.fallocate(self._open_fd, offset, length)
        except OSError as exc:
            if exc.errno not in blockio.FALLOCATE_UNSUPPORTED:
                raise  # ENOSPC, EIO: as a write's would be
            self.allocate = False  # the write alone does it, at the cost above
            log.info("target %s: fallocate is not supported here (%s); writing without it",
                     self.path, exc.strerror)  # fmt: skip

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
