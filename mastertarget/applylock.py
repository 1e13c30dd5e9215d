"""The apply lock: one protocol for the worker that applies and for whoever holds applying.

The master target applies each group holding an exclusive ``flock`` on
``<state_dir>/<disk>/apply.lock`` and skips applying while anyone else holds
it.  A test failover holds it (:func:`hold`) to copy a target that then sits
exactly on the cursor's tag; receiving and staging go on meanwhile.  A
``flock`` goes with its process, so a holder killed with -9 holds nothing.
The holder writes a one-line note into the file, which the worker logs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from ferry.errors import Exit, FerryError

POLL = 0.02
"""Seconds between tries while waiting for the worker to finish its group."""


class HoldTimeout(FerryError):
    """disk {disk}: the master target has been applying one group for over {wait:.0f} s; try again later"""

    exit_code = Exit.RETRY_LATER
    retryable = True


def open_lock(path: str | Path) -> int:
    """The lock file's descriptor (created if absent, close-on-exec)."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


@contextlib.contextmanager
def try_apply(fd: int) -> Iterator[bool]:
    """Hold the lock for one group; yields False (without waiting) while someone else holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        yield False
        return
    try:
        yield True
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def holder(path: str | Path) -> str:
    """The note of whoever holds applying ("no note" if none could be read)."""
    try:
        return Path(path).read_text().strip() or "no note"
    except OSError:
        return "no note"


@contextlib.contextmanager
def hold(path: str | Path, disk: str, note: str, wait: float) -> Iterator[float]:
    """Hold applying of ``disk``, waiting up to ``wait`` s for the group in hand; yields the wait."""
    fd = open_lock(path)
    began = time.monotonic()
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - began > wait:
                    raise HoldTimeout(disk=disk, wait=wait)
                time.sleep(POLL)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{note} (pid {os.getpid()})\n".encode(), 0)
        try:
            yield time.monotonic() - began
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # drops the lock
