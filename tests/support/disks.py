"""Loop devices over sparse files (root only), optionally with a mounted ext4.

Teardown is :func:`release_all`: it detaches every device even when one
``umount`` is busy (that one is unmounted lazily), and raises once at the
end naming everything that went wrong.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable
from pathlib import Path


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True)


def attach(image: Path) -> str:
    """A new loop device over ``image`` (direct I/O); its path."""
    return run("losetup", "--find", "--show", "--direct-io=on", str(image)).stdout.strip()


class LoopDisk:
    """A loop device over ``image``; with ``mountpoint``, an ext4 made on it and mounted there."""

    def __init__(self, image: Path, mountpoint: Path | None = None) -> None:
        self.image = Path(image)
        self.device = attach(self.image)
        self.mountpoint: Path | None = None
        try:
            if mountpoint is not None:
                run("mkfs.ext4", "-q", "-F", "-b", "4096",
                    "-E", "lazy_itable_init=0,lazy_journal_init=0", self.device)  # fmt: skip
                mountpoint.mkdir(exist_ok=True)
                run("mount", self.device, str(mountpoint))
                self.mountpoint = mountpoint
        except BaseException:
            self.release()
            raise

    @classmethod
    def new(cls, base: Path, size: int, fs: bool) -> LoopDisk:
        """A sparse ``base/source.img`` of ``size`` bytes; with ``fs``, mounted on ``base/mnt``."""
        image = base / "source.img"
        with open(image, "wb") as f:
            f.truncate(size)
        return cls(image, base / "mnt" if fs else None)

    def unmount(self) -> None:
        """Thaw and unmount the filesystem (a test's step: fails if the mount is busy)."""
        if self.mountpoint and os.path.ismount(self.mountpoint):
            subprocess.run(["fsfreeze", "-u", str(self.mountpoint)], capture_output=True)
            run("umount", str(self.mountpoint))

    def release(self) -> list[str]:
        """Unmount (lazily if busy) and detach; what went wrong, as lines (empty if nothing)."""
        problems = []
        if self.mountpoint and os.path.ismount(self.mountpoint):
            subprocess.run(["fsfreeze", "-u", str(self.mountpoint)], capture_output=True)
            done = subprocess.run(["umount", str(self.mountpoint)], capture_output=True, text=True)
            if done.returncode != 0:
                lazy = subprocess.run(
                    ["umount", "-l", str(self.mountpoint)], capture_output=True, text=True
                )
                problems.append(
                    f"umount {self.mountpoint}: {done.stderr.strip()}"
                    + (
                        " (unmounted lazily)"
                        if lazy.returncode == 0
                        else f"; {lazy.stderr.strip()}"
                    )
                )
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
