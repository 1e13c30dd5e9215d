"""What the agent keeps in its state directory about each disk.

``disks/<disk>.identity.json`` — the disk's identity, recorded at first
protection and checked at every start and before every resync::

    {"disk": "web01-disk0", "device": "/dev/disk/by-id/...", "identity": "serial:S3Z9NB0K",
     "size": 10737418240, "recorded_at": 1795671234.1}

``disks/<disk>.stop.json`` — written at an orderly stop, consumed (deleted,
durably) before the next start uses it; see docs/design.md, "Restarts"::

    {"disk", "identity", "size", "block", "gen", "next_seq", "last_tag",
     "dirty": <base64 roaring bitmap>, "target_zero": <base64 roaring bitmap>,
     "boot_id", "instance", "devs", "lost_events", "filesystems_rw": [...], "stopped_at",
     "unacked": [{"header": <batch header>, "length": n, "sha256": hex}, ...]}

``disks/<disk>.unacked`` — the payloads of the batches listed in ``unacked``
(sent, never acknowledged: at an orderly reboot the network is often gone
before the agent stops), one after another; written before the stop record,
which commits both; consumed with it.

All are written durably (temporary file, fsync, rename, fsync directory).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyroaring import BitMap

from ferry.batch import Batch, contiguous
from ferry.durable import fsync_dir, read_json, write_atomic, write_json

log = logging.getLogger("ferry.agent")


def _dir(state_dir: str | Path) -> Path:
    path = Path(state_dir) / "disks"
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_identity(
    state_dir: str | Path, disk: str, device: str, found: str, size: int
) -> tuple[str, str | None]:
    """Compare ``found`` (and ``size``) with the identity recorded for ``disk``.

    Records them at first protection.  Returns ``(recorded identity,
    problem)``; ``problem`` is None when the device is the disk first protected.
    """
    path = _dir(state_dir) / f"{disk}.identity.json"
    record = read_json(path)
    if record is None:
        record = {
            "disk": disk,
            "device": device,
            "identity": found,
            "size": size,
            "recorded_at": time.time(),
        }
        write_json(path, record)
        log.info("disk %s: recorded the identity of %s: %s", disk, device, found)
        return found, None
    return record["identity"], mismatch(record["identity"], record["size"], device, found, size)


def mismatch(recorded: str, recorded_size: int, device: str, found: str, size: int) -> str | None:
    """The problem line when ``device`` is not the disk recorded, else None."""
    if found != recorded:
        return f"{device} is {found}, not the disk first protected ({recorded})"
    if size != recorded_size:
        return f"{device} holds {size} bytes, not the {recorded_size} first protected"
    return None


def recorded_size(state_dir: str | Path, disk: str) -> int | None:
    """The size recorded with ``disk``'s identity (None before its first protection)."""
    record = read_json(_dir(state_dir) / f"{disk}.identity.json")
    return None if record is None else int(record["size"])


# -- the dirty map across an orderly stop ----------------------------------------------


def bitmap_text(bits: BitMap) -> str:
    """A roaring bitmap as base64 text (JSON-safe)."""
    return base64.b64encode(bits.serialize()).decode()


def bitmap_from(text: str) -> BitMap:
    """The inverse of :func:`bitmap_text`."""
    return BitMap.deserialize(base64.b64decode(text))


def save_stop(
    state_dir: str | Path, disk: str, record: dict[str, Any], unacked: Sequence[Batch] = ()
) -> None:
    """Durably record ``disk``'s state at an orderly stop, with its unacknowledged batches.

    The payloads go first, then the record that lists them (the commit point):
    a crash in between leaves no record, so the next start resyncs.
    """
    path = _dir(state_dir) / f"{disk}.stop.json"
    payloads = [contiguous(b.payload) for b in unacked]
    listed = [
        {"header": b.header(), "length": len(p), "sha256": hashlib.sha256(p).hexdigest()}
        for b, p in zip(unacked, payloads, strict=True)
    ]
    if unacked:
        write_atomic(_dir(state_dir) / f"{disk}.unacked", payloads)
    write_json(path, {"disk": disk, **record, "unacked": listed})


def take_stop(state_dir: str | Path, disk: str) -> dict[str, Any] | None:
    """Read and durably remove ``disk``'s stop record (None if there is none).

    Removed before the agent acts on it: a crash after this start must never
    find it again, or it would trust a map that stopped being complete.  The
    unacknowledged batches it lists are returned rebuilt in ``batches``; a
    record whose batches cannot be read whole is ``unreadable``.
    """
    path = _dir(state_dir) / f"{disk}.stop.json"
    payloads = path.parent / f"{disk}.unacked"
    try:
        record = read_json(path)
    except ValueError:
        record = {"unreadable": True}
    if record is not None and not record.get("unreadable"):
        try:
            record["batches"] = _batches(record.get("unacked") or [], payloads)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("disk %s: the batches of its stop record cannot be read: %s", disk, exc)
            record = {"unreadable": True}
    removed = False
    for file in (path, payloads):
        if file.exists():
            os.unlink(file)
            removed = True
    if removed:
        fsync_dir(path.parent)
    return record


def _batches(listed: list[dict[str, Any]], payloads: Path) -> list[Batch]:
    """The batches ``listed`` in a stop record, their payloads checked against their digests."""
    if not listed:
        return []
    data = memoryview(payloads.read_bytes())
    batches, at = [], 0
    for item in listed:
        payload = bytes(data[at : at + item["length"]])
        at += item["length"]
        if hashlib.sha256(payload).hexdigest() != item["sha256"]:
            raise ValueError(f"seq {item['header'].get('seq')} does not match its digest")
        batches.append(Batch.from_header(item["header"], payload))
    if at != len(data):
        raise ValueError(f"{len(data) - at} bytes more than the batches listed")
    return batches


def boot_id() -> str:
    """This boot's id (a reboot changes it)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""
