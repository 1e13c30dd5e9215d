"""The notices on a disk's queue: what the process server announces, what the master target reads.

Written by the process server (processserver/uploader.py, processserver/relay.py),
parsed by the master target (mastertarget/notices.py), both through this
module.  A notice is a JSON object on the queue :func:`ferry.naming.disk_queue`::

    {"type": "segment", "tenant": "demo", "disk": "web01-disk0", "gen": 1, "seq": 42,
     "blob": "demo/web01-disk0/00000001/000000000042.seg",
     "checksum": "<32 hex digits: the segment's xxh3-128>", "bytes": 81234, "tag": null}

    {"type": "resync", "tenant": "demo", "disk": "web01-disk0",
     "request_id": "<REQUEST_ID_RE>", "block_size": 65536}

Every field is checked before it is used: a notice names blobs that the
master target reads, writes and deletes, so a wrong one must be refused, not
followed.  In particular the segment blob is always derived from
``(tenant, disk, gen, seq)`` with :func:`ferry.naming.segment_blob`; a notice
naming any other blob is refused, so it can never make a reader delete a
blob of another disk.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, TypeGuard

from ferry import naming
from ferry.naming import REQUEST_ID_RE

RESYNC_MIN_BLOCK = 512
"""Smallest resync digest block, in bytes; a block size is a multiple of it."""

RESYNC_MAX_BLOCK = 16 << 20
"""Largest resync digest block, in bytes."""

CHECKSUM_RE = re.compile(r"^[0-9a-f]{32}$")
"""A segment's checksum as a notice carries it: xxh3-128 in lowercase hex (ferry/segment.py)."""


class InvalidNotice(ValueError):
    """A notice that cannot be used; ``why`` says why, ``segment`` if it claimed to be a segment."""

    def __init__(self, why: str, segment: bool = False) -> None:
        super().__init__(why)
        self.why = why
        self.segment = segment


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


def segment(
    tenant: str, disk: str, gen: int, seq: int, checksum: str, size: int, tag: str | None
) -> dict[str, Any]:
    """The notice announcing segment (gen, seq) of a disk, ``size`` bytes, stored at its blob."""
    return {
        "type": "segment",
        "tenant": tenant,
        "disk": disk,
        "gen": gen,
        "seq": seq,
        "blob": naming.segment_blob(tenant, disk, gen, seq),
        "checksum": checksum,
        "bytes": size,
        "tag": tag,
    }


def resync(tenant: str, disk: str, request_id: str, block_size: int) -> dict[str, Any]:
    """The notice relaying a source's resync request to the disk's master target."""
    return {
        "type": "resync",
        "tenant": tenant,
        "disk": disk,
        "request_id": request_id,
        "block_size": block_size,
    }


def parse(body: dict[str, Any], tenant: str, disk: str) -> SegmentNotice | ResyncNotice:
    """Turn a queue message body into a notice for (tenant, disk); InvalidNotice if unusable."""
    kind = body.get("type")
    if kind not in ("segment", "resync"):
        raise InvalidNotice("unparseable notice" if not body else f"unknown notice type {kind!r}")
    if body.get("tenant") != tenant or body.get("disk") != disk:
        # Not a batch of this disk: nothing of this disk's stream is lost.
        raise InvalidNotice(
            f"{kind} notice for {body.get('tenant')!r}/{body.get('disk')!r} on the queue of "
            f"{tenant}/{disk}"
        )
    if kind == "segment":
        return _segment(body, tenant, disk)
    return _resync(body)


def _segment(body: dict[str, Any], tenant: str, disk: str) -> SegmentNotice:
    gen, seq = body.get("gen"), body.get("seq")
    if not _positive_int(gen) or not _positive_int(seq):
        raise InvalidNotice(f"segment notice with gen {gen!r}, seq {seq!r}", segment=True)
    blob = naming.segment_blob(tenant, disk, gen, seq)
    if body.get("blob") != blob:
        raise InvalidNotice(f"segment notice names blob {body.get('blob')!r}, not {blob}", True)
    checksum = body.get("checksum")
    if not isinstance(checksum, str) or not CHECKSUM_RE.match(checksum):
        raise InvalidNotice(f"segment notice for {blob} has checksum {checksum!r}", segment=True)
    tag = body.get("tag")
    return SegmentNotice(gen, seq, blob, checksum, tag if isinstance(tag, str) else None)


def _resync(body: dict[str, Any]) -> ResyncNotice:
    request_id, block = body.get("request_id"), body.get("block_size")
    if not isinstance(request_id, str) or not REQUEST_ID_RE.match(request_id):
        raise InvalidNotice(f"resync notice with request_id {request_id!r}")
    low, high = RESYNC_MIN_BLOCK, RESYNC_MAX_BLOCK
    if not _positive_int(block) or not low <= block <= high or block % low:
        raise InvalidNotice(f"resync notice with block_size {block!r}")
    return ResyncNotice(request_id, block)


def _positive_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
