"""Reading and writing disks: O_DIRECT reads, zero detection, sizes, digests.

Reads of a protected device MUST use O_DIRECT: a buffered read can return
metadata the filesystem holds in cache but has not written, a write that no
trace event will ever explain.  Regular image files are read the same way
where the filesystem allows O_DIRECT, and buffered otherwise.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import re
import stat
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Literal, TypeVar

import xxhash

from ferry import aio
from ferry.errors import DeviceError

BLKGETSIZE64 = 0x80081272
ALIGN = 4096
"""O_DIRECT alignment for offsets, lengths and buffers, in bytes."""
HUGE_PAGE = 2 << 20
"""Size of a transparent huge page (x86-64, arm64 with 4 KiB pages), in bytes."""
AIO_DEPTH = 64
"""Most reads :meth:`DirectReader.read_each` submits at once (beyond 16 a read costs
little less: 5.6 µs each at 16, 4.4 at 64, from a loop device here)."""
T = TypeVar("T")


def is_block_device(path: str) -> bool:
    """True when ``path`` is a block device."""
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def device_size(fd: int) -> int:
    """Size in bytes of the block device or regular file open as ``fd``."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        return struct.unpack("Q", buf)[0]
    return st.st_size


def _libc_fallocate():
    # glibc's fallocate, not posix_fallocate (which falls back to writing zeros):
    # os has no fallocate before Python 3.13's, and no library wraps the one call.
    try:
        # The C library the interpreter runs on, without ctypes.util.find_library: that
        # runs ldconfig, a process started at every daemon's start.
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.fallocate
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    call.restype = ctypes.c_int
    return call


_FALLOCATE = _libc_fallocate()
FALLOCATE_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV})
"""errnos of a ``fallocate`` the filesystem (or this libc) does not do."""


