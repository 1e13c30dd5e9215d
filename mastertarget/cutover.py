"""Cutover and test failover on the master target's host: plain Python the cutover role calls.

What runs where the targets are: where a disk's target stands (its cursor and
staging, read through mastertarget's own modules), holding applying for a
copy at a tag (mastertarget/applylock.py), the fixed VHDs and the VM
manifest (ferry/vhd.py), their checks, and the fence record (ferry/fence.py).
Every step prints one JSON object so Ansible can register it::

    python -m mastertarget.cutover applied --state-dir /var/lib/ferry/master-target \\
        --disk web01-disk0 --t0-mono-ns 81234567890123 --wait 5
    python -m mastertarget.cutover convert --spec spec.json          # VHDs + manifest, verified
    python -m mastertarget.cutover clone --state-dir ... --disk ... --target ... --size ... --out x.img
    python -m mastertarget.cutover fence --tenant demo --disk web01-disk0 --tag-json '{...}'
    python -m mastertarget.cutover points --state-dir ... --disk web01-disk0 --disk web01-disk1
    python -m mastertarget.cutover materialise --state-dir ... --machine web01 \
        --targets-json '{"web01-disk0": "/dev/sdc", ...}' --out-dir x --point-time 2026-12-02T18:00
    python -m mastertarget.cutover resume --state-dir ... --tenant demo --disk web01-disk0 --out-dir ...

``convert`` is idempotent: a manifest that already records the same final tag
as complete is returned unchanged (``"changed": false``), so a cutover asked
twice cuts over once.  ``convert`` and ``test-failover`` also adapt the VHDs
(mastertarget/adapt.py) and boot-check them (mastertarget/bootcheck.py) when
asked; a cutover whose check fails is not complete, and running it again
checks again, or ``resume`` lifts the fence of a cutover that was not committed
(replication goes on from the final tag).  The source's side (digest, final tag,
stopping the agent for good) is ``python -m agent.fence``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ferry import fence as fences
from ferry.diskio import copy_sparse, device_size, sha256_of, sha256_of_range
from ferry.errors import Exit, FerryError
from ferry.vhd import image_to_vhd, read_footer, vhd_size
from mastertarget import applylock, bootmode, layout, staging
from mastertarget import cursor as cursors
from mastertarget.errors import CursorUnreadable
from mastertarget.ownership import try_lock_state

HOLD_WAIT = 300.0
"""Seconds a test failover waits for the master target to finish the group it is applying."""


class CutoverError(FerryError):
    """cutover: {detail}"""

    exit_code = Exit.CUTOVER


def qemu_info(path: str | Path) -> dict[str, Any]:
    """``qemu-img info -f vpc`` of ``path`` as a dict; CutoverError if qemu-img refuses it."""
    tool = shutil.which("qemu-img")
    if not tool:
        raise CutoverError(detail="qemu-img is not installed (Debian package qemu-utils)")
    result = subprocess.run(
        [tool, "info", "-f", "vpc", "--output", "json", str(path)], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise CutoverError(detail=f"qemu-img does not accept {path}: {result.stderr.strip()}")
    return json.loads(result.stdout)


def filesystem_type(path: str | Path) -> str | None:
    """``ext`` when an ext2/3/4 superblock starts at byte 1024 of ``path``, else None."""
    with open(path, "rb") as f:
        f.seek(1024 + 56)
        magic = f.read(2)
    return "ext" if magic == b"\x53\xef" else None


def fsck(path: str | Path) -> dict[str, Any]:
    """Run ``e2fsck -fn`` on an ext filesystem in ``path``; other contents are reported, not checked."""
    if filesystem_type(path) != "ext":
        return {"filesystem": None, "clean": None, "detail": "no ext filesystem at offset 0"}
    tool = shutil.which("e2fsck") or shutil.which("e2fsck", path="/usr/sbin:/sbin")
    if not tool:
        raise CutoverError(detail="e2fsck is not installed (Debian package e2fsprogs)")
    result = subprocess.run([tool, "-fn", str(path)], capture_output=True, text=True)
    tail = (result.stdout + result.stderr).strip().splitlines()[-3:]
    return {"filesystem": "ext", "clean": result.returncode == 0, "detail": " | ".join(tail)}


def verify_vhd(path: str | Path, size: int, expect_sha256: str | None) -> dict[str, Any]:
    """Check a VHD: footer, qemu-img's view, data digest against the source, and fsck."""
    footer = read_footer(path)
    info = qemu_info(path)
    digest = sha256_of(path, size)
    checks = {
        "footer": footer["current_size"] == vhd_size(size),
        "qemu": info.get("format") == "vpc" and info.get("virtual-size") == footer["current_size"],
        "digest": expect_sha256 is None or digest == expect_sha256,
        "padding": sha256_of_range(path, size, footer["current_size"]) is None,
    }
    result = fsck(path)
    checks["fsck"] = result["clean"] is not False
    return {
        "vhd": str(path), "data_sha256": digest, "expected_sha256": expect_sha256,
        "virtual_size": info.get("virtual-size"), "fsck": result, "checks": checks,
        "verified": all(checks.values()),
    }  # fmt: skip


