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
    """A loop device over a sparse file, optionally with a mounted ext4."""

    def __init__(self, base: Path, size: int, fs: bool) -> None:
        self.image = base / "source.img"
        with open(self.image, "wb") as f:
            f.truncate(size)
        self.device = run(
            "losetup", "--find", "--show", "--direct-io=on", str(self.image)
        ).stdout.strip()
        self.mountpoint: Path | None = None
        if fs:
            run(
                "mkfs.ext4",
                "-q",
                "-F",
                "-b",
                "4096",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                self.device,
            )
            self.mountpoint = base / "mnt"
            self.mountpoint.mkdir()
            run("mount", self.device, str(self.mountpoint))

    def unmount(self) -> None:
        if self.mountpoint and os.path.ismount(self.mountpoint):
            subprocess.run(["fsfreeze", "-u", str(self.mountpoint)], capture_output=True)
            run("umount", str(self.mountpoint))

    def close(self) -> None:
        self.unmount()
        subprocess.run(["losetup", "-d", self.device], capture_output=True)


@pytest.fixture
def loopdisk(tmp_path):
    """Factory for loop devices (root only); all are detached at teardown."""
    made: list[LoopDisk] = []

    def make(size: int = 256 << 20, fs: bool = True) -> LoopDisk:
        base = tmp_path / f"disk{len(made)}"
        base.mkdir()
        disk = LoopDisk(base, size, fs)
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
