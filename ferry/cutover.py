"""Cutover and test failover on the master target's host: plain Python the cutover role calls.

The ``local`` provider turns each replicated target into a *fixed VHD*, the
format Azure accepts for an uploaded managed disk: the raw disk, padded to a
whole number of MiB, followed by a 512-byte footer (Microsoft's "Virtual Hard
Disk Image Format Specification", fixed disks).  A VM manifest names the disks;
verification compares each VHD's data with the source as it was at the final
tag and runs ``e2fsck -fn`` on ext filesystems.

Every step prints one JSON object so Ansible can register it::

    python -m ferry.cutover digest --device /dev/loop3
    python -m ferry.cutover applied --state-dir /var/lib/ferry/master-target --disk web01-disk0 \\
        --t0-mono-ns 81234567890123 --wait 5
    python -m ferry.cutover convert --spec spec.json          # VHDs + manifest, verified
    python -m ferry.cutover clone --state-dir ... --disk ... --target ... --size ... --out x.img
    python -m ferry.cutover fence --tenant demo --disk web01-disk0 --tag-json '{...}'

``convert`` is idempotent: a manifest that already records the same final tag
with every disk verified is returned unchanged (``"changed": false``), so a
cutover asked twice cuts over once.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ferry.blockio import DirectReader, is_block_device
from ferry.errors import FerryError, UsageError

MiB = 1 << 20
SECTOR = 512
FOOTER_SIZE = 512
VHD_COOKIE = b"conectix"
VHD_FEATURES = 0x00000002
"""Reserved bit, always set."""
VHD_VERSION = 0x00010000
VHD_FIXED_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF
"""A fixed disk has no dynamic header."""
VHD_DISK_TYPE_FIXED = 2
VHD_CREATOR_APP = b"win "
"""Hyper-V's creator: readers (Azure, qemu) then take the size from the footer, not from CHS."""
VHD_CREATOR_VERSION = 0x00010000
VHD_CREATOR_HOST_OS = b"Wi2k"
"""Windows, the value Azure's own tools write."""
VHD_EPOCH = 946684800
"""2000-01-01T00:00:00Z in Unix seconds: VHD timestamps count from here."""

_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
assert _FOOTER.size == FOOTER_SIZE

COPY_CHUNK = 8 * MiB
"""Bytes read per copy or digest step."""
HOLD_WAIT = 300.0
"""Seconds a test failover waits for the master target to finish the group it is applying."""


class CutoverError(FerryError):
    """cutover: {detail}"""

    exit_code = 8


# -- the VHD footer ----------------------------------------------------------------------


