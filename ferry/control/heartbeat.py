"""The heartbeat thread."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ferry.control.client import Client
from ferry.control.defaults import HEARTBEAT_INTERVAL, HEARTBEAT_JITTER
from ferry.control.threads import Quiet, jittered


class Heartbeat(threading.Thread):
    """Sends ``status()`` as a heartbeat now and every ``interval`` seconds (with jitter)."""

    def __init__(
        self,
        client: Client,
        status: Callable[[], dict[str, Any]],
        interval: float = HEARTBEAT_INTERVAL,
        jitter: float = HEARTBEAT_JITTER,
    ) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.client = client
        self.status = status
        self.interval = interval
        self.jitter = jitter
        self.halt = threading.Event()
        self.sent = 0
        self._quiet = Quiet("heartbeat")

    def run(self) -> None:
        while True:
            self.beat()
            if self.halt.wait(jittered(self.interval, self.jitter)):
                return

    def beat(self) -> bool:
        """Send one heartbeat; False (logged once) if it failed."""
        try:
            self.client.heartbeat(self.status())
        except Exception as exc:  # a heartbeat must never end the thread
            self._quiet.failed(exc)
            return False
        self._quiet.succeeded()
        self.sent += 1
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Stop beating (the server marks the component lost after 60 s)."""
        self.halt.set()
        if self.is_alive():
            self.join(timeout)
