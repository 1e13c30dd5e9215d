"""Parsing the notices on a disk's queue (formats in docs/design.md, "Storage layout").

Every field is checked before it is used: a notice names blobs that the
master target reads, writes and deletes, so a wrong one must be refused, not
followed.  In particular the segment blob is always derived from
``(tenant, disk, gen, seq)`` with :func:`ferry.naming.segment_blob`; a notice
naming any other blob is refused, so it can never make us delete a blob of
another disk.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from ferry import naming
from ferry.naming import REQUEST_ID_RE
from mastertarget import defaults
from mastertarget.errors import BadNotice

"""Resync request ids: they become part of a blob name."""

_CHECKSUM_RE = re.compile(r"^[0-9a-f]{32}$")


@dataclasses.dataclass(frozen=True)
class SegmentNotice:
    """A segment of (gen, seq) was uploaded as ``blob`` with ``checksum``."""

    gen: int
    seq: int
    blob: str
    checksum: str
    tag: str | None


@dataclasses.dataclass(frozen=True)
class ResyncNotice:
    """The source asked for a resync: answer with a new generation and a digest map."""

    request_id: str
    block_size: int


def parse(body: dict[str, Any], tenant: str, disk: str) -> SegmentNotice | ResyncNotice:
    """Turn a queue message body into a notice for (tenant, disk); BadNotice if unusable."""
    kind = body.get("type")
    if kind not in ("segment", "resync"):
        raise BadNotice("unparseable notice" if not body else f"unknown notice type {kind!r}")
    if body.get("tenant") != tenant or body.get("disk") != disk:
        # Not a batch of this disk: nothing of this disk's stream is lost.
        raise BadNotice(
            f"{kind} notice for {body.get('tenant')!r}/{body.get('disk')!r} on the queue of "
            f"{tenant}/{disk}"
        )
    if kind == "segment":
        return _segment(body, tenant, disk)
    return _resync(body)


def _segment(body: dict[str, Any], tenant: str, disk: str) -> SegmentNotice:
    gen, seq = body.get("gen"), body.get("seq")
    if not (_positive_int(gen) and _positive_int(seq)):
        raise BadNotice(f"segment notice with gen {gen!r}, seq {seq!r}", segment=True)
    blob = naming.segment_blob(tenant, disk, gen, seq)
    if body.get("blob") != blob:
        raise BadNotice(f"segment notice names blob {body.get('blob')!r}, not {blob}", True)
    checksum = body.get("checksum")
    if not isinstance(checksum, str) or not _CHECKSUM_RE.match(checksum):
        raise BadNotice(f"segment notice for {blob} has checksum {checksum!r}", segment=True)
    tag = body.get("tag")
    return SegmentNotice(gen, seq, blob, checksum, tag if isinstance(tag, str) else None)


def _resync(body: dict[str, Any]) -> ResyncNotice:
    request_id, block = body.get("request_id"), body.get("block_size")
    if not isinstance(request_id, str) or not REQUEST_ID_RE.match(request_id):
        raise BadNotice(f"resync notice with request_id {request_id!r}")
    low, high = defaults.RESYNC_MIN_BLOCK, defaults.RESYNC_MAX_BLOCK
    if not _positive_int(block) or not low <= block <= high or block % low:
        raise BadNotice(f"resync notice with block_size {block!r}")
    return ResyncNotice(request_id, block)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
