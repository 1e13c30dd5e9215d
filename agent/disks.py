"""What a protected device is: a whole disk, known by identity, and what sits on it.

Ferry protects whole disks.  Partitions and device-mapper volumes live on
them, and the kernel's block tracepoints report their writes on the whole
disk with absolute sectors, so protecting the disk covers them; naming a
partition or a volume as a disk is refused (its device number never appears
in a trace event, so it would never be tracked).

A disk is known by a stable **identity** (WWN, serial, or for devices with
neither, such as loop devices, what backs them), recorded in the agent's
state at first protection: ``/dev/sdX`` names can swap after a reboot, and a
swapped device must never be replicated onto another disk's target.

Everything here reads ``/sys/dev/block``, ``/sys/class/block``,
``/run/udev/data`` and ``/proc/self/mountinfo``; nothing writes to a disk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ferry.blockio import is_block_device
from ferry.errors import DeviceError

SYS_DEV_BLOCK = Path("/sys/dev/block")
SYS_CLASS_BLOCK = Path("/sys/class/block")
UDEV_DATA = Path("/run/udev/data")


def _majmin(device: str) -> str:
    rdev = os.stat(device).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def sys_dir(device: str) -> Path:
    """The device's directory in sysfs (``/sys/devices/.../block/<name>``)."""
    return (SYS_DEV_BLOCK / _majmin(device)).resolve()


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def check_whole_disk(device: str) -> None:
    """DeviceError unless ``device`` is a whole disk (or an image file).

    A partition or a stacked volume (device-mapper, md) is refused with the
    disk to protect instead.
    """
    if not is_block_device(device):
        return  # an image file: the scan tracker's business
    sys = sys_dir(device)
    if (sys / "partition").exists():
        disk = sys.parent.name
        raise DeviceError(
            device=device,
            problem=f"it is partition {_read(sys / 'partition')} of /dev/{disk}; Ferry protects "
            f"whole disks: protect /dev/{disk}, which covers its partitions",
        )
    below = sorted(p.name for p in (sys / "slaves").glob("*"))
    if below or (sys / "dm").exists():
        kind = "a device-mapper volume" if (sys / "dm").exists() else "a stacked volume"
        raise DeviceError(
            device=device,
            problem=f"it is {kind} on {', '.join('/dev/' + b for b in below) or 'other disks'}; "
            "Ferry protects whole disks: protect those, which cover the volume",
        )


def identity(device: str) -> str:
    """A stable identity of ``device``: what says it is the same disk after a reboot.

    In order: the WWN or serial the disk reports, udev's ``ID_WWN`` or
    ``ID_SERIAL``, the backing file of a loop device (path and inode), the
    path and inode of an image file, and last the device's place on its bus
    (sysfs path), which survives a reboot but not a move to another port.
    """
    if not is_block_device(device):
        st = os.stat(device)
        return f"file:{os.path.realpath(device)}#{st.st_dev}:{st.st_ino}"
    sys = sys_dir(device)
    for name in ("wwid", "serial"):
        value = _read(sys / "device" / name)
        if value:
            return f"{name}:{value}"
    udev = _udev_properties(_majmin(device))
    for key in ("ID_WWN", "ID_SERIAL"):
        if udev.get(key):
            return f"{key.lower()}:{udev[key]}"
    backing = _read(sys / "loop" / "backing_file")
    if backing:
        try:
            st = os.stat(backing)
            return f"loop:{backing}#{st.st_dev}:{st.st_ino}"
        except OSError:
            return f"loop:{backing}"  # deleted: the text says so
    return f"path:{str(sys).removeprefix('/sys')}"


def _udev_properties(majmin: str) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        lines = (UDEV_DATA / f"b{majmin}").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        if line.startswith("E:"):
            key, _, value = line[2:].partition("=")
            out[key] = value
    return out


def stacked(device: str) -> set[str]:
    """Names of the disk, its partitions and every volume built on them (holders)."""
    names: set[str] = set()
    _stacked(sys_dir(device).name, names)
    return names


def _stacked(name: str, seen: set[str]) -> None:
    """Add ``name``, its partitions and everything built on them (holders), recursively."""
    if name in seen:
        return
    seen.add(name)
    base = SYS_CLASS_BLOCK / name
    for child in base.iterdir() if base.is_dir() else ():
        if (child / "partition").exists():
            _stacked(child.name, seen)
    for holder in (base / "holders").glob("*"):
        _stacked(holder.name, seen)


@dataclass(frozen=True)
class Mounted:
    """A mounted filesystem on a protected disk."""

    device: str
    """The block device it is mounted from (``/dev/<name>``)."""
    mountpoint: str
    read_write: bool


def filesystems_on(devices: list[str]) -> list[Mounted]:
    """Every filesystem mounted from ``devices``, their partitions or volumes on them.

    Each filesystem once (a bind mount or a second mount of it is the same
    filesystem: freezing it twice would fail), in mount order.
    """
    numbers: dict[str, str] = {}
    for device in devices:
        if not is_block_device(device):
            continue
        for name in stacked(device):
            dev = _read(SYS_CLASS_BLOCK / name / "dev")
            if dev:
                numbers[dev] = name
    out: dict[str, Mounted] = {}
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[2] not in numbers:
            continue
        rw = "rw" in fields[5].split(",")
        point = _unescape(fields[4])
        seen = out.get(fields[2])
        if seen is None:
            out[fields[2]] = Mounted(f"/dev/{numbers[fields[2]]}", point, rw)
        elif rw and not seen.read_write:
            out[fields[2]] = Mounted(seen.device, seen.mountpoint, True)
    return list(out.values())


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def main(argv: list[str] | None = None) -> int:
    """``python -m agent.disks mounted DEVICE...``: the mount points a freeze would cover.

    The cutover freezes a source with it (roles/cutover), so it finds the
    same filesystems as the agent's app-consistent tags.
    """
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0] != "mounted":
        print("usage: python -m agent.disks mounted DEVICE...", file=sys.stderr)
        return 2
    for mounted in filesystems_on(args[1:]):
        print(mounted.mountpoint)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