# -- the master target's state -----------------------------------------------------------


def read_cursor(state_dir: str | Path, disk: str) -> dict[str, Any]:
    """The master target's durable cursor for ``disk`` (``{}`` before anything was applied)."""
    try:
        return cursors.peek(layout.cursor_path(state_dir, disk))
    except CursorUnreadable as exc:
        raise CutoverError(detail=str(exc))


def staged(state_dir: str | Path, disk: str) -> list[tuple[int, int, bool]]:
    """``(gen, seq, tagged)`` of each segment staged for ``disk``, in order."""
    directory = layout.staging_dir(state_dir, disk)
    if not directory.is_dir():
        return []
    return [(s.gen, s.seq, s.tagged) for _, s in staging.listing(directory) if s is not None]


def applied(state_dir: str | Path, disk: str, t0_mono_ns: int | None) -> dict[str, Any]:
    """Where ``disk``'s target stands, and whether it sits on the tag taken at ``t0_mono_ns``."""
    cursor = read_cursor(state_dir, disk)
    tag = cursor.get("last_tag") or {}
    segments = staged(state_dir, disk)
    return {
        "disk": disk, "gen": cursor.get("gen"), "applied_seq": cursor.get("applied_seq"),
        "last_tag": tag or None, "staged": len(segments), "fenced": cursor.get("fenced"),
        "applied": t0_mono_ns is not None and tag.get("t0_mono_ns", -1) >= t0_mono_ns,
    }  # fmt: skip


def wait_applied(
    state_dir: str | Path, disk: str, t0_mono_ns: int | None, wait: float, poll: float = 0.2
) -> dict[str, Any]:
    """:func:`applied`, waiting up to ``wait`` seconds for the tag (one progress round)."""
    deadline = time.monotonic() + wait
    while True:
        state = applied(state_dir, disk, t0_mono_ns)
        if state["applied"] or time.monotonic() >= deadline:
            return state
        time.sleep(poll)


def applied_all(
    state_dir: str | Path, disks: list[str], t0_mono_ns: int | None, wait: float
) -> dict[str, Any]:
    """:func:`wait_applied` for several disks within one ``wait``; ``applied`` if all are."""
    deadline = time.monotonic() + wait
    states = [wait_applied(state_dir, d, t0_mono_ns, max(0.0, deadline - time.monotonic()))
              for d in disks]  # fmt: skip
    return {"disks": states, "applied": all(s["applied"] for s in states)}


def hold_applying(state_dir: str | Path, disk: str, note: str, wait: float | None = None):
    """Hold the master target's applying of ``disk`` (mastertarget/applylock.py); yields the wait.

    Under this hold the target sits exactly on the cursor's tag; notices are
    still received and staged meanwhile.
    """
    if not layout.disk_dir(state_dir, disk).is_dir():
        raise CutoverError(
            detail=f"the master target keeps no state for disk {disk} in {state_dir}"
        )
    path = layout.apply_lock_path(state_dir, disk)
    return applylock.hold(path, disk, note, HOLD_WAIT if wait is None else wait)


