"""Errors only the master target raises (the shared ones live in :mod:`ferry.errors`)."""

from __future__ import annotations

from ferry.errors import Exit, FerryError


class LeaseLost(FerryError):
    """lost the owner lease of disk {disk} ({problem}); stopped applying to it"""

    exit_code = Exit.LEASE_LOST


class StateInUse(FerryError):
    """state directory {path} is in use by another master target process on this host"""

    exit_code = Exit.HELD


class CursorUnreadable(FerryError):
    """cursor {path} is unreadable ({problem}); restore it or remove the disk's state to resync"""

    exit_code = Exit.STATE_UNREADABLE


class BadNotice(Exception):
    """A queue notice that cannot be used; the message says why (not an operator error)."""

    def __init__(self, why: str, segment: bool = False) -> None:
        super().__init__(why)
        self.why = why
        self.segment = segment
