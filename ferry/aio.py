"""Many O_DIRECT reads in one wait: the kernel's native asynchronous I/O through ``ctypes``.

A blocking ``preadv`` puts its thread to sleep until the device answers and
wakes it again: on this project's machines that sleep and wake-up cost more
CPU than the read itself (about 35 µs per read of a few KiB from a loop
device, against 4-6 µs each when 16 or more go in one submission). Once a
disk replicates, a pass reads a few hundred short runs a second, so the agent
submits them together (``io_submit``) and waits once for all of them
(``io_getevents``).

Linux AIO rather than io_uring: io_uring is switched off on some
distributions' kernels (``kernel.io_uring_disabled``) and in many container
runtimes, while AIO on an O_DIRECT descriptor works on every kernel the agent
supports. Four system calls and two fixed structures, so no library: the
Python bindings for libaio need the C library ``libaio.so.1`` on every source
server, and the agent installs nothing but Python packages there. Where the
calls are unknown (an architecture not listed) or refused (``ENOSYS``, or
``EAGAIN`` when the host's ``fs.aio-max-nr`` is used up), :func:`open_context`
returns None and the caller reads one run at a time as before.

Every request submitted is reaped before :meth:`Context.read` returns or
raises: a buffer is never handed back while the kernel may still write into
it. Where reaping itself fails, the context is destroyed, which waits for
what is in flight (``io_destroy``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

IOCB_CMD_PREAD = 0

_SYSCALLS = {
    # io_setup, io_destroy, io_getevents, io_submit
    "x86_64": (206, 207, 208, 209),
    "aarch64": (0, 1, 4, 2),
}


class _Iocb(ctypes.Structure):
    # struct iocb of <linux/aio_abi.h>, little-endian field order.
    _fields_ = [
        ("data", ctypes.c_uint64),
        ("key", ctypes.c_uint32),
        ("rw_flags", ctypes.c_int32),
        ("opcode", ctypes.c_uint16),
        ("reqprio", ctypes.c_int16),
        ("fildes", ctypes.c_uint32),
        ("buf", ctypes.c_uint64),
        ("nbytes", ctypes.c_uint64),
        ("offset", ctypes.c_int64),
        ("reserved2", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("resfd", ctypes.c_uint32),
    ]


class _Event(ctypes.Structure):
    # struct io_event
    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


class Context:
    """An AIO context for up to ``depth`` reads at once (from :func:`open_context`)."""

    def __init__(self, libc: ctypes.CDLL, numbers: tuple[int, int, int, int], depth: int) -> None:
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        self._setup, self._destroy, self._getevents, self._submit = numbers
        self.depth = depth
        handle = ctypes.c_ulong(0)
        if self._call(self._setup, ctypes.c_long(depth), ctypes.byref(handle)) < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        self._ctx: ctypes.c_ulong | None = handle
        self._iocbs = (_Iocb * depth)()
        self._ptrs = (ctypes.POINTER(_Iocb) * depth)(*(ctypes.pointer(c) for c in self._iocbs))
        self._events = (_Event * depth)()

    def _call(self, number: int, *args: object) -> int:
        ctypes.set_errno(0)
        return int(self._syscall(ctypes.c_long(number), *args))

    def read(self, fd: int, requests: list[tuple[int, int, int]]) -> list[int]:
        """Read each ``(address, length, offset)`` of ``fd``; return each one's result.

        A result is the bytes read (short only at the end of the device) or a
        negative errno. Raises OSError if the kernel refuses the submission,
        after reaping whatever was submitted.
        """
        if len(requests) > self.depth:
            raise ValueError(f"{len(requests)} reads at once, more than the context's {self.depth}")
        if self._ctx is None:
            raise OSError(errno.EBADF, "the AIO context is closed")
        for i, (address, length, offset) in enumerate(requests):
            c = self._iocbs[i]
            c.data, c.opcode, c.fildes = i, IOCB_CMD_PREAD, fd
            c.buf, c.nbytes, c.offset = address, length, offset
            c.rw_flags = c.flags = c.reqprio = 0
        results = [0] * len(requests)
        submitted = reaped = 0
        failure: OSError | None = None
        try:
            while True:
                if failure is None and submitted < len(requests):
                    n = self._call(
                        self._submit,
                        self._ctx,
                        ctypes.c_long(len(requests) - submitted),
                        ctypes.byref(self._ptrs, submitted * ctypes.sizeof(ctypes.c_void_p)),
                    )
                    if n > 0:
                        submitted += n
                        continue
                    err = ctypes.get_errno() if n < 0 else errno.EIO
                    if err == errno.EINTR:
                        continue
                    if err != errno.EAGAIN or submitted == reaped:
                        failure = OSError(err, f"io_submit: {os.strerror(err)}")
                    # else EAGAIN with reads in flight: reap some, then submit the rest.
                if reaped == submitted and (failure is not None or submitted == len(requests)):
                    break
                got = self._call(
                    self._getevents, self._ctx, ctypes.c_long(1),
                    ctypes.c_long(submitted - reaped), self._events, None,
                )  # fmt: skip
                if got < 0:
                    if ctypes.get_errno() == errno.EINTR:
                        continue
                    raise OSError(ctypes.get_errno(), "io_getevents failed")
                for e in self._events[:got]:
                    results[e.data] = e.res
                reaped += got
        except BaseException:
            if submitted > reaped:
                self.close()  # io_destroy waits for what is still in flight
            raise
        if failure is not None:
            raise failure
        return results

    @property
    def closed(self) -> bool:
        """Whether the context is gone (closed, or destroyed after reaping failed)."""
        return self._ctx is None

    def close(self) -> None:
        """Destroy the context (waiting for any read still in flight); idempotent."""
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            self._call(self._destroy, ctx)


def open_context(depth: int) -> Context | None:
    """An AIO context for ``depth`` reads at once, or None where this kernel or
    architecture offers none (then read one at a time)."""
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None or ctypes.sizeof(_Iocb) != 64 or ctypes.sizeof(_Event) != 32:
        return None
    try:
        return Context(ctypes.CDLL(None, use_errno=True), numbers, depth)
    except OSError:
        return None
