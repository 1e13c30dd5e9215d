"""Give memory the allocator keeps back to the system, once a burst of large buffers is over.

A disk's initial sync or resync ships larger batches than replication does
(the agent's ``sync_batch_bytes``): glibc's allocator raises its mmap
threshold after freeing the first of them and then keeps up to twice that
much of the freed heap, in each thread's arena, for good.  ``malloc_trim``
hands it back (about a millisecond here); where there is no glibc (musl)
this does nothing.  A ctypes call of one libc function: no library wraps it.

``malloc_trim`` returns little of what other threads' arenas hold: a scratch
driver whose two worker threads allocated the buffers kept 36 MiB after the
trim, against nothing with one arena; the master target's downloads run in
threads of their own.  Each daemon therefore keeps one arena
(:func:`one_arena`): its large buffers are few, its small objects are Python's
own (pymalloc), so the arena's lock is seldom contended.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("ferry.memory")

_malloc_trim: Any
_mallopt: Any
try:
    _malloc_trim = ctypes.CDLL(None).malloc_trim
    _malloc_trim.argtypes, _malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    _mallopt = ctypes.CDLL(None).mallopt
    _mallopt.argtypes, _mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
except (OSError, AttributeError):  # not glibc
    _malloc_trim = _mallopt = None

_M_ARENA_MAX = -8  # glibc's malloc.h


def one_arena() -> bool:
    """Make every thread allocate from the main arena (call before starting threads);
    True if glibc took it."""
    return bool(_mallopt(_M_ARENA_MAX, 1)) if _mallopt is not None else False


def trim() -> bool:
    """Return the heap's free pages to the system; True if glibc released any."""
    return bool(_malloc_trim(0)) if _malloc_trim is not None else False


class AfterBurst:
    """Trims once buffers of at least ``large`` bytes have stopped coming for ``quiet`` seconds.

    :meth:`used` is told of each buffer; :meth:`maybe` (from any loop that
    runs now and then) trims at most once per burst.  Safe across threads.
    """

    def __init__(
        self, large: int, quiet: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.large, self.quiet, self.clock = large, quiet, clock
        self._last: float | None = None
        self._lock = threading.Lock()
        self.trims = 0

    def used(self, nbytes: int) -> None:
        if nbytes >= self.large:
            with self._lock:
                self._last = self.clock()

    def maybe(self) -> bool:
        """Trim if a burst ended ``quiet`` seconds ago; True if it trimmed."""
        with self._lock:
            if self._last is None or self.clock() - self._last < self.quiet:
                return False
            self._last = None
        self.trims += 1
        released = trim()
        log.debug("large buffers no longer in use: heap trimmed (released: %s)", released)
        return True
