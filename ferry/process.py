"""Process entry-point plumbing: one error line for operators, tracebacks for bugs,
logging to stderr, and signal handling that only sets flags."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

from ferry.errors import Exit, FerryError

log = logging.getLogger("ferry")


def setup_logging(component: str, verbose: bool = False) -> None:
    """Log to stderr as ``time component level message``; never log secrets."""
    level = logging.DEBUG if verbose or os.environ.get("FERRY_DEBUG") else logging.INFO
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {component} %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("azure").setLevel(logging.WARNING)


def run_main(component: str, body: Callable[[], int | None]) -> int:
    """Run ``body``; map a FerryError to one line on stderr and its exit code."""
    try:
        return int(body() or 0)
    except FerryError as exc:
        print(f"{component}: error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print(f"{component}: interrupted", file=sys.stderr)
        return int(Exit.INTERRUPTED)


class StopFlag:
    """Signal handling that only sets flags.

    The first SIGTERM/SIGINT asks the daemon to finish the batch in hand and
    stop; a second one exits at once.
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        self._count = 0

    def install(self) -> StopFlag:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, _frame: object) -> None:
        self._count += 1
        if self._count > 1:
            os._exit(128 + signum)
        self.event.set()

    @property
    def stopping(self) -> bool:
        return self.event.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if a stop was asked meanwhile."""
        return self.event.wait(seconds)