def clone_at_tag(
    state_dir: str | Path, disk: str, target: str | Path, out: str | Path, size: int
) -> dict[str, Any]:
    """Copy ``disk``'s target to ``out`` as it stands on its latest tag; replication goes on.

    The copy is made under :func:`hold_applying`: the target is exactly the
    one at the cursor's tag, and the agent, the process server and the
    master target's receiving go on meanwhile; only applying waits for the
    length of one copy, then catches up.  ``apply_held_s`` says how long.
    """
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with hold_applying(state_dir, disk, f"test failover copying to {out}"):
            began = time.monotonic()
            cursor = read_cursor(state_dir, disk)
            if not cursor.get("last_tag"):
                raise CutoverError(detail=f"disk {disk} has no recovery point yet")
            if layout.applying_path(state_dir, disk).exists():
                raise CutoverError(detail=f"disk {disk}: the master target stopped while applying "
                                   "a group, so the target may be between two tags; start it "
                                   "so that it replays the group, then try again")  # fmt: skip
            _copy(target, tmp, size)
            held = time.monotonic() - began
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"disk": disk, "clone": str(out), "size": size, "tag": cursor["last_tag"],
            "gen": cursor.get("gen"), "applied_seq": cursor.get("applied_seq"),
            "apply_held_s": round(held, 3)}  # fmt: skip


def _copy(target: str | Path, tmp: Path, size: int) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        copy_sparse(target, fd, size)
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the whole local cutover of one machine ----------------------------------------------


