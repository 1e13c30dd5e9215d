"""Errors shared by every Ferry component.

Each error class's docstring is its message template (``str.format`` fields
come from the keyword arguments).  ``exit_code`` is stable: scripts may rely on
it.  ``retryable`` tells retry loops whether trying again can help; fatal
errors stop the loop at once.

Operator errors (bad settings, a missing device, a refused certificate) print
one line and exit non-zero; anything that is not a ``FerryError`` is a bug and
prints a traceback (see :func:`ferry.process.run_main`).

Exit codes come from one table, :data:`EXIT_CODES`: each code means one
thing, whichever command exits with it (docs/design.md, "Errors and exit
codes", is the operators' copy; a test keeps the two equal and every
error class's code in the table).
"""

from __future__ import annotations

import enum


@enum.unique
class Exit(enum.IntEnum):
    """Ferry's exit codes by name; :data:`EXIT_CODES` says what each means."""

    OK = 0
    FAILED = 1
    USAGE = 2
    DEVICE = 3
    CORRUPT = 4
    PROTOCOL = 5
    HELD = 6
    NOT_FOUND = 7
    REFUSED = 8
    NO_TAG = 9
    LEASE_LOST = 10
    STATE_UNREADABLE = 11
    VHD_INVALID = 12
    CUTOVER = 13
    UNTRUSTED = 14
    COMMAND_FAILED = 15
    DEVKIT = 16
    PART_MISSING = 17
    CANNOT_LISTEN = 69  # EX_UNAVAILABLE
    BUG = 70  # EX_SOFTWARE
    SPOOL = 73  # EX_CANTCREAT
    RETRY_LATER = 75  # EX_TEMPFAIL
    INTERRUPTED = 130  # 128 + SIGINT


EXIT_CODES: dict[int, str] = {
    Exit.OK: "done",
    Exit.FAILED: "failed for a reason without a code of its own (the error line says why)",
    Exit.USAGE: "the command line, a settings file or a credentials file is wrong",
    Exit.DEVICE: "a local block device cannot be used, or block tracing is unavailable for it",
    Exit.CORRUPT: "a segment failed verification",
    Exit.PROTOCOL: "a peer broke the agent/process-server wire protocol",
    Exit.HELD: "another process holds what this one needs (a disk's owner lease, a state directory)",
    Exit.NOT_FOUND: "something named does not exist",
    Exit.REFUSED: "the configuration server refused the request (its reason is in the line)",
    Exit.NO_TAG: "no consistency tag was taken (a freeze hook failed, a timeout, the agent stopping)",
    Exit.LEASE_LOST: "a master target lost a disk's owner lease while applying to it",
    Exit.STATE_UNREADABLE: "local state (a master target's cursor) is unreadable",
    Exit.VHD_INVALID: "a file is not a valid fixed VHD",
    Exit.CUTOVER: "a cutover step failed (source fence, target conversion or check)",
    Exit.UNTRUSTED: "TLS to the configuration server failed: certificate not trusted, or no TLS",
    Exit.COMMAND_FAILED: "a command from the configuration server could not be carried out",
    Exit.DEVKIT: "the development kit could not start or drive its embedded deployment",
    Exit.PART_MISSING: "this install lacks a library the command needs (install its part's extra)",
    Exit.CANNOT_LISTEN: "cannot listen on the configured address",
    Exit.BUG: "a bug in Ferry: a thread died with a traceback in the log (please report it)",
    Exit.SPOOL: "the process server's spool directory cannot be used",
    Exit.RETRY_LATER: "temporarily unavailable (storage, a peer, the configuration server): retry later",
    Exit.INTERRUPTED: "interrupted (Ctrl-C)",
}
"""What each exit code means, for operators and scripts; codes never change meaning."""


class FerryError(Exception):
    """{detail}"""

    exit_code = Exit.FAILED
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

    exit_code = Exit.RETRY_LATER
    retryable = True


class ConfigError(FerryError):
    """invalid settings in {path}: {problem}"""

    exit_code = Exit.USAGE


class UsageError(FerryError):
    """{detail}"""

    exit_code = Exit.USAGE


class DeviceError(FerryError):
    """cannot use {device}: {problem}"""

    exit_code = Exit.DEVICE


class TrackerUnavailable(FerryError):
    """block-layer tracing is not available for {device}: {problem}"""

    exit_code = Exit.DEVICE


class SegmentCorrupt(FerryError):
    """segment {name} failed verification: {why}"""

    exit_code = Exit.CORRUPT


class ProtocolError(FerryError):
    """protocol error from {peer}: {problem}"""

    exit_code = Exit.PROTOCOL


class LeaseHeld(FerryError):
    """disk {disk} is owned by another master target (lease on {blob} is held); stop it first or run with --wait"""

    exit_code = Exit.HELD


class StorageUnavailable(RetryableError):
    """storage at {endpoint} is unavailable: {problem}"""


class PeerUnavailable(RetryableError):
    """cannot reach {peer}: {problem}"""


class SpoolFull(RetryableError):
    """spool {path} is over its limit ({used} of {limit} bytes)"""


class NotFound(FerryError):
    """{what} does not exist"""

    exit_code = Exit.NOT_FOUND
