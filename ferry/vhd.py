"""The fixed VHD format: the raw disk, padded to a whole number of MiB, then a 512-byte footer.

Microsoft's "Virtual Hard Disk Image Format Specification", fixed disks: the
format Azure accepts for an uploaded managed disk or page blob.  Writers and
readers of VHDs (the cutover, test failover, the tests) all use this module.
"""

from __future__ import annotations

import os
import struct
import time
import uuid
from pathlib import Path
from typing import Any

from ferry.diskio import copy_sparse
from ferry.durable import fsync_dir
from ferry.errors import Exit, FerryError, UsageError

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


class VhdInvalid(FerryError):
    """{detail}"""

    exit_code = Exit.VHD_INVALID


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
    """The fields of a VHD footer; VhdInvalid if it is not a valid fixed-disk footer."""
    if len(footer) != FOOTER_SIZE:
        raise VhdInvalid(detail=f"a VHD footer is 512 bytes, not {len(footer)}")
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
        raise VhdInvalid(detail=f"not a valid fixed VHD footer: {problem}")
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
            raise VhdInvalid(detail=f"{path} is too small to be a VHD ({length} bytes)")
        f.seek(length - FOOTER_SIZE)
        fields = parse_footer(f.read(FOOTER_SIZE))
    if fields["current_size"] + FOOTER_SIZE != length:
        raise VhdInvalid(detail=f"{path}: footer says {fields['current_size']} bytes of data, "
                           f"the file holds {length - FOOTER_SIZE}")  # fmt: skip
    return fields | {"file_size": length}


# -- copying and digests -----------------------------------------------------------------


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
    fsync_dir(out.parent)
    return read_footer(out)