def chs_geometry(size: int) -> tuple[int, int, int]:
    """Cylinders, heads and sectors per track for ``size`` bytes, per the VHD specification."""
    total = min(size // SECTOR, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max((cth + 1023) // 1024, 4)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


def footer_checksum(footer: bytes) -> int:
    """One's complement of the byte sum of ``footer`` with its checksum field taken as zero."""
    body = footer[:64] + b"\0\0\0\0" + footer[68:]
    return (~sum(body)) & 0xFFFFFFFF


def vhd_footer(size: int, timestamp: float | None = None, disk_id: bytes | None = None) -> bytes:
    """The 512-byte footer of a fixed VHD whose data is ``size`` bytes (a multiple of 512)."""
    if size <= 0 or size % SECTOR:
        raise UsageError(detail=f"a VHD's data size must be a positive multiple of 512, not {size}")
    when = int(time.time() if timestamp is None else timestamp) - VHD_EPOCH
    cylinders, heads, spt = chs_geometry(size)
    fields = [
        VHD_COOKIE, VHD_FEATURES, VHD_VERSION, VHD_FIXED_DATA_OFFSET, max(when, 0) & 0xFFFFFFFF,
        VHD_CREATOR_APP, VHD_CREATOR_VERSION, VHD_CREATOR_HOST_OS, size, size,
        cylinders, heads, spt, VHD_DISK_TYPE_FIXED, 0, disk_id or uuid.uuid4().bytes, 0, b"",
    ]  # fmt: skip
    footer = bytearray(_FOOTER.pack(*fields))
    struct.pack_into(">I", footer, 64, footer_checksum(bytes(footer)))
    return bytes(footer)


def parse_footer(footer: bytes) -> dict[str, Any]:
    """The fields of a VHD footer; CutoverError if it is not a valid fixed-disk footer."""
    if len(footer) != FOOTER_SIZE:
        raise CutoverError(detail=f"a VHD footer is 512 bytes, not {len(footer)}")
    (cookie, features, version, offset, stamp, app, app_version, host_os, original, current,
     cylinders, heads, spt, disk_type, checksum, disk_id, saved, _) = _FOOTER.unpack(footer)  # fmt: skip
    fields = {
        "cookie": cookie.decode("latin-1"), "features": features, "version": version,
        "data_offset": offset, "timestamp": stamp + VHD_EPOCH, "creator_app": app.decode("latin-1"),
        "creator_version": app_version, "creator_host_os": host_os.decode("latin-1"),
        "original_size": original, "current_size": current,
        "geometry": [cylinders, heads, spt], "disk_type": disk_type, "checksum": checksum,
        "unique_id": str(uuid.UUID(bytes=disk_id)), "saved_state": saved,
    }  # fmt: skip
    problem = _footer_problem(fields, footer)
    if problem:
        raise CutoverError(detail=f"not a valid fixed VHD footer: {problem}")
    return fields


def _footer_problem(fields: dict[str, Any], footer: bytes) -> str | None:
    checks = [
        (fields["cookie"] == VHD_COOKIE.decode(), "cookie is not 'conectix'"),
        (fields["disk_type"] == VHD_DISK_TYPE_FIXED, f"disk type {fields['disk_type']} is not 2"),
        (fields["data_offset"] == VHD_FIXED_DATA_OFFSET, "data offset is not 0xFFFFFFFFFFFFFFFF"),
        (fields["checksum"] == footer_checksum(footer), "checksum does not match"),
        (fields["current_size"] % MiB == 0, "size is not a whole number of MiB"),
    ]
    return next((why for ok, why in checks if not ok), None)


def vhd_size(size: int) -> int:
    """The data size of the VHD for a ``size``-byte disk: rounded up to a whole MiB."""
    return -(-size // MiB) * MiB


def read_footer(path: str | Path) -> dict[str, Any]:
    """The footer fields of the VHD at ``path`` (checked), plus ``file_size``."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        length = f.tell()
        if length < FOOTER_SIZE + MiB:
            raise CutoverError(detail=f"{path} is too small to be a VHD ({length} bytes)")
        f.seek(length - FOOTER_SIZE)
        fields = parse_footer(f.read(FOOTER_SIZE))
    if fields["current_size"] + FOOTER_SIZE != length:
        raise CutoverError(detail=f"{path}: footer says {fields['current_size']} bytes of data, "
                           f"the file holds {length - FOOTER_SIZE}")  # fmt: skip
    return fields | {"file_size": length}


# -- copying and digests -----------------------------------------------------------------


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """The (offset, length) ranges of ``fd`` that may hold data; holes read as zeros."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return [(0, size)]
    ranges, offset = [], 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from here on
                break
            return [(0, size)]  # no SEEK_DATA on this filesystem: copy everything
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        ranges.append((start, end - start))
        offset = end
    return ranges


class _Source:
    """Reads of a disk: O_DIRECT for block devices (a buffered read of a device whose
    filesystem is mounted can return stale cached blocks, docs/design.md invariant 2),
    plain reads for image files; bytes past the end read as zeros."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.direct = is_block_device(self.path)
        if self.direct:
            self.reader = DirectReader(self.path, COPY_CHUNK)
            self.size = self.reader.size
            self.fd = self.reader.fd
        else:
            self.fd = os.open(self.path, os.O_RDONLY)
            self.size = os.fstat(self.fd).st_size

    def read(self, offset: int, length: int) -> bytes:
        have = max(0, min(length, self.size - offset))
        if not have:
            data = b""
        elif self.direct:
            data = bytes(self.reader.read(offset, have))
        else:
            data = os.pread(self.fd, have, offset)
        return data + bytes(length - len(data))

    def close(self) -> None:
        if self.direct:
            self.reader.close()
        else:
            os.close(self.fd)


def copy_sparse(src: str | Path, dest_fd: int, size: int) -> None:
    """Copy the first ``size`` bytes of ``src`` into ``dest_fd`` at the same offsets, keeping holes."""
    source = _Source(src)
    try:
        ranges = [(0, size)] if source.direct else _data_ranges(source.fd, size)
        for start, length in ranges:
            for offset in range(start, start + length, COPY_CHUNK):
                chunk = source.read(offset, min(COPY_CHUNK, start + length - offset))
                if chunk.count(0) != len(chunk):
                    os.pwrite(dest_fd, chunk, offset)
    finally:
        source.close()


def sha256_of(path: str | Path, size: int) -> str:
    """sha256 of the first ``size`` bytes of a file or device (bytes past its end count as zeros)."""
    h = hashlib.sha256()
    source = _Source(path)
    try:
        for offset in range(0, size, COPY_CHUNK):
            h.update(source.read(offset, min(COPY_CHUNK, size - offset)))
    finally:
        source.close()
    return h.hexdigest()


def device_size(path: str | Path) -> int:
    """Size in bytes of a block device or a file."""
    with open(path, "rb") as f:
        return f.seek(0, os.SEEK_END)


def image_to_vhd(image: str | Path, out: str | Path, size: int) -> dict[str, Any]:
    """Write ``out``: the first ``size`` bytes of ``image`` as a fixed VHD; return its footer fields.

    Written to a temporary file, fsync'ed and renamed, so ``out`` is either a
    whole VHD or absent.  Holes stay holes: a mostly empty disk stays small.
    """
    out = Path(out)
    data_size = vhd_size(size)
    tmp = out.with_name(f".{out.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        copy_sparse(image, fd, size)
        os.ftruncate(fd, data_size)
        os.pwrite(fd, vhd_footer(data_size), data_size)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, out)
    _fsync_dir(out.parent)
    return read_footer(out)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- checks ------------------------------------------------------------------------------


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


def sha256_of_range(path: str | Path, start: int, end: int) -> str | None:
    """None when bytes ``start..end`` of ``path`` are all zeros, else their sha256."""
    h = hashlib.sha256()
    nonzero = False
    with open(path, "rb", buffering=0) as f:
        for offset in range(start, end, COPY_CHUNK):
            chunk = os.pread(f.fileno(), min(COPY_CHUNK, end - offset), offset)
            h.update(chunk)
            nonzero = nonzero or chunk.count(0) != len(chunk)
    return h.hexdigest() if nonzero else None


# -- the master target's state -----------------------------------------------------------


def read_cursor(state_dir: str | Path, disk: str) -> dict[str, Any]:
    """The master target's durable cursor for ``disk`` (``{}`` before anything was applied)."""
    path = Path(state_dir) / disk / "cursor.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CutoverError(detail=f"cannot read {path}: {exc}")


def _staged_header(path: Path) -> dict[str, Any] | None:
    # The segment format (docs/design.md): b"FERRYSG1" | u32 hlen | header JSON | ...
    try:
        with open(path, "rb") as f:
            magic, hlen = struct.unpack(">8sI", f.read(12))
            if magic != b"FERRYSG1" or hlen > 64 * MiB:
                return None
            return json.loads(f.read(hlen))
    except (OSError, ValueError, struct.error):
        return None


def staged(state_dir: str | Path, disk: str) -> list[tuple[int, int, bool]]:
    """``(gen, seq, tagged)`` of each segment staged for ``disk``, in order."""
    directory = Path(state_dir) / disk / "staging"
    found = []
    with contextlib.suppress(FileNotFoundError):
        for path in sorted(directory.glob("*.seg")):
            gen, _, seq = path.stem.partition("-")
            header = _staged_header(path) or {}
            found.append((int(gen), int(seq), bool(header.get("tag"))))
    return found


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
    state_dir: str | Path, disk: str, t0_mono_ns: int, wait: float, poll: float = 0.2
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


@contextlib.contextmanager
def hold_applying(
    state_dir: str | Path, disk: str, note: str, wait: float | None = None
) -> Iterator[float]:
    """Hold the master target's applying of ``disk`` (its ``apply.lock``); yields the seconds waited.

    The master target applies each group holding an exclusive ``flock`` on
    ``<state_dir>/<disk>/apply.lock`` and skips applying while someone else
    holds it (mastertarget/worker.py), so under this hold the target sits
    exactly on the cursor's tag.  It waits for the group in hand to finish
    (up to ``wait`` seconds).  Notices are still received and staged
    meanwhile; the lock goes with this process, even if it is killed.
    """
    wait = HOLD_WAIT if wait is None else wait
    directory = Path(state_dir) / disk
    if not directory.is_dir():
        raise CutoverError(
            detail=f"the master target keeps no state for disk {disk} in {state_dir}"
        )
    fd = os.open(directory / "apply.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    began = time.monotonic()
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - began > wait:
                    raise CutoverError(detail=f"disk {disk}: the master target has been applying "
                                       f"one group for over {wait:.0f} s; try again later")  # fmt: skip
                time.sleep(0.02)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{note} (pid {os.getpid()})\n".encode(), 0)
        try:
            yield time.monotonic() - began
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # drops the lock


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
    """Make the VHDs and the manifest of one machine; idempotent for the same final tag.

    ``spec``: ``{"machine", "tenant", "out_dir", "final_tag", "vm": {...},
    "disks": [{"id", "lun"?}], "targets": {id: path}, "digests": {id: {"size", "sha256"}}}``;
    a disk without a digest is checked by fsck only, at the target's size.
    """
    out_dir = Path(spec["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "manifest.json"
    previous = load_manifest(manifest_path)
    if (
        previous
        and previous.get("final_tag", {}).get("id") == spec["final_tag"]["id"]
        and all(d.get("verified") for d in previous.get("disks", []))
    ):
        return previous | {"changed": False}
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
    manifest = {
        "format": "ferry-vm-manifest/1", "provider": "local",
        "tenant": spec["tenant"], "machine": spec["machine"], "vm": spec.get("vm") or {},
        "final_tag": spec["final_tag"], "created_at": time.time(), "disks": disks,
        "verified": all(d["verified"] for d in disks), "complete": all(d["verified"] for d in disks),
    }  # fmt: skip
    tmp = manifest_path.with_name(".manifest.json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, manifest_path)
    return manifest | {"changed": True}


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
) -> dict[str, Any]:
    """Clone every target of ``machine`` at its latest tag into fixed VHDs under ``out_dir``.

    Replication goes on meanwhile (see :func:`clone_at_tag`).  ``out_dir`` gets
    ``test-failover.json`` naming exactly the files made, which is all that
    :func:`test_failover_cleanup` removes.  A test failover that exists is
    returned unchanged.
    """
    out_dir = Path(out_dir)
    record_path = out_dir / TEST_FAILOVER_RECORD
    if record_path.exists():
        return json.loads(record_path.read_text()) | {"changed": False}
    out_dir.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "machine": machine,
        "made": [],
        "disks": [],
        "created_at": time.time(),
    }
    try:
        for disk, target in targets.items():
            _test_failover_disk(state_dir, disk, target, out_dir, record)
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
    """Record in storage that nothing after ``tag`` may ever be applied to ``disk``.

    The record sits beside the disk's state blob (``<tenant>/<disk>/fence.json``
    in the tenant's control container); writing it twice is harmless.
    """
    from ferry import naming
    from ferry.storage import Storage

    secret = os.environ.get(storage_env, "").strip()
    if not secret:
        raise CutoverError(detail=f"environment variable {storage_env} is not set")
    storage = Storage(secret)
    record = {"tenant": tenant, "disk": disk, "tag": tag, "reason": "cutover",
              "fenced_at": time.time()}  # fmt: skip
    name = naming.fence_blob(tenant, disk)
    container = naming.control_container(tenant)
    storage.put(container, name, json.dumps(record).encode())
    return {"fence_blob": f"{container}/{name}", **record}


# -- command line ------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ferry.cutover", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("digest", help="sha256 of a source disk (and its size)")
    p.add_argument("--device", required=True)
    p.add_argument("--size", type=int)
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
    p = sub.add_parser("test-failover-cleanup", help="remove what test-failover made")
    p.add_argument("--out-dir", required=True)
    p = sub.add_parser("fence", help="record that nothing after the final tag is applied")
    p.add_argument("--tenant", required=True)
    p.add_argument("--disk", required=True)
    p.add_argument("--tag-json", required=True)
    p.add_argument("--storage-env", default="FERRY_STORAGE")
    return parser


def _run(args: argparse.Namespace) -> dict[str, Any]:
    if args.command == "digest":
        size = args.size or device_size(args.device)
        return {"device": args.device, "size": size, "sha256": sha256_of(args.device, size)}
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
        return test_failover(args.state_dir, args.machine, targets, args.out_dir)
    if args.command == "test-failover-cleanup":
        return test_failover_cleanup(args.out_dir)
    return fence(args.tenant, args.disk, json.loads(args.tag_json), args.storage_env)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m ferry.cutover``: one JSON object on stdout."""
    from ferry.cli_support import run_main

    args = _parser().parse_args(argv)

    def body() -> int:
        result = _run(args)
        print(json.dumps(result))
        return 0 if result.get("verified", True) is not False else 1

    return run_main("cutover", body)


if __name__ == "__main__":
    sys.exit(main())