def fallocate(fd: int, offset: int, length: int) -> None:
    """Allocate ``[offset, offset + length)`` of the file open as ``fd`` (size unchanged
    within it); OSError as the system call fails, ENOSYS without glibc."""
    if _FALLOCATE is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    if _FALLOCATE(fd, 0, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def dev_number(path: str) -> int:
    """The kernel's ``(major << 20) | minor`` for a block device, as trace events print it."""
    rdev = os.stat(path).st_rdev
    return (os.major(rdev) << 20) | os.minor(rdev)


class BufferPool:
    """Page-aligned buffers of ``size`` bytes, each used again once no view of it is alive.

    The interpreter does the counting: an mmap with live views refuses to be
    resized (:func:`_in_use`), and a view's buffer is freed with its last
    reference.  Being mmaps, the buffers are page-aligned: O_DIRECT takes
    them as they are (the master target decompresses segments into them and
    writes long extents from there, mastertarget.target).
    """

    def __init__(self, size: int, limit: int | None = None) -> None:
        self.size = _round_up(size)
        self.limit = limit
        """Most buffers made at once (None: no limit)."""
        self.buffers: list[mmap.mmap] = []
        self._lock = threading.Lock()
        self._next = 0
        """Where the next search for a free buffer begins: after the one last taken."""

    def take(self, prefer: mmap.mmap | None = None) -> mmap.mmap | None:
        """A buffer no view points into, ``prefer`` first; a new one if none is free and
        fewer than ``limit`` exist; else None.

        The buffer is free only until someone views it: callers on several
        threads use :meth:`view` instead.
        """
        with self._lock:
            return self._take(prefer)

    def view(self, n: int) -> memoryview | None:
        """The first ``n`` bytes of a free buffer (safe across threads), None if ``n``
        is more than a buffer holds or every buffer is in use and the limit reached."""
        if n > self.size:
            return None
        with self._lock:
            buf = self._take(None)
            return None if buf is None else memoryview(buf)[:n]

    def spare(self, besides: mmap.mmap | None = None) -> int:
        """How many buffers other than ``besides`` no view points into."""
        with self._lock:
            return sum(1 for b in self.buffers if b is not besides and not _in_use(b))

    def release(self) -> int:
        """Unmap every buffer no view points into (after a burst); return how many."""
        with self._lock:
            free = [b for b in self.buffers if not _in_use(b)]
            for buf in free:
                buf.close()
            self.buffers = [b for b in self.buffers if not b.closed]
        return len(free)

    def close(self) -> None:
        """Unmap every buffer (one still viewed goes with its last view)."""
        with self._lock:
            for buf in self.buffers:
                try:
                    buf.close()
                except BufferError:
                    pass  # a caller still holds a view; the mapping goes with it
            self.buffers = []

    def _take(self, prefer: mmap.mmap | None) -> mmap.mmap | None:
        # Each probe is a system call. Views are let go of in about the order they were
        # taken (a batch's, once acknowledged), so the buffer after the one last taken is
        # the likeliest to be free: the search goes round from there, not from the first.
        if prefer is not None and not _in_use(prefer):
            return prefer
        count = len(self.buffers)
        for i in range(count):
            at = (self._next + i) % count
            buf = self.buffers[at]
            if buf is not prefer and not _in_use(buf):
                self._next = at + 1
                return buf
        if self.limit is not None and count >= self.limit:
            return None
        buf = page_buffer(self.size)
        self.buffers.append(buf)
        self._next = count + 1
        return buf


class DirectReader:
    """Aligned reads from a device or file, with O_DIRECT where possible.

    A read's view is valid until the next read, unless the reader was made with
    ``keep``: then no read goes to a buffer of which a view is still alive (the
    interpreter counts them: an mmap with views refuses to be resized), so a
    caller may hold on to the views of up to ``keep`` reads, while :meth:`may_keep`
    says so, and send them later without copying them.  A view held longer only
    costs another buffer; it is never overwritten.
    """

    def __init__(self, path: str, max_chunk: int, keep: int = 0) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            self.direct = True
        except OSError:
            try:
                self.fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise DeviceError(device=path, problem=exc.strerror or str(exc))
            self.direct = False
        self.size = device_size(self.fd)
        self.keep = keep
        self._pool = BufferPool(max_chunk)
        """Every buffer reads go to (with ``keep``, up to keep + 1)."""
        self.buf = self._free_buffer()
        """The buffer of the last read."""
        self.last = (0, 0)
        """Where the last read's bytes are in ``buf``: ``(start, length)``."""
        self._aio: aio.Context | None | Literal[False] = False
        """The AIO context of :meth:`read_each`: False until first needed, None if none."""

    def read(self, offset: int, length: int) -> memoryview:
        """Return ``length`` bytes at ``offset`` (valid until the next read, or, with
        ``keep``, for as long as the view is held)."""
        if self.keep:
            self.buf = self._free_buffer(self.buf)
        start = offset - offset % ALIGN
        end = min(_round_up(offset + length), _round_up(self.size))
        want = end - start
        self._fill(0, start, want, 0, offset - start + length)
        skip = offset - start
        self.last = (skip, length)
        return memoryview(self.buf)[skip : skip + length]

    def _fill(self, at: int, start: int, want: int, got: int, need: int) -> None:
        """Read ``want`` bytes of the device at ``start`` into the buffer at ``at``, of
        which ``got`` are there already; at least ``need`` must be (else a short read)."""
        view = memoryview(self.buf)[at : at + want]
        while got < want:
            n = os.preadv(self.fd, [view[got:]], start + got)
            if n <= 0:
                break
            got += n
        if got < need:
            raise DeviceError(device=self.path, problem=f"short read at {start + got}")

    def read_each(
        self, spans: Iterable[tuple[int, int, T]], done: Callable[[T], None]
    ) -> Iterator[tuple[T, memoryview]]:
        """Yield ``(item, view)`` for each ``(offset, length, item)`` of ``spans``, in order.

        Without ``keep``, up to :data:`AIO_DEPTH` spans that fit the buffer
        together are read at once (:mod:`ferry.aio`): one wait for all of them
        instead of one each. ``done(item)`` is called once every span up to
        ``item``'s has been read, before any of them is yielded (for a group,
        once, with its last item). A view is valid until the next one is asked
        for; :meth:`zero_runs` looks at the last one yielded.
        """
        if self.keep or self._context() is None:
            for offset, length, item in spans:
                view = [self.read(offset, length)]
                done(item)
                yield item, view.pop()  # held by the caller only: may_keep counts on it
            return
        group: list[tuple[int, int, int, int, int, T]] = []
        used = 0
        for offset, length, item in spans:
            if offset + length > self.size:
                yield from self._read_group(group, done)
                raise DeviceError(device=self.path, problem=f"short read at {offset}")
            start = offset - offset % ALIGN
            want = min(_round_up(offset + length), _round_up(self.size)) - start
            if want > len(self.buf):
                raise ValueError(f"a read of {want} bytes, more than the buffer's {len(self.buf)}")
            if group and (len(group) == AIO_DEPTH or used + want > len(self.buf)):
                yield from self._read_group(group, done)
                group, used = [], 0
            group.append((used, start, want, offset, length, item))
            used += want
        if group:
            yield from self._read_group(group, done)

    def _context(self) -> aio.Context | None:
        """The reader's AIO context, made on first use; None where there is none."""
        if self._aio is False or (self._aio is not None and self._aio.closed):
            self._aio = aio.open_context(AIO_DEPTH)
        return self._aio

    def _read_group(
        self, group: list[tuple[int, int, int, int, int, T]], done: Callable[[T], None]
    ) -> Iterator[tuple[T, memoryview]]:
        if not group:
            return
        context = self._context()
        assert context is not None
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.buf))
        try:
            results = context.read(self.fd, [(base + g[0], g[2], g[1]) for g in group])
        except OSError as exc:
            raise DeviceError(device=self.path, problem=exc.strerror or str(exc)) from exc
        for (at, start, want, offset, length, _), got in zip(group, results, strict=True):
            if got < 0:
                raise DeviceError(device=self.path, problem=f"{os.strerror(-got)} at {start}")
            if got < want:  # short: only at the device's end; read on as read() does
                self._fill(at, start, want, got, offset - start + length)
        done(group[-1][5])
        for at, start, _, offset, length, item in group:
            skip = at + offset - start
            self.last = (skip, length)
            yield item, memoryview(self.buf)[skip : skip + length]

    @property
    def buffers(self) -> int:
        """How many buffers the reader has made (one without ``keep``)."""
        return len(self._pool.buffers)

    def may_keep(self) -> bool:
        """Whether views of the last read may be held: another buffer is free, or may be
        made within ``keep`` + 1, for the next read."""
        if not self.keep:
            return False
        return self._pool.spare(besides=self.buf) > 0 or self.buffers <= self.keep

    def _free_buffer(self, current: mmap.mmap | None = None) -> mmap.mmap:
        # The current one first; beyond keep + 1 buffers only if a view outlived may_keep.
        buf = self._pool.take(prefer=current)
        assert buf is not None  # the reader's pool has no limit
        return buf

    def zero_runs(self, block: int) -> list[tuple[int, int, bool]]:
        """:func:`zero_runs` of what the last :meth:`read` returned, searched in place."""
        skip, length = self.last
        return zero_runs(self.buf, skip, length, block)

    def close(self) -> None:
        """Release the descriptor and buffers (a buffer still viewed goes with its last view)."""
        if self._aio:
            self._aio.close()
        os.close(self.fd)
        self._pool.close()