def convert(spec: dict[str, Any]) -> dict[str, Any]:
    """Make the VHDs and the manifest of one machine, adapt and boot-check them; idempotent.

    ``spec``: ``{"machine", "tenant", "out_dir", "final_tag", "vm": {...},
    "disks": [{"id", "lun"?}], "targets": {id: path}, "digests": {id: {"size", "sha256"}},
    "started"?: cutover start (Unix time), "adapt"?: bool, "boot_check"?: bool,
    "markers"?: ["path[:sha256]"], "boot_check_timeout"?: s}``; a disk without a
    digest is checked by fsck only, at the target's size.

    The manifest is ``complete`` (the cutover is committed) only when every
    VHD is verified, adapted and boot-checked (each as asked); otherwise
    ``reason`` says why.  Asked again for the same final tag, a complete
    manifest is returned unchanged; an incomplete one keeps its verified VHDs
    (an operator may have fixed them) and adapts and checks them again.
    """
    out_dir = Path(spec["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "manifest.json"
    previous = load_manifest(manifest_path) or {}
    same_tag = previous.get("final_tag", {}).get("id") == spec["final_tag"]["id"]
    if same_tag and previous.get("complete"):
        return previous | {"changed": False}
    started = spec.get("started") or time.time()
    keep = same_tag and _kept_disks(previous)
    if not keep and (spec.get("point") or spec.get("point_time")):
        spec = _at_point(spec, out_dir)
    disks = previous["disks"] if keep else _convert_disks(out_dir, spec)
    verified = all(d["verified"] for d in disks)
    manifest = {
        "format": "ferry-vm-manifest/1", "provider": spec.get("provider") or "local",
        "tenant": spec["tenant"], "machine": spec["machine"], "vm": spec.get("vm") or {},
        "final_tag": spec["final_tag"], "created_at": time.time(), "disks": disks,
        "verified": verified, "complete": False,
        "reason": None if verified else "a VHD does not match the source at the final tag",
        "timings": {"disks_ready_s": round(time.time() - float(started), 1)},
    }  # fmt: skip
    if verified:
        manifest["vm"]["boot"] = bootmode.detect(disks[0]["vhd"])  # the first disk is the OS disk
        manifest["vm"]["hyper_v_generation"] = manifest["vm"]["boot"]["hyper_v_generation"]
        finish(manifest, spec, float(started))
    _write_manifest(manifest_path, manifest)
    return manifest | {"changed": True}


def _at_point(spec: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """``spec`` made from the machine's disks materialised at an older point (a failover to it).

    The source's digests are of the final tag, not of the point: the VHDs
    are checked by their filesystems instead.
    """
    from mastertarget import recovery

    targets = {d["id"]: spec["targets"][d["id"]] for d in spec["disks"]}
    made = recovery.materialise(spec["state_dir"], spec["machine"], targets,
                                out_dir / "point", spec.get("point") or None,
                                parse_time(spec.get("point_time")), check=False)  # fmt: skip
    images = {d["disk"]: d["image"] for d in made["disks"]}
    return spec | {"targets": images, "digests": {}, "point": made["point"]}


def parse_time(value: Any) -> float | None:
    """A point's time: Unix seconds or ISO 8601 (UTC unless it says); None if empty."""
    if value in (None, ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        pass
    from datetime import UTC, datetime

    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        raise CutoverError(detail=f"point time {value!r} is neither Unix seconds nor ISO 8601")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def finish(record: dict[str, Any], spec: dict[str, Any], started: float) -> None:
    """Adapt and boot-check the VHDs of ``record`` as ``spec`` asks; set ``complete`` and ``reason``.

    Shared by the cutover and the test failover, so both make the same copy.
    """
    from mastertarget import adapt, bootcheck
    from mastertarget.guestfs import GuestfsError

    vhds = [d["vhd"] for d in record["disks"]]
    record["reason"] = None
    try:
        if spec.get("adapt", False):
            record["adaptation"] = adapt.adapt(vhds)
            vm = record.get("vm")
            if vm and vm.get("boot"):  # the guest's fstab settles a hybrid (BIOS and UEFI) disk
                guest = record["adaptation"].get("os", {}).get("boot_mode")
                vm["hyper_v_generation"] = bootmode.generation(vm["boot"], guest)
            record["timings"]["adapted_s"] = round(time.time() - started, 1)
        if spec.get("boot_check", False):
            root = (record.get("adaptation") or {}).get("os", {}).get("root")
            timeout = spec.get("boot_check_timeout") or 900.0
            check = bootcheck.boot_check(vhds, spec.get("markers") or [], timeout, root=root)
            record["boot_check"] = check
            record["timings"]["boot_checked_s"] = round(time.time() - started, 1)
            if not check["passed"]:
                record["reason"] = f"boot check failed: {check['reason']}"
        else:
            record["boot_check"] = {"skipped": True}
    except (GuestfsError, bootcheck.BootCheckError) as exc:
        record["reason"] = str(exc)
    record["complete"] = record["reason"] is None


def _kept_disks(previous: dict[str, Any]) -> bool:
    disks = previous.get("disks") or []
    return bool(disks) and all(d.get("verified") and Path(d["vhd"]).exists() for d in disks)


def _convert_disks(out_dir: Path, spec: dict[str, Any]) -> list[dict[str, Any]]:
    targets, digests = spec.get("targets") or {}, spec.get("digests") or {}
    disks = []
    for lun, disk in enumerate(spec["disks"]):
        digest = digests.get(disk["id"]) or {}
        disk = {"lun": lun, "target": targets.get(disk["id"]), **disk}
        if not disk["target"]:
            raise CutoverError(detail=f"disk {disk['id']} has no target on this master target")
        disk.setdefault("size", digest.get("size"))
        disk.setdefault("source_sha256", digest.get("sha256"))
        disks.append(_convert_disk(out_dir, disk))
    return disks


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)


def _convert_disk(out_dir: Path, disk: dict[str, Any]) -> dict[str, Any]:
    vhd = out_dir / f"{disk['id']}.vhd"
    size = disk.get("size") or device_size(disk["target"])
    footer = image_to_vhd(disk["target"], vhd, size)
    check = verify_vhd(vhd, size, disk.get("source_sha256"))
    return {
        "id": disk["id"], "vhd": str(vhd), "source_size": size,
        "vhd_data_size": footer["current_size"], "vhd_file_size": footer["file_size"],
        "unique_id": footer["unique_id"], "lun": disk.get("lun"), **check,
    }  # fmt: skip


def load_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest at ``path``, or None if there is none."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise CutoverError(detail=f"{path} is not a valid manifest: {exc}")


TEST_FAILOVER_RECORD = "test-failover.json"


def test_failover(
    state_dir: str | Path,
    machine: str,
    targets: dict[str, str],
    out_dir: str | Path,
    checks: dict[str, Any] | None = None,
    point: str | None = None,
    point_time: float | None = None,
) -> dict[str, Any]:
    """Copy every target of ``machine`` at one point into fixed VHDs under ``out_dir``.

    With a recovery journal (mastertarget/recovery.py) all disks are copied
    at one machine-wide point: ``point`` (a tag id), the newest at or before
    ``point_time``, or the newest; without one, each at its latest tag (see
    :func:`clone_at_tag`).  Replication goes on meanwhile.  ``checks``
    (``{"adapt", "boot_check", "markers", "boot_check_timeout"}``) makes the
    same adapted, boot-checked copy a cutover makes (:func:`finish`); the
    record's ``passed`` says whether it boots.  ``out_dir`` gets
    ``test-failover.json`` naming exactly the files made, which is all that
    :func:`test_failover_cleanup` removes.  A test failover that exists is
    returned unchanged.
    """
    out_dir = Path(out_dir)
    record_path = out_dir / TEST_FAILOVER_RECORD
    if record_path.exists():
        return json.loads(record_path.read_text()) | {"changed": False}
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    record: dict[str, Any] = {
        "machine": machine,
        "made": [],
        "disks": [],
        "created_at": started,
        "timings": {},
    }
    try:
        if _journaled(state_dir, list(targets)):
            _test_failover_point(state_dir, machine, targets, out_dir, record, point, point_time)
        elif point is not None or point_time is not None:
            raise CutoverError(detail="the master target keeps no recovery journal for these "
                               "disks (journal = false): only the latest point can be copied")  # fmt: skip
        else:
            for disk, target in targets.items():
                _test_failover_disk(state_dir, disk, target, out_dir, record)
        record["timings"]["disks_ready_s"] = round(time.time() - started, 1)
        checks = checks or {}
        if checks.get("boot_check"):
            record["made"].append(
                str(Path(record["disks"][0]["vhd"]).with_suffix(".boot-console.log"))
            )
        finish(record, checks, started)
        record["passed"] = record.pop("complete")
    except BaseException:
        for name in record["made"]:  # a failed test failover leaves nothing behind
            Path(name).unlink(missing_ok=True)
        raise
    tmp = out_dir / f".{TEST_FAILOVER_RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, record_path)
    return record | {"changed": True}


def _test_failover_disk(
    state_dir: str | Path,
    disk: str,
    target: str,
    out_dir: Path,
    record: dict[str, Any],
) -> None:
    raw, vhd = out_dir / f"{disk}.img", out_dir / f"{disk}.vhd"
    size = device_size(target)
    clone = clone_at_tag(state_dir, disk, target, raw, size)
    try:
        footer = image_to_vhd(raw, vhd, size)
    finally:
        raw.unlink(missing_ok=True)
    record["made"].append(str(vhd))
    record["disks"].append({"id": disk, "vhd": str(vhd), "tag": clone["tag"], "size": size,
                            "apply_held_s": clone["apply_held_s"],
                            "unique_id": footer["unique_id"], "fsck": fsck(vhd)})  # fmt: skip


def _journaled(state_dir: str | Path, disks: list[str]) -> bool:
    return bool(disks) and all(layout.journal_dir(state_dir, d).is_dir() for d in disks)


def _test_failover_point(
    state_dir: str | Path,
    machine: str,
    targets: dict[str, str],
    out_dir: Path,
    record: dict[str, Any],
    point: str | None,
    point_time: float | None,
) -> None:
    """All disks at one machine-wide point (mastertarget/recovery.py), each as a fixed VHD."""
    from mastertarget import recovery

    made = recovery.materialise(state_dir, machine, targets, out_dir / ".points", point,
                                point_time, check=False)  # fmt: skip
    record["point"] = made["point"]
    try:
        for disk in made["disks"]:
            raw, vhd = Path(disk["image"]), out_dir / f"{disk['disk']}.vhd"
            footer = image_to_vhd(raw, vhd, disk["size"])
            record["made"].append(str(vhd))
            record["disks"].append({
                "id": disk["disk"], "vhd": str(vhd), "tag": made["point"], "size": disk["size"],
                "apply_held_s": disk["apply_held_s"], "unique_id": footer["unique_id"],
                "checks": recovery.check_filesystems(raw), "fsck": fsck(vhd),
            })  # fmt: skip
    finally:
        shutil.rmtree(out_dir / ".points", ignore_errors=True)


def test_failover_cleanup(out_dir: str | Path) -> dict[str, Any]:
    """Remove exactly what :func:`test_failover` made in ``out_dir`` (and the folder if then empty)."""
    out_dir = Path(out_dir)
    record = load_manifest(out_dir / TEST_FAILOVER_RECORD)
    if record is None:
        return {"changed": False, "removed": []}
    removed = []
    for name in record.get("made", []):
        path = Path(name)
        if path.parent != out_dir:
            raise CutoverError(detail=f"{out_dir / TEST_FAILOVER_RECORD} names {path}, outside it")
        if path.exists():
            path.unlink()
            removed.append(str(path))
    (out_dir / TEST_FAILOVER_RECORD).unlink()
    removed.append(str(out_dir / TEST_FAILOVER_RECORD))
    with contextlib.suppress(OSError):
        out_dir.rmdir()
    return {"changed": True, "removed": removed}


def fence(tenant: str, disk: str, tag: dict[str, Any], storage_env: str) -> dict[str, Any]:
    """Record in storage that nothing after ``tag`` may ever be applied to ``disk`` (ferry/fence.py)."""
    return fences.write(_storage(storage_env), tenant, disk, tag)


def _storage(storage_env: str) -> Any:
    """The storage whose connection string is in the environment variable ``storage_env``."""
    from ferry.storage import Storage

    secret = os.environ.get(storage_env, "").strip()
    if not secret:
        raise CutoverError(detail=f"environment variable {storage_env} is not set")
    return Storage(secret)


# -- resuming replication after a cutover that was not committed ---------------------------


RESUMED_RECORD = "resumed.json"
"""In a machine's cutover folder: each time replication was resumed after a failed cutover."""


def unfence(
    state_dir: str | Path, storage: Any, tenant: str, disk: str, why: str
) -> dict[str, Any]:
    """Let the master target apply to ``disk`` again after a cutover that was not committed.

    Deletes the disk's fence record, then, holding the disk's state lock (so
    no process serves it meanwhile: StateInUse-like CutoverError otherwise),
    writes the cursor without ``fenced`` and with ``resumed`` naming the final
    tag, which then fences no more (mastertarget/worker.py).  Idempotent: a
    disk that is not fenced is left as it is.  The caller starts serving it.
    """
    fences.remove(storage, tenant, disk)
    fd = try_lock_state(layout.state_lock_path(state_dir, disk))
    if fd is None:
        raise CutoverError(detail=f"disk {disk} is being served by a master target; "
                           "it is not fenced, or stop the master target first")  # fmt: skip
    try:
        path = layout.cursor_path(state_dir, disk)
        cursor = cursors.load(path, tenant, disk)
        fenced = cursor.fenced
        if fenced is None:
            return {"disk": disk, "changed": False, "last_tag": (cursor.last_tag or {}).get("id")}
        tag = (fenced.get("tag") or {}).get("id")
        cursor.fenced = None
        cursor.resumed = {"tag": tag, "reason": why, "at": time.time()}
        cursors.save(path, cursor)
    finally:
        os.close(fd)  # drops the lock
    return {
        "disk": disk,
        "changed": True,
        "was_fenced_at": tag,
        "fence_reason": fenced.get("reason"),
    }


def check_not_committed(out_dir: str | Path | None) -> dict[str, Any] | None:
    """The machine's manifest in ``out_dir`` (None if none); CutoverError if it is complete."""
    manifest = load_manifest(Path(out_dir) / "manifest.json") if out_dir else None
    if manifest and manifest.get("complete"):
        raise CutoverError(detail=f"{manifest.get('machine')} was cut over at tag "
                           f"{manifest['final_tag'].get('id')}: a committed cutover is not resumed; "
                           "protect the machine afresh to replicate it again")  # fmt: skip
    return manifest


def record_resume(out_dir: str | Path, entry: dict[str, Any]) -> None:
    """Append ``entry`` to ``resumed.json`` in the machine's cutover folder."""
    path = Path(out_dir) / RESUMED_RECORD
    history = load_manifest(path) or {"resumed": []}
    history["resumed"].append(entry)
    _write_manifest(path, history)


def resume(
    state_dir: str | Path,
    storage: Any,
    tenant: str,
    disks: list[str],
    out_dir: str | Path | None,
    why: str = "resumed by the operator",
) -> dict[str, Any]:
    """Unfence every disk of a machine whose cutover was not committed; record it in ``out_dir``.

    Refused (CutoverError) when the machine's manifest in ``out_dir`` says the
    cutover is complete: a committed cutover is never undone.  The record
    (``resumed.json``, one entry per resume) keeps the reason the manifest
    gave for not committing.  Run it while no master target serves the disks
    (then start one); a running master target in server mode does the same on
    its ``resume-replication`` command.
    """
    manifest = check_not_committed(out_dir) or {}
    done = [unfence(state_dir, storage, tenant, disk, why) for disk in disks]
    entry = {
        "at": time.time(), "why": why, "disks": done, "cutover_reason": manifest.get("reason"),
        "final_tag": (manifest.get("final_tag") or {}).get("id"),
    }  # fmt: skip
    if out_dir and Path(out_dir).is_dir():
        record_resume(out_dir, entry)
    return entry | {"changed": any(d["changed"] for d in done)}


# -- command line ------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mastertarget.cutover", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("applied", help="where a disk's target stands; wait for a tag")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--disk", action="append", required=True, help="repeat for each disk")
    p.add_argument("--t0-mono-ns", type=int)
    p.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the tag")
    p = sub.add_parser("convert", help="VHDs and manifest for one machine (spec as JSON)")
    p.add_argument("--spec", required=True, help="JSON file, or - for standard input")
    p = sub.add_parser("vhd", help="write one fixed VHD from a raw image")
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int)
    p = sub.add_parser("verify", help="check one VHD")
    p.add_argument("--vhd", required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--sha256")
    p = sub.add_parser("clone", help="copy a target at its latest tag (test failover)")
    for name in ("--state-dir", "--disk", "--target", "--out"):
        p.add_argument(name, required=True)
    p.add_argument("--size", type=int, required=True)
    p = sub.add_parser("test-failover", help="clone a machine's targets at their latest tag")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--machine", required=True)
    p.add_argument("--targets-json", required=True, help='{"disk id": "target path", ...}')
    p.add_argument("--out-dir", required=True)
    p.add_argument("--adapt", action="store_true", help="adapt the copies (mastertarget.adapt)")
    p.add_argument("--boot-check", action="store_true", help="boot-check the copies")
    p.add_argument("--marker", action="append", default=[], help="PATH[:SHA256]; repeat")
    p.add_argument("--boot-check-timeout", type=float, default=900.0)
    p.add_argument("--point", help="the recovery point's tag id (default: the newest)")
    p.add_argument(
        "--point-time", help="the newest point at or before this time (Unix s or ISO 8601)"
    )
    p = sub.add_parser("points", help="the recovery points every disk of a machine holds")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--disk", action="append", required=True, help="repeat for each disk")
    p = sub.add_parser("materialise", help="copy a machine's disks at one recovery point")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--machine", required=True)
    p.add_argument("--targets-json", required=True, help='{"disk id": "target path", ...}')
    p.add_argument("--out-dir", required=True)
    p.add_argument("--point", help="the recovery point's tag id (default: the newest)")
    p.add_argument(
        "--point-time", help="the newest point at or before this time (Unix s or ISO 8601)"
    )
    p.add_argument("--no-check", action="store_true", help="skip the filesystem checks")
    p = sub.add_parser("test-failover-cleanup", help="remove what test-failover made")
    p.add_argument("--out-dir", required=True)
    p = sub.add_parser("resume", help="unfence a machine's disks after an uncommitted cutover")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--tenant", required=True)
    p.add_argument("--disk", action="append", required=True, help="repeat for each disk")
    p.add_argument("--out-dir", help="the machine's cutover folder (refused if it is complete)")
    p.add_argument("--why", default="resumed by the operator")
    p.add_argument("--storage-env", default="FERRY_STORAGE")
    p = sub.add_parser("fence", help="record that nothing after the final tag is applied")
    p.add_argument("--tenant", required=True)
    p.add_argument("--disk", required=True)
    p.add_argument("--tag-json", required=True)
    p.add_argument("--storage-env", default="FERRY_STORAGE")
    return parser


def _run(args: argparse.Namespace) -> dict[str, Any]:
    if args.command == "applied":
        return applied_all(args.state_dir, args.disk, args.t0_mono_ns, args.wait)
    if args.command == "convert":
        text = sys.stdin.read() if args.spec == "-" else Path(args.spec).read_text()
        return convert(json.loads(text))
    if args.command == "vhd":
        return image_to_vhd(args.image, args.out, args.size or device_size(args.image))
    if args.command == "verify":
        return verify_vhd(args.vhd, args.size, args.sha256)
    if args.command == "clone":
        return clone_at_tag(args.state_dir, args.disk, args.target, args.out, args.size)
    if args.command == "test-failover":
        targets = json.loads(args.targets_json)
        checks = {"adapt": args.adapt, "boot_check": args.boot_check, "markers": args.marker,
                  "boot_check_timeout": args.boot_check_timeout}  # fmt: skip
        return test_failover(args.state_dir, args.machine, targets, args.out_dir, checks,
                             args.point, parse_time(args.point_time))  # fmt: skip
    if args.command in ("points", "materialise"):
        from mastertarget import recovery

        if args.command == "points":
            return {"points": recovery.machine_points(args.state_dir, args.disk)}
        return recovery.materialise(args.state_dir, args.machine, json.loads(args.targets_json),
                                    args.out_dir, args.point, parse_time(args.point_time),
                                    check=not args.no_check)  # fmt: skip
    if args.command == "test-failover-cleanup":
        return test_failover_cleanup(args.out_dir)
    if args.command == "resume":
        storage = _storage(args.storage_env)
        return resume(args.state_dir, storage, args.tenant, args.disk, args.out_dir, args.why)
    return fence(args.tenant, args.disk, json.loads(args.tag_json), args.storage_env)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m mastertarget.cutover``: one JSON object on stdout."""
    from ferry.process import run_main

    args = _parser().parse_args(argv)

    def body() -> int:
        result = _run(args)
        print(json.dumps(result))
        failed = [result.get(k, True) is False
                  for k in ("verified", "complete", "passed", "consistent")]  # fmt: skip
        return 1 if any(failed) else 0

    return run_main("cutover", body)


if __name__ == "__main__":
    sys.exit(main())
