"""The lab's operator errors: one line each, the message template in the docstring."""

from __future__ import annotations

from ferry.errors import FerryError


class LabError(FerryError):
    """lab: {detail}"""

    exit_code = 1


class BuildFailed(LabError):
    """lab image build failed at {step}: {detail}"""


class GuestNotReady(LabError):
    """lab guest not ready after {seconds:.0f} s ({last}); serial console: {console}"""


class GuestGone(LabError):
    """lab guest's QEMU exited (status {status}); serial console: {console}, QEMU log: {log}"""