def aligned(view: memoryview) -> bool:
    """Whether ``view`` starts at an O_DIRECT-aligned address; a read-only or empty view
    (whose address ctypes will not give) counts as not."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view)) % ALIGN == 0
    except (TypeError, ValueError):
        return False


def page_buffer(size: int) -> mmap.mmap:
    """A zeroed, page-aligned anonymous buffer of ``size`` bytes, in huge pages where it can be.

    O_DIRECT pins every page of its buffer for each read or write: in 4 KiB
    pages that was most of the kernel's cost of the agent's reads, and a read
    of 2 GiB took twice as long (docs/performance.md, round ten).  A private
    mapping advised MADV_HUGEPAGE is backed by 2 MiB pages when the kernel
    has them (transparent_hugepage ``always`` or ``madvise``, the usual
    settings); without them it is an ordinary buffer.  A shared mapping (what
    ``mmap.mmap(-1, n)`` makes) is shmem, which gets no huge pages by default.
    """
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if size >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass  # a kernel without transparent huge pages: 4 KiB pages, as before
    return buf


def _in_use(buf: mmap.mmap) -> bool:
    """Whether a view of ``buf`` is alive (resizing to its own size is refused then)."""
    try:
        buf.resize(len(buf))
    except BufferError:
        return True
    return False


def _round_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


def zero_mask(view: memoryview, block: int) -> list[bool]:
    """One flag per ``block``-sized piece of ``view``: True where it is all zeros."""
    # Copying a piece to bytes and comparing is a memcmp: as fast as numpy here, which a
    # memoryview comparison (item by item) is not.  The agent installs without numpy.
    zero = bytes(block)
    n = len(view)
    return [bytes(view[i : i + block]) == zero[: n - i] for i in range(0, n, block)]


Run = tuple[int, int, bool]
"""``(first piece, count, is_zero)``: a run of pieces that are all zeros or all not."""


_SAMPLED_ZERO = re.compile(rb"\x00+")
_ZEROS = bytes(1 << 20)
"""What runs of pieces that may be zeros are compared with, up to a MiB per comparison."""


def zero_runs(buf: mmap.mmap | bytes, start: int, length: int, block: int) -> list[Run]:
    """Runs of all-zero and other ``block``-sized pieces of ``buf[start:start + length]``.

    Returns ``(first piece, count, is_zero)`` runs in order, as :func:`runs` of
    :func:`zero_mask` would; the last piece may be short.  ``buf`` is tested in
    place (an mmap or bytes).  Two bytes of every piece, its first and its
    middle one, are gathered by a strided copy each: a piece with either not
    zero is data, with nothing more to look at (almost all of a disk's data;
    where no piece starts with a zero byte the middles are not even gathered).
    The other pieces are taken in runs and compared with zeros whole, a MiB
    per ``find`` (one C comparison); a run that is not all zeros is compared
    piece by piece.  So a piece is called zero only after every byte of it was
    compared, and data only where a byte that is not zero was seen.  A Python
    call per piece had been most of the agent's CPU besides TLS and reading.
    """
    n = length // block
    full = start + n * block
    out: list[Run] = []
    find = buf.find
    if n:
        with memoryview(buf) as view:
            firsts = view[start:full:block].tobytes()
            middles = view[start + block // 2 : full : block].tobytes() if 0 in firsts else b""
        if not middles:  # no piece starts with a zero byte: all data (most reads)
            out.append((0, n, False))
        else:
            seen = int.from_bytes(firsts, "little") | int.from_bytes(middles, "little")
            _sampled(out, find, seen.to_bytes(n, "little"), start, block)
    tail = length - n * block
    if tail:  # a short last piece
        _extend(out, n, 1, _all_zeros(find, full, tail))
    return out


def _sampled(
    out: list[Run], find: Callable[..., int], maybe: bytes, start: int, block: int
) -> None:
    """Append the runs of the pieces at ``start``, one per byte of ``maybe`` (zero where
    both the piece's sampled bytes are): a zero there is confirmed by comparing."""
    done = 0
    for match in _SAMPLED_ZERO.finditer(maybe):
        first, end = match.span()
        _extend(out, done, first - done, False)
        at = start + first * block
        if _all_zeros(find, at, (end - first) * block):
            _extend(out, first, end - first, True)
        else:
            zero = _ZEROS[:block] if block <= len(_ZEROS) else bytes(block)
            mask = [find(zero, a, a + block) == a for a in range(at, start + end * block, block)]
            for s, count, value in runs(mask):
                _extend(out, first + s, count, value)
        done = end
    _extend(out, done, len(maybe) - done, False)


def _all_zeros(find: Callable[..., int], at: int, length: int) -> bool:
    """Whether ``length`` bytes at ``at`` are all zeros (``find`` of their buffer)."""
    zeros = memoryview(_ZEROS)
    while length > 0:
        step = min(length, len(_ZEROS))
        if find(zeros[:step], at, at + step) != at:
            return False
        at += step
        length -= step
    return True


def _extend(out: list[Run], first: int, count: int, value: bool) -> None:
    """Append a run to ``out``, joined to the last one if it has the same value."""
    if count <= 0:
        return
    if out and out[-1][2] == value:
        out[-1] = (out[-1][0], out[-1][1] + count, value)
    else:
        out.append((first, count, value))


def runs(mask: list[bool]) -> list[tuple[int, int, bool]]:
    """Split a list of flags into ``(start, count, value)`` runs."""
    out, start, n = [], 0, len(mask)
    while start < n:
        value = bool(mask[start])
        try:
            end = mask.index(not value, start)  # a C scan to the next change
        except ValueError:
            end = n
        out.append((start, end - start, value))
        start = end
    return out


def block_digests(view: memoryview, block: int) -> list[bytes]:
    """xxh3-128 digest of each ``block``-sized piece of ``view`` (the last may be short)."""
    return [xxhash.xxh3_128_digest(view[i : i + block]) for i in range(0, len(view), block)]


def zero_digest(length: int) -> bytes:
    """Digest of ``length`` zero bytes."""
    return xxhash.xxh3_128_digest(bytes(length))


DIGEST_BYTES = 16
"""Bytes per block digest in a digest map (xxh3-128)."""


def digest_map(path: str, block: int, chunk: int = 8 << 20, progress=None) -> tuple[bytes, bool]:
    """Digest every ``block``-sized block of ``path``.

    Returns ``(map, empty)``: ``map`` is the concatenated 16-byte digests in
    block order; ``empty`` is True when the whole device reads as zeros (then
    callers may skip the map).  Holes of sparse files are not read.
    """
    chunk = max(block, chunk - chunk % block)
    reader = DirectReader(path, chunk)
    try:
        return _digest_all(reader, block, chunk, progress)
    finally:
        reader.close()


def _digest_all(reader: DirectReader, block: int, chunk: int, progress) -> tuple[bytes, bool]:
    out = bytearray()
    empty = True
    zero_full = zero_digest(block)
    offset = 0
    while offset < reader.size:
        length = min(chunk, reader.size - offset)
        if _is_hole(reader, offset, length):
            full, rest = divmod(length, block)
            out += zero_full * full
            if rest:
                out += zero_digest(rest)
        else:
            view = reader.read(offset, length)
            out += b"".join(block_digests(view, block))
            if empty and not all(zero_mask(view, block)):
                empty = False
        offset += length
        if progress:
            progress(offset, reader.size)
    return bytes(out), empty


def _is_hole(reader: DirectReader, offset: int, length: int) -> bool:
    if is_block_device(reader.path):
        return False
    try:
        data = os.lseek(reader.fd, offset, os.SEEK_DATA)
    except OSError:
        return True  # ENXIO: no data at or after offset
    return data >= offset + length
