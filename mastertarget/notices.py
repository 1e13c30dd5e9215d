"""Parsing the notices on a disk's queue (the format and its checks: ferry/notice.py).

The master target's side of the contract: every field is checked by
:func:`ferry.notice.parse` before it is used, and a notice that fails is a
:class:`BadNotice` here (``segment`` set when it claimed to be a segment, so
the worker can move it to the poison queue and say which batch is missing).
"""

from __future__ import annotations

from typing import Any

from ferry import notice
from ferry.notice import ResyncNotice, SegmentNotice
from mastertarget.errors import BadNotice

__all__ = ["ResyncNotice", "SegmentNotice", "parse"]


def parse(body: dict[str, Any], tenant: str, disk: str) -> SegmentNotice | ResyncNotice:
    """Turn a queue message body into a notice for (tenant, disk); BadNotice if unusable."""
    try:
        return notice.parse(body, tenant, disk)
    except notice.InvalidNotice as exc:
        raise BadNotice(exc.why, segment=exc.segment) from exc
