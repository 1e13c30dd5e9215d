"""Loop devices over sparse files (root only), optionally partitioned, with mounted ext4s.

This kernel parses no partition tables: a partitioned image gets a GPT
(``sfdisk``) and its partitions are added with ``partx -a``.

Teardown is :func:`release_all`: it detaches every device even when one
``umount`` is busy (that one is unmounted lazily), and raises once at the
end naming everything that went wrong.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable
from pathlib import Path


def run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def mkfs(device: str) -> None:
    """An ext4 with its inode tables and journal written now, not lazily later."""
    run("mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0",
        device)  # fmt: skip


GPT_ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
GPT_BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
GPT_LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
UEFI_TABLE = f"label: gpt\nsize=16MiB, type={GPT_ESP}\ntype={GPT_LINUX}\n"
"""sfdisk's script for the disk of a machine that boots with UEFI (an ESP, then the root)."""


def partitioned(path: Path, script: str, size: int = 64 << 20) -> Path:
    """A disk image (a sparse file) whose partition table util-linux's sfdisk wrote from ``script``."""
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["sfdisk", "-q", str(path)], input=script, text=True, check=True)
    return path


def attach(image: Path) -> str:
    """A new loop device over ``image`` (direct I/O); its path."""
    return run("losetup", "--find", "--show", "--direct-io=on", str(image)).stdout.strip()


class LoopDisk:
    """A loop device over ``image``; ext4 on it (or on each partition) mounted under ``base``.

    ``parts`` lists the partitions' devices and ``mountpoints`` the mounts;
    ``mountpoint`` is the whole disk's mount, if it has one.
    """

    def __init__(self, image: Path, mountpoint: Path | None = None, partitions: int = 0,
                 part_mounts: Path | None = None) -> None:  # fmt: skip
        self.image = Path(image)
        self.device = attach(self.image)
        self.parts: list[str] = []
        self.mountpoints: list[Path] = []
        self.mountpoint: Path | None = None
        try:
            if partitions:
                run("partx", "-a", self.device)
                self.parts = [f"{self.device}p{i + 1}" for i in range(partitions)]
            if self.parts and part_mounts is not None:  # ext4 on each partition
                mounts = [(dev, part_mounts / f"mnt{i + 1}") for i, dev in enumerate(self.parts)]
            elif mountpoint is not None:
                mounts = [(self.device, mountpoint)]
            else:
                mounts = []
            for dev, point in mounts:
                mkfs(dev)
                point.mkdir(parents=True, exist_ok=True)
                run("mount", dev, str(point))
                self.mountpoints.append(point)
            if mountpoint is not None and not self.parts:
                self.mountpoint = mountpoint
        except BaseException:
            self.release()
            raise

    @classmethod
    def new(cls, base: Path, size: int, fs: bool, partitions: list[int] | None = None) -> LoopDisk:
        """A sparse ``base/source.img`` of ``size`` bytes, with a GPT of ``partitions`` (sizes
        in bytes) if given; with ``fs``, ext4 mounted on ``base/mnt`` (or ``mnt1``, ...)."""
        image = base / "source.img"
        with open(image, "wb") as f:
            f.truncate(size)
        if partitions:
            table = "label: gpt\n" + "".join(f"size={n // 512}\n" for n in partitions)
            run("sfdisk", "-q", str(image), input=table)
        if partitions:
            return cls(image, None, len(partitions), base if fs else None)
        return cls(image, base / "mnt" if fs else None)

    def part_offset(self, index: int) -> int:
        """Byte offset of partition ``index`` (1-based) on the whole disk."""
        name = Path(self.parts[index - 1]).name
        return int((Path("/sys/class/block") / name / "start").read_text()) * 512

    def unmount(self) -> None:
        """Thaw and unmount the filesystems (a test's step: fails if a mount is busy)."""
        for point in self.mountpoints:
            if os.path.ismount(point):
                subprocess.run(["fsfreeze", "-u", str(point)], capture_output=True)
                run("umount", str(point))

    def release(self) -> list[str]:
        """Unmount (lazily if busy) and detach; what went wrong, as lines (empty if nothing)."""
        problems = []
        for point in self.mountpoints:
            if not os.path.ismount(point):
                continue
            subprocess.run(["fsfreeze", "-u", str(point)], capture_output=True)
            done = subprocess.run(["umount", str(point)], capture_output=True, text=True)
            if done.returncode != 0:
                lazy = subprocess.run(["umount", "-l", str(point)], capture_output=True, text=True)
                problems.append(
                    f"umount {point}: {done.stderr.strip()}"
                    + (
                        " (unmounted lazily)"
                        if lazy.returncode == 0
                        else f"; {lazy.stderr.strip()}"
                    )
                )
        if self.parts:
            subprocess.run(["partx", "-d", self.device], capture_output=True)
        done = subprocess.run(["losetup", "-d", self.device], capture_output=True, text=True)
        if done.returncode != 0:
            problems.append(f"losetup -d {self.device}: {done.stderr.strip()}")
        return problems


def release_all(disks: Iterable[LoopDisk]) -> None:
    """Release every disk, then raise naming all that went wrong (nothing is skipped)."""
    problems = []
    for disk in disks:
        try:
            problems += disk.release()
        except Exception as exc:  # e.g. a tool missing: still try the others
            problems.append(f"{disk.device}: {type(exc).__name__}: {exc}")
    if problems:
        raise AssertionError("loop device teardown: " + "; ".join(problems))
