"""Playing the process server: segments packed, uploaded and announced as docs/design.md says.

The master target's tests build batches themselves and hand them to
:class:`SegmentShipper`, which does what the process server does with them.
"""

from __future__ import annotations

import time
import uuid

from ferry import naming, segment
from ferry.batch import DATA, ZERO, Batch
from ferry.storage import Storage

DISK = "disk0"
"""The disk every shipper ships for."""


class SegmentShipper:
    """Plays the process server for a master target: uploads segments and announces them."""

    def __init__(self, storage: Storage, tenant: str, disk_size: int, key: bytes | None = None):
        self.storage = storage
        self.tenant = tenant
        self.disk_size = disk_size
        self.key = key
        self.queue = naming.disk_queue(tenant, DISK)

    def batch(self, gen: int, seq: int, writes: list, tag: bool = False) -> Batch:
        """A batch of ``writes``: ``(offset, bytes)`` for data, ``(offset, int)`` for zeros."""
        extents, payload = [], []
        for offset, what in writes:
            if isinstance(what, int):
                extents.append((offset, what, ZERO))
            else:
                extents.append((offset, len(what), DATA))
                payload.append(what)
        label = {"id": f"{gen}-{seq}", "kind": "crash", "t0_mono_ns": time.monotonic_ns()}
        label.update(t0_wall=time.time(), frozen=False)
        return Batch(
            tenant=self.tenant,
            disk=DISK,
            gen=gen,
            seq=seq,
            disk_size=self.disk_size,
            extents=extents,
            payload=b"".join(payload),
            tag=label if tag else None,
        )

    def upload(self, batch: Batch, data: bytes | None = None, key: bytes | None = None) -> dict:
        """Put the segment blob (``data`` replaces the packed bytes) and return its notice."""
        packed, checksum = segment.pack(batch, key=key or self.key)
        blob = naming.segment_blob(self.tenant, DISK, batch.gen, batch.seq)
        self.storage.put(
            naming.segments_container(self.tenant, DISK), blob, packed if data is None else data
        )
        return {
            "type": "segment",
            "tenant": self.tenant,
            "disk": DISK,
            "gen": batch.gen,
            "seq": batch.seq,
            "blob": blob,
            "checksum": checksum,
            "bytes": len(packed),
            "tag": batch.tag["id"] if batch.tag else None,
        }

    def announce(self, notice: dict) -> None:
        self.storage.send(self.queue, notice)

    def ship(self, batch: Batch) -> dict:
        notice = self.upload(batch)
        self.announce(notice)
        return notice

    def ask_resync(self, request_id: str | None = None, block_size: int = 4096) -> str:
        request_id = request_id or uuid.uuid4().hex
        self.storage.send(
            self.queue,
            {
                "type": "resync",
                "tenant": self.tenant,
                "disk": DISK,
                "request_id": request_id,
                "block_size": block_size,
            },
        )
        return request_id

    def answer(self, request_id: str) -> dict:
        return self.storage.get_json(
            naming.control_container(self.tenant, DISK),
            naming.resync_answer_blob(self.tenant, DISK, request_id),
        )

    def state(self) -> dict:
        return self.storage.get_json(
            naming.control_container(self.tenant, DISK), naming.disk_state_blob(self.tenant, DISK)
        )

    def segment_blobs(self) -> list[str]:
        return self.storage.list(
            naming.segments_container(self.tenant, DISK), f"{self.tenant}/{DISK}/"
        )

    def poisoned(self) -> list[dict]:
        poison = naming.poison_queue(self.queue)
        return [m.body for m in self.storage.receive(poison, count=32, visibility=1)]
