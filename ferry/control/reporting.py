"""Reports of disks, recovery points and component state to the configuration server."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ferry.control.client import Client
from ferry.control.defaults import RECOVERY_POINTS_QUEUED, REPORT_INTERVAL, REPORT_REFRESH
from ferry.control.errors import ControlRefused
from ferry.control.threads import Quiet

log = logging.getLogger("ferry.control")


class Reporter(threading.Thread):
    """Reports disk metrics every ``interval`` seconds and every queued recovery point.

    ``metrics()`` returns ``{disk: {field: value}}``; a disk is reported when
    its metrics changed or ``refresh`` seconds passed.  Recovery points are
    sent oldest first and kept (up to RECOVERY_POINTS_QUEUED) while the
    server cannot be reached.
    """

    def __init__(
        self,
        client: Client,
        metrics: Callable[[], dict[str, dict[str, Any]]] | None = None,
        interval: float = REPORT_INTERVAL,
        refresh: float = REPORT_REFRESH,
    ) -> None:
        super().__init__(name="reporter", daemon=True)
        self.client = client
        self.metrics = metrics
        self.interval = interval
        self.refresh = refresh
        self.halt = threading.Event()
        self.wake = threading.Event()
        self._points: deque[dict[str, Any]] = deque(maxlen=RECOVERY_POINTS_QUEUED)
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, str]] = {}
        self._quiet = Quiet("reporting to the configuration server")
        self.points_sent = 0

    def recovery_point(self, disk: str, tag: dict[str, Any], gen: int, seq: int) -> None:
        """Queue a recovery point for sending (never blocks)."""
        with self._lock:
            self._points.append({"disk": disk, "tag": tag, "gen": gen, "seq": seq})
        self.wake.set()

    def run(self) -> None:
        while not self.halt.is_set():
            self.flush()
            self.wake.wait(self.interval)
            self.wake.clear()
        self.flush()

    def flush(self) -> None:
        """Send queued recovery points and due disk reports now."""
        try:
            self._send_points()
            self._send_metrics()
        except Exception as exc:  # kept for the next round
            self._quiet.failed(exc)
            return
        self._quiet.succeeded()

    def _send_points(self) -> None:
        while True:
            with self._lock:
                if not self._points:
                    return
                point = self._points[0]
            try:
                self.client.recovery_point(**point)
            except ControlRefused as exc:  # never accepted: do not block the others
                log.warning("the server refused recovery point %s: %s", point["tag"], exc)
            with self._lock:
                if self._points and self._points[0] is point:
                    self._points.popleft()
            self.points_sent += 1

    def _send_metrics(self) -> None:
        if self.metrics is None:
            return
        now = time.monotonic()
        for disk, values in self.metrics().items():
            text = json.dumps(values, sort_keys=True, default=str)
            then, before = self._last.get(disk, (float("-inf"), ""))
            if text == before and now - then < self.refresh:
                continue
            try:
                self.client.report_disk(disk, values)
            except ControlRefused as exc:
                log.warning("the server refused the report of disk %s: %s", disk, exc)
            self._last[disk] = (now, text)

    def stop(self, timeout: float = 10.0) -> None:
        """Send what is queued (one try) and stop."""
        self.halt.set()
        self.wake.set()
        if self.is_alive():
            self.join(timeout)
