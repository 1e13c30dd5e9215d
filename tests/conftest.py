"""Shared fixtures: real Azurite, real TLS certificates, real loop devices.

The harnesses live in ``support/`` (pyproject puts ``tests`` on ``sys.path``); the
session fails if it leaves a loop device, a tracefs instance or a process
behind (``support.leaks``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid

import pytest
from support.disks import LoopDisk, release_all
from support.leaks import MARKER, LeakCheck, describe

from devkit.azurite import Azurite
from ferry import pki
from ferry.storage import Storage

pytest_plugins = ["support.api", "support.lab"]

IS_ROOT = os.geteuid() == 0
LEAKS = pytest.StashKey[LeakCheck]()


def pytest_sessionstart(session):
    check = LeakCheck(session.config._tmp_path_factory.getbasetemp())
    os.environ[MARKER] = check.session  # inherited by every process the session starts
    session.config.stash[LEAKS] = check
    started = subprocess.Popen.__init__

    def remember(self, *args, **kwargs):  # whose pid an agent's tracefs instance may carry
        started(self, *args, **kwargs)
        check.started(self.pid)

    subprocess.Popen.__init__ = remember


@pytest.hookimpl(trylast=True)  # after the runner has torn down the remaining fixtures
def pytest_sessionfinish(session, exitstatus):
    check = session.config.stash.get(LEAKS, None)
    if check is None:
        return
    found = check.settle()
    if not found:
        return
    check.clean(found)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = describe(found)
    if reporter is not None:
        reporter.write_line("")
        reporter.write_sep("=", "left behind by this session (now removed)", red=True)
        for line in lines:
            reporter.write_line(line, red=True)
    else:
        print("left behind by this session:", *lines, sep="\n", file=sys.stderr)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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


@pytest.fixture
def loopdisk(tmp_path):
    """Factory for loop devices (root only); all are detached at teardown, even if one is busy."""
    made: list[LoopDisk] = []

    def make(size: int = 256 << 20, fs: bool = True, partitions: list[int] | None = None):
        base = tmp_path / f"disk{len(made)}"
        base.mkdir()
        disk = LoopDisk.new(base, size, fs, partitions)
        made.append(disk)
        return disk

    yield make
    release_all(made)


def tool(name: str) -> str:
    """Absolute path of a system tool (sbin included), or skip with the reason."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if not found:
        pytest.fail(f"{name} is not installed; `make setup` installs it")
    return found
