"""Machine-wide recovery points on the master target's host: list them, materialise one.

A recovery point is (machine, tag): the agent closes one read pass of all of
a machine's disks with one tag, so every disk holds the same tags.  A point
is restorable when every disk of the machine still reaches it: the target's
own tag, or a tag its journal keeps (mastertarget/journal.py).

Materialising a point copies each target while replication goes on (the
copy is fuzzy: groups keep being applied meanwhile), then, holding applying
only for a moment, takes the journal's chain from where the target now
stands back to the point (hard links, so retention may go on), and rewinds
the copy with it.  Every block a group wrote during the copy is in one of
those records, and the oldest record that has a block wins, so the copy
ends exactly at the point (docs/design.md, "Recovery journal").  Each copy
is then checked: ``e2fsck -fn`` for ext2/3/4, ``xfs_repair -n`` for XFS when
installed, on the whole disk or on each partition found.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from ferry.diskio import copy_sparse, device_size
from mastertarget import cutover, layout
from mastertarget import journal as journals


def disk_points(state_dir: str | Path, disk: str) -> list[dict[str, Any]]:
    """The tags ``disk`` can be materialised at, oldest first (the target's own last)."""
    cursor = cutover.read_cursor(state_dir, disk)
    if not cursor.get("last_tag"):
        return []
    records = journals.scan(layout.journal_dir(state_dir, disk))
    links, _ = journals.chain(records, cursor)
    return journals.points(links, cursor)


def machine_points(state_dir: str | Path, disks: list[str]) -> list[dict[str, Any]]:
    """The points every one of ``disks`` reaches, oldest first: each tag, its ``disks`` these."""
    per_disk = [{p["id"]: p for p in disk_points(state_dir, d)} for d in disks]
    if not per_disk:
        return []
    common = set(per_disk[0]).intersection(*per_disk[1:])
    found = [per_disk[0][i] for i in common]
    found.sort(key=lambda p: (p.get("t0_wall", 0), p["id"]))
    return [{**p, "disks": sorted(disks)} for p in found]


def choose(points: list[dict[str, Any]], tag: str | None, at: float | None) -> dict[str, Any]:
    """The point named ``tag``, or the newest at or before ``at``, or the newest of all."""
    if not points:
        raise cutover.CutoverError(detail="no recovery point is held by every disk of the machine")
    if tag is not None:
        for p in points:
            if p["id"] == tag:
                return p
        raise cutover.CutoverError(detail=f"recovery point {tag} is not retained on every disk")
    if at is not None:
        before = [p for p in points if p["t0_wall"] <= at]
        if not before:
            oldest = points[0]["t0_wall"]
            raise cutover.CutoverError(
                detail=f"no recovery point at or before {at:.3f}; the oldest is at {oldest:.3f}"
            )
        return before[-1]
    return points[-1]


def materialise_disk(
    state_dir: str | Path, disk: str, target: str | Path, out: Path, tag: str
) -> dict[str, Any]:
    """Copy ``disk``'s target to ``out`` at point ``tag`` while replication goes on."""
    began = time.monotonic()
    size = device_size(target)
    tmp = out.with_name(f".{out.name}.tmp")
    links = out.with_name(f".{out.name}.undo")
    shutil.rmtree(links, ignore_errors=True)
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            copy_sparse(target, fd, size)
            os.ftruncate(fd, size)
            copied = time.monotonic()
            records, held = _records_to(state_dir, disk, tag, links)
            journals.rewind(fd, records)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(links, ignore_errors=True)
    return {"disk": disk, "image": str(out), "size": size, "tag": tag,
            "undo_records": len(records), "undo_bytes": sum(r.raw_len for r in records),
            "apply_held_s": round(held, 3), "copy_s": round(copied - began, 3),
            "rewind_s": round(time.monotonic() - copied, 3)}  # fmt: skip


def _records_to(
    state_dir: str | Path, disk: str, tag: str, links: Path
) -> tuple[list[journals.Record], float]:
    """The records from where the target stands now back to ``tag``, newest first, hard-linked.

    Taken holding applying: the worker is between groups, so the chain
    matches the target; the links keep the records if retention then merges
    or removes them.  The group in hand after a crash (applying.json) has its
    own record, which comes first.
    """
    with cutover.hold_applying(state_dir, disk, f"materialising point {tag}", wait=None) as waited:
        began = time.monotonic()
        cursor = cutover.read_cursor(state_dir, disk)
        records = journals.scan(layout.journal_dir(state_dir, disk))
        chain, pending = journals.chain(records, cursor)
        head = (cursor.get("last_tag") or {}).get("id")
        if layout.applying_path(state_dir, disk).exists() and pending is None and not chain:
            raise cutover.CutoverError(detail=f"disk {disk}: the master target stopped while "
                                       "applying a group and keeps no journal; start it so that "
                                       "it replays the group, then try again")  # fmt: skip
        needed = [pending] if pending is not None else []
        if head != tag:
            ids = [r.from_id for r in chain]
            if tag not in ids:
                raise cutover.CutoverError(
                    detail=f"disk {disk}: recovery point {tag} is no longer retained"
                )
            needed += chain[: ids.index(tag) + 1]
        elif not chain and head is not None:
            # No journal: the copy was fuzzy only if a group was applied meanwhile.
            pass
        links.mkdir(parents=True)
        linked = []
        for r in needed:
            path = links / r.path.name
            os.link(r.path, path)
            linked.append(journals.Record(path, r.src, r.dst, r.size, r.raw_len))
        held = time.monotonic() - began + waited
    return linked, held


def materialise(
    state_dir: str | Path,
    machine: str,
    targets: dict[str, str],
    out_dir: str | Path,
    tag: str | None = None,
    at: float | None = None,
    check: bool = True,
) -> dict[str, Any]:
    """Materialise all of ``machine``'s disks at one point (by tag, by time, or the newest).

    Writes ``<out_dir>/<disk>.img`` for each disk and ``<out_dir>/point.json``;
    each image is filesystem-checked when ``check``.  ``consistent`` says
    whether every check passed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    point = choose(machine_points(state_dir, sorted(targets)), tag, at)
    _refuse_unjournaled(state_dir, sorted(targets), point["id"])
    disks = []
    for disk, target in sorted(targets.items()):
        result = materialise_disk(state_dir, disk, target, out_dir / f"{disk}.img", point["id"])
        if check:
            result["checks"] = check_filesystems(result["image"])
        disks.append(result)
    record = {"machine": machine, "point": point, "disks": disks, "created_at": time.time(),
              "consistent": all(c["clean"] is not False for d in disks
                                for c in d.get("checks", []))}  # fmt: skip
    (out_dir / "point.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def _refuse_unjournaled(state_dir: str | Path, disks: list[str], tag: str) -> None:
    """Without a journal a fuzzy copy cannot be rewound: such a disk is copied holding applying."""
    for disk in disks:
        if not layout.journal_dir(state_dir, disk).is_dir():
            raise cutover.CutoverError(
                detail=f"disk {disk} keeps no recovery journal (journal = false); use the test "
                "failover's copy of the latest point instead"
            )


# -- checks ------------------------------------------------------------------------------


def _tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def filesystem_at(path: str | Path, offset: int = 0) -> str | None:
    """``ext`` or ``xfs`` when that filesystem's superblock starts at ``offset``, else None."""
    with open(path, "rb") as f:
        f.seek(offset)
        head = f.read(1024 + 58)
    if head[:4] == b"XFSB":
        return "xfs"
    if head[1024 + 56 : 1024 + 58] == b"\x53\xef":
        return "ext"
    return None


def partitions(path: str | Path) -> list[tuple[int, int]]:
    """``(offset, size)`` in bytes of each partition in the image's table (none: [])."""
    tool = _tool("sfdisk")
    if not tool:
        return []
    result = subprocess.run([tool, "--json", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        return []
    table = json.loads(result.stdout).get("partitiontable", {})
    sector = int(table.get("sectorsize", 512))
    return [
        (int(p["start"]) * sector, int(p["size"]) * sector) for p in table.get("partitions", [])
    ]


def check_filesystems(path: str | Path) -> list[dict[str, Any]]:
    """Check the filesystem on the whole image, or on each of its partitions."""
    if filesystem_at(path):
        return [_check(path, 0, None)]
    found = [(o, n) for o, n in partitions(path) if filesystem_at(path, o)]
    if not found:
        return [{"offset": 0, "filesystem": None, "clean": None,
                 "detail": "no ext or XFS filesystem found"}]  # fmt: skip
    return [_check(path, o, n) for o, n in found]


def _check(path: str | Path, offset: int, size: int | None) -> dict[str, Any]:
    kind = filesystem_at(path, offset)
    command = {"ext": ["e2fsck", "-fn"], "xfs": ["xfs_repair", "-n"]}[kind or "ext"]
    tool = _tool(command[0])
    if not tool:
        return {"offset": offset, "filesystem": kind, "clean": None,
                "detail": f"{command[0]} is not installed"}  # fmt: skip
    if size is None:
        result = subprocess.run([tool, *command[1:], str(path)], capture_output=True, text=True)
    else:
        result = _check_range(tool, command[1:], path, offset, size)
        if result is None:
            return {"offset": offset, "filesystem": kind, "clean": None,
                    "detail": "a partition is checked through a loop device, which needs root"}  # fmt: skip
    tail = (result.stdout + result.stderr).strip().splitlines()[-3:]
    return {"offset": offset, "filesystem": kind, "clean": result.returncode == 0,
            "detail": " | ".join(tail)}  # fmt: skip


def _check_range(tool: str, args: list[str], path: str | Path, offset: int, size: int):
    """Run the checker on a read-only loop device over one partition; None without root."""
    losetup = _tool("losetup")
    if os.geteuid() != 0 or not losetup:
        return None
    loop = subprocess.run(
        [losetup, "-f", "--show", "-r", "-o", str(offset), "--sizelimit", str(size), str(path)],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    try:
        return subprocess.run([tool, *args, loop], capture_output=True, text=True)
    finally:
        subprocess.run([losetup, "-d", loop], capture_output=True)
