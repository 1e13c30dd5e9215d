"""Change batches: what the agent ships and the master target applies.

A batch is one step of one disk's change stream: ``(tenant, disk, gen, seq)``
plus a list of extents and the bytes of the data extents, optionally closed by
a tag.  Extents carry absolute content (``data``) or say the range reads as
zeros (``zero``), so applying a batch twice is harmless.
"""

from __future__ import annotations

import dataclasses
from typing import Any

DATA = "d"
"""Extent kind: the payload carries ``length`` bytes for it."""
ZERO = "z"
"""Extent kind: the range is all zeros; the payload carries nothing for it."""

KEEP_MIN = 64 << 10
"""Shortest piece a :class:`Gathered` payload keeps as a view rather than copies, in bytes:
shorter ones are copied together, so the TLS records and writes they go out in stay long."""


class Gathered:
    """A batch's data in parts, in extent order, as the agent ships it without a copy.

    Long pieces are views of the buffers they were read into (kept alive, never
    overwritten, while viewed: ferry.blockio.DirectReader's ``keep``); short ones
    are copied together into a bytearray.  ``bytes()`` joins them (to save them).
    """

    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: list[bytearray | memoryview] = []
        self.size = 0

    def add(self, data: memoryview, keep: bool) -> None:
        """Append ``data``: as the view itself if ``keep`` and it is long, else copied."""
        if keep and len(data) >= KEEP_MIN:
            self.parts.append(data)
        elif self.parts and isinstance(self.parts[-1], bytearray):
            self.parts[-1] += data
        else:
            self.parts.append(bytearray(data))
        self.size += len(data)

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)


Payload = bytes | bytearray | memoryview | Gathered
"""A batch's data: bytes or a bytearray as received, a view of a reused buffer as the master
target decompresses it (ferry.segment.decode), :class:`Gathered` as the agent reads it."""


def contiguous(payload: Payload) -> bytes | bytearray | memoryview:
    """``payload`` in one piece: itself, or a :class:`Gathered` payload's parts joined."""
    return bytes(payload) if isinstance(payload, Gathered) else payload


@dataclasses.dataclass
class Batch:
    """One numbered step of a disk's change stream."""

    tenant: str
    disk: str
    gen: int
    seq: int
    disk_size: int
    extents: list[tuple[int, int, str]]
    payload: Payload = b""
    tag: dict[str, Any] | None = None

    def header(self) -> dict[str, Any]:
        """The JSON-able description of this batch (everything but the payload)."""
        return {
            "tenant": self.tenant,
            "disk": self.disk,
            "gen": self.gen,
            "seq": self.seq,
            "disk_size": self.disk_size,
            "extents": [list(e) for e in self.extents],
            "tag": self.tag,
        }

    @classmethod
    def from_header(
        cls, header: dict[str, Any], payload: Payload, payload_len: int | None = None
    ) -> Batch:
        """Rebuild a batch from :meth:`header` output and its payload; ValueError if inconsistent."""
        try:
            extents = [(int(o), int(n), str(k)) for o, n, k in header["extents"]]
            batch = cls(
                tenant=str(header["tenant"]),
                disk=str(header["disk"]),
                gen=int(header["gen"]),
                seq=int(header["seq"]),
                disk_size=int(header["disk_size"]),
                extents=extents,
                payload=payload,
                tag=header.get("tag"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed batch header: {exc!r}")
        problem = batch.problem(payload_len)
        if problem:
            raise ValueError(problem)
        return batch

    def data_length(self) -> int:
        """Bytes of payload the extents call for."""
        return sum(n for _, n, k in self.extents if k == DATA)

    def problem(self, payload_len: int | None = None) -> str | None:
        """Describe what is inconsistent in this batch, or None.

        ``payload_len`` stands in for the payload's length when the payload
        is not at hand (a segment verified without decompressing it).
        """
        if self.gen < 1 or self.seq < 1:
            return f"generation and sequence must be >= 1 (got {self.gen}, {self.seq})"
        for offset, length, kind in self.extents:
            if kind not in (DATA, ZERO):
                return f"unknown extent kind {kind!r}"
            if offset < 0 or length <= 0 or offset + length > self.disk_size:
                return f"extent {offset}+{length} outside disk of {self.disk_size} bytes"
        have = len(self.payload) if payload_len is None else payload_len
        if self.data_length() != have:
            return f"payload is {have} bytes, extents call for {self.data_length()}"
        return None

    def pieces(self):
        """Yield ``(offset, memoryview-or-None, length)`` for each extent; None means zeros."""
        view = memoryview(contiguous(self.payload))
        pos = 0
        for offset, length, kind in self.extents:
            if kind == DATA:
                yield offset, view[pos : pos + length], length
                pos += length
            else:
                yield offset, None, length
