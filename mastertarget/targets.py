"""Where a disk is applied on the master target's host, as its configuration says, checked.

The configuration server gives each disk a target (``docs/api.md``, protect's
``targets``): a block device (in Azure, a data disk of the master target VM
by its stable path, ``/dev/disk/azure/scsi1/lun3``) or an image file; a disk
given none gets the image file ``<targets_dir>/<disk>.img``.  Before a disk
is served its target is checked here, and a bad one is refused with one
line (the disk is not served; every other disk is):

- ``device``: under ``/dev/``, exists, is a block device, holds at least the
  source disk's size, is not mounted, is no other disk's target;
- ``file``: inside ``targets_dir`` (links resolved), a regular file if it
  exists (else it is created, sparse).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from ferry.diskio import device_size
from ferry.errors import ConfigError, DeviceError

KINDS = ("device", "file")
DEVICE_ROOT = "/dev/"


def resolve(
    disk: dict[str, Any], targets_dir: Path, taken: set[str] | None = None
) -> dict[str, Any]:
    """The settings entry ``{"id", "target", "kind"}`` of one configured disk, checked.

    ``disk`` is the server's ``{"id", "target"?, "kind"?, "size"?}``;
    ``taken`` holds the resolved paths of targets already in use (updated).
    Raises DeviceError or ConfigError with one line.
    """
    disk_id, kind = disk["id"], disk.get("kind") or "file"
    path = disk.get("target") or str(targets_dir / f"{disk_id}.img")
    if kind not in KINDS:
        raise ConfigError(path="the configuration server's settings",
                          problem=f"disk {disk_id}: target kind {kind!r} is not one of "
                          f"{', '.join(KINDS)}")  # fmt: skip
    real = (
        _check_device(path, disk.get("size"))
        if kind == "device"
        else _check_file(path, targets_dir)
    )
    if taken is not None:
        if real in taken:
            raise DeviceError(device=path, problem=f"it is already the target of another disk "
                              f"({real})")  # fmt: skip
        taken.add(real)
    entry = {"id": disk_id, "target": path, "kind": kind}
    return entry | ({"size": disk["size"]} if isinstance(disk.get("size"), int) else {})


def _check_device(path: str, size: Any) -> str:
    if not path.startswith(DEVICE_ROOT) or ".." in path.split("/"):
        raise DeviceError(
            device=path, problem=f"a device target must be a path under {DEVICE_ROOT}"
        )
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DeviceError(device=path, problem="no such device (is the data disk attached?)")
    except OSError as exc:
        raise DeviceError(device=path, problem=exc.strerror or str(exc))
    if not stat.S_ISBLK(mode):
        raise DeviceError(device=path, problem="not a block device")
    real = os.path.realpath(path)
    if isinstance(size, int) and size > 0:
        held = device_size(path)
        if held < size:
            raise DeviceError(device=path, problem=f"it holds {held} bytes, the source disk has "
                              f"{size}")  # fmt: skip
    mounted = _mounted_from(real)
    if mounted:
        raise DeviceError(device=path, problem=f"it is mounted at {mounted}")
    return real


def _check_file(path: str, targets_dir: Path) -> str:
    root = os.path.realpath(targets_dir)
    real = os.path.realpath(path)
    if not path.startswith("/") or os.path.commonpath([root, real]) != root:
        raise ConfigError(path="the configuration server's settings",
                          problem=f"file target {path} is outside the targets directory "
                          f"{targets_dir}")  # fmt: skip
    if os.path.exists(real) and not stat.S_ISREG(os.stat(real).st_mode):
        raise DeviceError(device=path, problem="a file target must be a regular file")
    Path(real).parent.mkdir(parents=True, exist_ok=True)
    return real


def _mounted_from(device: str) -> str | None:
    """Where ``device`` is mounted (the first mount point), or None."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 1 and fields[0].startswith("/") and os.path.realpath(fields[0]) == device:
            return fields[1].replace("\\040", " ")
    return None
