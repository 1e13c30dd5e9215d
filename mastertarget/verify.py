"""The master target's side of an online verify: digest the target on the tag, compare.

A group whose closing tag carries a verify section (``ferry.verify``) is
applied as any other; then, with the target sitting exactly on that tag and
the apply lock still held (the next group waits, the queue is still
received and staged), the section's ranges of the target are digested and
compared with the source's digests.  The hold lasts one range's read (at
most 64 MiB), never the whole disk.  Nothing on the target is changed: a
repair is the agent's (it ships the differing blocks again).

Results accumulate per disk in ``<state_dir>/<disk>/verify.json`` (the
latest verify only) and are published with the disk's state (``verify``)::

    {"id": "v-5f2c0a9b", "state": "running"|"done", "block": 4096,
     "compared_blocks": 16384, "differing_blocks": 3,
     "differing": [[100, 1], [2049, 2]], "truncated": false,
     "unverified_blocks": 0, "repair": false, "scheduled": false,
     "first_tag": "...", "last_tag": "...", "started_at": ..., "finished_at": ...,
     "longest_hold_s": 0.081}

``longest_hold_s`` is the longest time one range's digest held applying back.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ferry import blockio, durable
from ferry import verify as fmt

log = logging.getLogger("ferry.mastertarget")

READ_BYTES = 8 << 20
"""Largest single read of the target while verifying, in bytes."""

RUNS_KEPT = 10000
"""Differing ``[first, count]`` runs kept in ``verify.json``, a count (the count stays whole)."""


class Checker:
    """Compares one disk's target with the verify sections its tags carry."""

    def __init__(self, disk: str, directory: Path, target: str) -> None:
        self.disk = disk
        self.path = directory / "verify.json"
        self.target = target
        self.report = self._load()

    def _load(self) -> dict[str, Any] | None:
        try:
            return durable.read_json(self.path)
        except (OSError, ValueError):
            return None

    def check(self, section: dict[str, Any], tag: dict[str, Any] | None) -> None:
        """Compare the target, sitting on ``tag``, with ``section``; never raises."""
        try:
            self._check(section, (tag or {}).get("id"))
        except Exception:  # a verify must never stop replication
            log.exception("disk %s: verify section at tag %s failed", self.disk,
                          (tag or {}).get("id"))  # fmt: skip

    def _check(self, section: dict[str, Any], tag_id: str | None) -> None:
        problem = fmt.problem(section)
        if problem:
            log.error(
                "disk %s: ignoring a verify section at tag %s: %s", self.disk, tag_id, problem
            )
            return
        report = self._report_for(section, tag_id)
        block = section["block"]
        blocks = fmt.blocks_of(section["ranges"], block)
        source = fmt.decode_digests(section["digests"])
        began = time.monotonic()
        target = self._digests(section["ranges"], block)
        held = time.monotonic() - began  # applying waits this long (apply.lock is held)
        report["longest_hold_s"] = round(max(report.get("longest_hold_s", 0.0), held), 3)
        unsettled = fmt.expand(section.get("unsettled") or [])
        differ = fmt.differing(blocks, source, target, unsettled)
        found = fmt.expand(report["differing"]) | set(differ)
        report["differing_blocks"] = len(found)
        report["differing"] = fmt.runs(found)[:RUNS_KEPT]
        report["truncated"] = len(report["differing"]) >= RUNS_KEPT
        report["compared_blocks"] += len([b for b in blocks if b not in unsettled])
        report["last_tag"] = tag_id
        if section.get("last"):
            report.update(state="done", finished_at=time.time(),
                          unverified_blocks=int(section.get("unverified") or 0))  # fmt: skip
            log.info("disk %s: verify %s done at tag %s: %d block(s) differ, %d compared",
                     self.disk, report["id"], tag_id, report["differing_blocks"],
                     report["compared_blocks"])  # fmt: skip
        elif differ:
            log.warning("disk %s: verify %s: %d block(s) differ at tag %s", self.disk,
                        report["id"], len(differ), tag_id)  # fmt: skip
        durable.write_json(self.path, report)
        self.report = report

    def _report_for(self, section: dict[str, Any], tag_id: str | None) -> dict[str, Any]:
        report = self.report
        if report is not None and report.get("id") == section["id"]:
            return report
        return {
            "id": section["id"], "state": "running", "block": section["block"],
            "compared_blocks": 0, "differing_blocks": 0, "differing": [], "truncated": False,
            "unverified_blocks": 0, "repair": bool(section.get("repair")),
            "scheduled": bool(section.get("scheduled")), "first_tag": tag_id,
            "last_tag": tag_id, "started_at": time.time(), "finished_at": None,
        }  # fmt: skip

    def _digests(self, ranges: list[list[int]], block: int) -> list[bytes]:
        step = READ_BYTES - READ_BYTES % block
        reader = blockio.DirectReader(self.target, step)
        try:
            out: list[bytes] = []
            for offset, length in ranges:
                for at in range(offset, offset + length, step):
                    n = min(step, offset + length - at)
                    out += blockio.block_digests(reader.read(at, n), block)
            return out
        finally:
            reader.close()

    def summary(self) -> dict[str, Any] | None:
        """The latest verify as published with the disk's state (differing runs cut short)."""
        report = self.report
        if report is None:
            return None
        out = dict(report)
        out["differing"] = report["differing"][: fmt.MAX_RANGES_REPORTED]
        out["truncated"] = report["truncated"] or len(report["differing"]) > len(out["differing"])
        return out
