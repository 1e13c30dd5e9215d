"""Freezing a disk's filesystems for one instant, and never for longer than a limit.

An app-consistent pass (``agent.replicator``) and a cutover's final tag
(``agent.fence``) both freeze filesystems with ``fsfreeze``, do their work
and thaw.  A frozen filesystem blocks every writer on the source server, so
a watchdog thaws after ``limit`` seconds whatever the work is doing, and the
caller learns it (:attr:`Frozen.fired`): what it did then no longer
describes one frozen instant.

Freezing one filesystem flushes it first, which can outlast the watchdog on
a slow machine.  A lock keeps a freeze from landing after the watchdog has
thawed: that filesystem would stay frozen until the work ends (and for good
if the process were killed meanwhile).
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Iterable

from ferry.errors import Exit, FerryError

log = logging.getLogger("ferry.agent.freeze")

FSFREEZE_TIMEOUT = 60.0
"""Seconds one ``fsfreeze`` call may take (freezing flushes the filesystem first)."""


class FreezeFailed(FerryError):
    """cannot freeze {point}: {problem}"""

    exit_code = Exit.NO_TAG


class Frozen:
    """``with Frozen(points, limit) as frozen:`` freezes ``points`` in order, thaws on leaving.

    A freeze that fails thaws what was frozen and raises :class:`FreezeFailed`;
    so does an error in the ``with`` block.  After the watchdog fired, no
    further point is frozen and :attr:`fired` is True.  :meth:`thaw` may be
    called earlier, keeping some points frozen (a cutover that stops the
    source keeps its data filesystems frozen but thaws ``/``).
    """

    def __init__(self, points: Iterable[str], limit: float) -> None:
        self.points = list(points)
        self.limit = limit
        self.frozen: list[str] = []
        """The points frozen now, in the order they were frozen."""
        self.fired = False
        """True once the watchdog thawed before the work was done."""
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._started = 0.0

    @property
    def seconds(self) -> float:
        """Seconds since the first freeze was asked for."""
        return time.monotonic() - self._started

    def __enter__(self) -> Frozen:
        self._started = time.monotonic()
        self._timer = threading.Timer(self.limit, self._watchdog)
        self._timer.daemon = True
        self._timer.start()
        try:
            for point in self.points:
                with self._lock:
                    if self.fired:
                        break
                    result = subprocess.run(
                        ["fsfreeze", "-f", point], capture_output=True, text=True,
                        timeout=FSFREEZE_TIMEOUT,
                    )  # fmt: skip
                    if result.returncode != 0:
                        problem = result.stderr.strip() or f"exit status {result.returncode}"
                        raise FreezeFailed(point=point, problem=problem)
                    self.frozen.append(point)
        except BaseException:
            self.thaw()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.thaw()

    def thaw(self, keep: Iterable[str] = ()) -> None:
        """Stop the watchdog and thaw every frozen point (newest first) but ``keep``.

        Points in ``keep`` stay frozen and are the caller's from then on: neither
        the watchdog nor leaving the ``with`` thaws them.
        """
        if self._timer is not None:
            self._timer.cancel()
        kept = set(keep)
        with self._lock:
            _thaw([p for p in self.frozen if p not in kept], from_watchdog=False)
            self.frozen = []

    def _watchdog(self) -> None:
        with self._lock:
            self.fired = True
            _thaw(self.frozen, from_watchdog=True)
            self.frozen = []


def _thaw(points: list[str], from_watchdog: bool) -> None:
    for point in reversed(points):
        try:
            result = subprocess.run(
                ["fsfreeze", "-u", point], capture_output=True, text=True, timeout=FSFREEZE_TIMEOUT
            )
        except subprocess.TimeoutExpired:  # the others are thawed all the same
            log.error("thawing %s took longer than %g s", point, FSFREEZE_TIMEOUT)
            continue
        if result.returncode != 0:  # its writers stay blocked: say so, loudly
            log.error("cannot thaw %s: %s", point,
                      result.stderr.strip() or f"exit status {result.returncode}")  # fmt: skip
        elif from_watchdog:
            log.error("watchdog thawed %s: a freeze outlived its limit", point)
