"""Give memory the allocator keeps back to the system, once a burst of large buffers is over.

A disk's initial sync or resync ships larger batches than replication does
(the agent's ``sync_batch_bytes``): glibc's allocator raises its mmap
threshold after freeing the first of them and then keeps up to twice that
much of the freed heap, in each thread's arena, for good.  ``malloc_trim``
hands it back (about a millisecond here); where there is no glibc (musl)
this does nothing.  ctypes calls of two libc functions: no library wraps them.

Each daemon sets the allocator up once, before any thread (:func:`tune`):

* one arena: ``malloc_trim`` returns little of what other threads' arenas
  hold (a scratch driver whose two worker threads allocated the buffers kept
  36 MiB after the trim, against nothing with one arena; the master target's
  downloads run in threads of their own).  Its large buffers are few and its
  small objects are Python's own (pymalloc), so the lock is seldom contended;
* buffers below 32 MiB come from the heap, and up to 64 MiB free at its top
  stays there: by default glibc maps the first large buffers afresh and gives
  free heap back at once, and on this VM (its free memory is reported to the
  host, so memory given back comes back as new pages, each faulted in and
  zeroed) the agent spent about a quarter of its CPU faulting in the pages of
  each new batch.  With the heap kept, a 2 GiB initial sync cost the process
  server, master target and agent 9-13% less CPU (three pairs of runs).  The
  trim after a burst still hands the sync's memory back.

The process server and the master target also run with the heap in
transparent huge pages (:data:`HUGE_PAGE_HEAP`, set by whatever starts them:
the role's environment file, devkit.embedded).  glibc reads that setting
only from the environment, at start.  Their buffers are fresh memory for each
segment, each page of it faulted in: with 2 MiB pages a 2 GiB initial sync
cost the process server 0.32 CPU s less (six pairs of runs, standard error
0.06) and the master target 0.10; the process server's peak in a sync was
21 MiB higher on average, and both hold 11-15 MiB more while replicating
(docs/performance.md, round ten).  The agent runs without it: on the source
server its memory counts more, and it gained nothing measurable.
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
    _libc = ctypes.CDLL(None)
    _malloc_trim = _libc.malloc_trim
    _malloc_trim.argtypes, _malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    _mallopt = _libc.mallopt
    _mallopt.argtypes, _mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
except (OSError, AttributeError):  # not glibc
    _malloc_trim = _mallopt = None

# glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 32 << 20
"""Buffers at least this large are mapped on their own (glibc's largest allowed value)."""
TRIM_THRESHOLD = 64 << 20
"""Free memory at the top of the heap beyond this is given back at once."""
HUGE_PAGE_HEAP = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
"""Environment that has glibc advise transparent huge pages for the heap it maps (glibc 2.35
and later; older ones ignore it).  roles/ferry_daemon/vars/main.yml sets the same."""
HUGE_PAGE_DAEMONS = frozenset({"process-server", "master-target"})
"""The daemons started with :data:`HUGE_PAGE_HEAP`."""


def tune() -> bool:
    """Set the allocator up as the module's docstring says (call before starting
    threads); True if glibc took every setting."""
    if _mallopt is None:
        return False
    took = [
        _mallopt(_M_ARENA_MAX, 1),
        _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        _mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    ]
    return all(took)


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
