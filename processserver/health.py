"""Storage health as the process server sees it, and the pauses between retries.

Every thread that talks to storage reports here.  An outage is logged once
when it starts and once when it ends, however many threads and attempts
fail in between, so an hour without the cloud is two log lines, not
thousands.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from processserver import defaults

log = logging.getLogger("ferry.processserver")


class StorageHealth:
    """Whether storage answered the last time anyone asked, and the last error."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._last_error: dict[str, Any] | None = None

    def failed(self, what: str, error: Exception) -> None:
        """Record a failed storage call; log it if it starts an outage."""
        with self._lock:
            starts = self._down_since is None
            if starts:
                self._down_since = time.monotonic()
            self._last_error = {"time": time.time(), "during": what, "message": str(error)}
        if starts:
            log.warning("storage unavailable while %s: %s; retrying until it is back", what, error)

    def succeeded(self) -> None:
        """Record a storage call that worked; log the end of an outage."""
        with self._lock:
            since, self._down_since = self._down_since, None
        if since is not None:
            log.info("storage is reachable again after %.0f s", time.monotonic() - since)

    @property
    def available(self) -> bool:
        """False during an outage."""
        with self._lock:
            return self._down_since is None

    def last_error(self) -> dict[str, Any] | None:
        """``{time, during, message}`` of the most recent failure, or None."""
        with self._lock:
            return dict(self._last_error) if self._last_error else None


class Backoff:
    """Exponential pauses between retries, from RETRY_MIN up to RETRY_MAX seconds."""

    def __init__(self, first: float = defaults.RETRY_MIN, most: float = defaults.RETRY_MAX) -> None:
        self.first = first
        self.most = most
        self._next = first

    def pause(self) -> float:
        """The next pause, in seconds (each one twice the last, up to the maximum)."""
        pause, self._next = self._next, min(self._next * 2, self.most)
        return pause

    def reset(self) -> None:
        """Start again from the first pause."""
        self._next = self.first
