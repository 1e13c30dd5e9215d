"""Shared fixtures: real Azurite, real TLS certificates, real loop devices."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from devkit.azurite import Azurite
from ferry import pki
from ferry.storage import Storage

pytest_plugins = ["functions_support", "support.lab"]

ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config, items):
    if IS_ROOT:
        return
    if os.environ.get("CI") == "true":
        raise pytest.UsageError("CI must run as root: the root/tracefs tests may not be skipped")
    skip = pytest.mark.skip(reason="needs root (deselect with -m 'not root')")
    for item in items:
        if "root" in item.keywords or "tracefs" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def azurite():
    """One Azurite for the whole session; tests isolate by unique names."""
    with Azurite() as instance:
        yield instance


@pytest.fixture
def storage(azurite) -> Storage:
    return Storage(azurite.connection_string)


@pytest.fixture
def tenant() -> str:
    """A fresh tenant id per test, so queues and blobs never collide."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """A CA plus server, agent and stranger (other CA) certificates."""
    base = tmp_path_factory.mktemp("pki")
    pki.make_ca(base / "ca")
    pki.issue(base / "ca", base, "process-server", ["localhost", "127.0.0.1"])
    pki.issue(base / "ca", base, "agent", tenants=["*"], machine="*")  # a tenant each
    pki.make_ca(base / "rogue-ca", name="Rogue CA")
    pki.issue(base / "rogue-ca", base, "stranger")
    return base


def run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


class LoopDisk:
    """A loop device over a sparse file, optionally with a mounted ext4.

    With ``partitions`` (sizes in bytes) the image gets a GPT with those
    partitions, added with ``partx -a`` (this kernel parses no partition
    tables), and ``fs`` puts a mounted ext4 on each partition instead of the
    whole disk: ``parts`` and ``mountpoints`` list them.
    """

    def __init__(
        self, base: Path, size: int, fs: bool, partitions: list[int] | None = None
    ) -> None:
        self.base = base
        self.image = base / "source.img"
        with open(self.image, "wb") as f:
            f.truncate(size)
        if partitions:
            table = "label: gpt\n" + "".join(f"size={n // 512}\n" for n in partitions)
            run("sfdisk", "-q", str(self.image), input=table)
        self.device = run(
            "losetup", "--find", "--show", "--direct-io=on", str(self.image)
        ).stdout.strip()
        self.parts: list[str] = []
        self.mountpoints: list[Path] = []
        self.mountpoint: Path | None = None
        try:
            self._prepare(fs, partitions)
        except BaseException:
            self.close()  # detach what was made, also when set-up fails
            raise

    def _prepare(self, fs: bool, partitions: list[int] | None) -> None:
        if partitions:
            run("partx", "-a", self.device)
            self.parts = [f"{self.device}p{i + 1}" for i in range(len(partitions))]
        if fs:
            for i, dev in enumerate(self.parts or [self.device]):
                mkfs(dev)
                point = self.base / (f"mnt{i + 1}" if self.parts else "mnt")
                point.mkdir()
                run("mount", dev, str(point))
                self.mountpoints.append(point)
            self.mountpoint = None if self.parts else self.mountpoints[0]

    def part_offset(self, index: int) -> int:
        """Byte offset of partition ``index`` (1-based) on the whole disk."""
        name = Path(self.parts[index - 1]).name
        return int((Path("/sys/class/block") / name / "start").read_text()) * 512

    def unmount(self) -> None:
        for point in self.mountpoints:
            if os.path.ismount(point):
                subprocess.run(["fsfreeze", "-u", str(point)], capture_output=True)
                run("umount", str(point))

    def close(self) -> None:
        self.unmount()
        if self.parts:
            subprocess.run(["partx", "-d", self.device], capture_output=True)
        subprocess.run(["losetup", "-d", self.device], capture_output=True)


def mkfs(device: str) -> None:
    """An ext4 with its inode tables and journal written now, not lazily later."""
    run(
        "mkfs.ext4",
        "-q",
        "-F",
        "-b",
        "4096",
        "-E",
        "lazy_itable_init=0,lazy_journal_init=0",
        device,
    )


@pytest.fixture
def loopdisk(tmp_path):
    """Factory for loop devices (root only); all are detached at teardown."""
    made: list[LoopDisk] = []

    def make(
        size: int = 256 << 20, fs: bool = True, partitions: list[int] | None = None
    ) -> LoopDisk:
        base = tmp_path / f"disk{len(made)}"
        base.mkdir()
        disk = LoopDisk(base, size, fs, partitions)
        made.append(disk)
        return disk

    yield make
    for disk in made:
        disk.close()


def tool(name: str) -> str:
    """Absolute path of a system tool (sbin included), or skip with the reason."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if not found:
        pytest.fail(f"{name} is not installed; `make setup` installs it")
    return found
