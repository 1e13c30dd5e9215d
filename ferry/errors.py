"""Errors shared by every Ferry component.

Each error class's docstring is its message template (``str.format`` fields
come from the keyword arguments).  ``exit_code`` is stable: scripts may rely on
it.  ``retryable`` tells retry loops whether trying again can help; fatal
errors stop the loop at once.

Operator errors (bad settings, a missing device, a refused certificate) print
one line and exit non-zero; anything that is not a ``FerryError`` is a bug and
prints a traceback (see :func:`ferry.process.run_main`).
"""

from __future__ import annotations


class FerryError(Exception):
    """{detail}"""

    exit_code = 1
    retryable = False

    def __init__(self, **fields: object) -> None:
        self.fields = fields
        super().__init__(self.render())

    def render(self) -> str:
        template = (type(self).__doc__ or "{detail}").strip().splitlines()[0]
        try:
            return template.format(**self.fields)
        except (KeyError, IndexError):
            return f"{template} {self.fields!r}"


class RetryableError(FerryError):
    """{detail}"""

    exit_code = 75  # EX_TEMPFAIL
    retryable = True


class ConfigError(FerryError):
    """invalid settings in {path}: {problem}"""

    exit_code = 2


class UsageError(FerryError):
    """{detail}"""

    exit_code = 2


class DeviceError(FerryError):
    """cannot use {device}: {problem}"""

    exit_code = 3


class TrackerUnavailable(FerryError):
    """block-layer tracing is not available for {device}: {problem}"""

    exit_code = 3


class SegmentCorrupt(FerryError):
    """segment {name} failed verification: {why}"""

    exit_code = 4


class ProtocolError(FerryError):
    """protocol error from {peer}: {problem}"""

    exit_code = 5


class LeaseHeld(FerryError):
    """disk {disk} is owned by another master target (lease on {blob} is held); stop it first or run with --wait"""

    exit_code = 6


class StorageUnavailable(RetryableError):
    """storage at {endpoint} is unavailable: {problem}"""


class PeerUnavailable(RetryableError):
    """cannot reach {peer}: {problem}"""


class SpoolFull(RetryableError):
    """spool {path} is over its limit ({used} of {limit} bytes)"""


class NotFound(FerryError):
    """{what} does not exist"""

    exit_code = 7
