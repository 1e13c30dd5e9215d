"""Failed authentications, counted per client address, slow down token guessing.

A client address that sent more than ``limit`` requests with a wrong
credential within a minute gets 429 (with Retry-After) for every request
until a minute has passed since its last failure; other addresses, and so
the holders of real credentials elsewhere, are not affected.  The count is
kept in the memory of each app instance (Azure Functions may run several;
each then counts on its own), bounded in size.  The client address is the
last entry of ``X-Forwarded-For``, which Azure's front end appends (and the
local ASGI host too); a client cannot forge the last entry.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

WINDOW = 60.0
"""Seconds over which failures are counted, and a blocked address stays blocked."""

ADDRESSES_KEPT = 10_000
"""Addresses remembered at most (the least recently failed are forgotten first), a count."""


class FailureLimiter:
    """Counts failures per key; says how long a key must wait."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def wait(self, key: str) -> float:
        """Seconds ``key`` must wait before it may try again (0: it may now)."""
        with self._lock:
            times = self._failures.get(key)
            if not times or len(times) < self.limit:
                return 0.0
            return max(0.0, times[-1] + WINDOW - self.clock())

    def failed(self, key: str) -> None:
        """Count one failure of ``key``."""
        now = self.clock()
        with self._lock:
            times = self._failures.pop(key, None) or deque(maxlen=self.limit)
            while times and times[0] < now - WINDOW:
                times.popleft()
            times.append(now)
            self._failures[key] = times
            while len(self._failures) > ADDRESSES_KEPT:
                self._failures.popitem(last=False)
