"""Test harnesses the test modules share; no test module imports another.

``api``: the configuration server's ASGI app in-process (its fixtures are a
plugin of conftest).  ``config_server``: the real server as a process, and
``python -m functions.local`` as operators start it.  ``operator``: an
operator of one tenant.  ``daemons``: the three daemons of a machine in
server mode.  ``process_server`` and ``master_target``: those daemons as
processes; ``segments``: segments shipped as the process server ships them.
``disks``: loop devices.  ``leaks``: what a session must not leave behind.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent.parent
"""The checkout the tests run from."""

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T],
    timeout: float,
    what: str | Callable[[], str],
    interval: float = 0.05,
) -> T:
    """Poll ``condition`` until it returns something true and return that.

    Fails the test naming ``what`` (a string, or a callable giving one, e.g. a
    log's tail) if ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        if time.monotonic() >= deadline:
            detail = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g} s waiting for {detail}")
        time.sleep(interval)
