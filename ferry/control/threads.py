"""What the control threads share: quiet failure logging, jitter, start and stop."""

from __future__ import annotations

import contextlib
import logging
import random
from typing import Any

from ferry.errors import FerryError

log = logging.getLogger("ferry.control")


# -- threads ----------------------------------------------------------------------------


class Quiet:
    """Logs a failure once when it starts and once when it ends."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.failing = False

    def failed(self, exc: BaseException) -> None:
        if not self.failing:
            if isinstance(exc, FerryError):
                log.warning("%s failed: %s", self.what, exc)
            else:
                log.error("%s failed", self.what, exc_info=exc)
        self.failing = True

    def succeeded(self) -> None:
        if self.failing:
            log.info("%s works again", self.what)
        self.failing = False


def jittered(seconds: float, fraction: float) -> float:
    """``seconds`` varied uniformly by up to ``fraction`` either way."""
    return seconds * random.uniform(1 - fraction, 1 + fraction)


@contextlib.contextmanager
def running(*threads: Any):
    """Start ``threads`` and stop them (in reverse order) on exit."""
    started = []
    try:
        for thread in threads:
            thread.start()
            started.append(thread)
        yield
    finally:
        for thread in reversed(started):
            thread.stop()
