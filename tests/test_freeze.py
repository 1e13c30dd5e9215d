"""Freezing a source's filesystems (agent/freeze.py): never frozen past the limit, never left frozen.

Real ext4 filesystems on loop devices, frozen with fsfreeze (root only). A
writer in a thread tells whether a filesystem is frozen: its write blocks
until the thaw.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from agent.freeze import FreezeFailed, Frozen

pytestmark = pytest.mark.root


def writable(point: Path, within: float = 30.0) -> bool:
    """True if a file can be written and fsync'ed on ``point`` within ``within`` seconds.

    A frozen filesystem holds the write for as long as it stays frozen, so the bound
    only has to outlast a slow fsync on a busy machine (a CI run with the lab's guests
    beside it once took more than 5 s).
    """

    def write() -> None:
        path = point / "probe"
        path.write_bytes(b"x" * 4096)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    writer.join(within)
    return not writer.is_alive()


def test_a_freeze_that_outlives_its_limit_is_thawed_and_says_so(loopdisk):
    first, second = loopdisk(64 << 20).mountpoint, loopdisk(64 << 20).mountpoint
    # The limit leaves room for the freezes themselves: each flushes its filesystem
    # first, which took most of a second on a busy CI host (the watchdog then thawed
    # before the write below could be held).
    with Frozen([str(first), str(second)], limit=3.0) as frozen:
        assert frozen.frozen == [str(first), str(second)]
        assert not writable(first, within=0.3)  # frozen: the write waits
        time.sleep(max(0.0, 3.5 - frozen.seconds))
        assert frozen.fired
        assert writable(second) and writable(first)  # the watchdog thawed both
    assert frozen.seconds >= 3.0


def test_a_freeze_that_fails_thaws_what_it_froze_and_names_the_point(loopdisk, tmp_path):
    mounted = loopdisk(64 << 20).mountpoint
    not_a_filesystem = tmp_path / "nowhere"
    failed = pytest.raises(FreezeFailed, match=re.escape(f"cannot freeze {not_a_filesystem}: "))
    with failed, Frozen([str(mounted), str(not_a_filesystem)], limit=30):
        pytest.fail("the with block ran although a freeze failed")
    assert writable(mounted)


def test_an_error_in_the_work_thaws_and_kept_points_stay_frozen_until_thawed(loopdisk):
    root, data = loopdisk(64 << 20).mountpoint, loopdisk(64 << 20).mountpoint
    with pytest.raises(RuntimeError), Frozen([str(root), str(data)], limit=30):
        raise RuntimeError("the digest failed")
    assert writable(root) and writable(data)
    # A cutover that stops the source keeps its data filesystems frozen, thaws the rest.
    with Frozen([str(root), str(data)], limit=3.0) as frozen:  # room for slow freezes
        frozen.thaw(keep=[str(data)])
    time.sleep(max(0.0, 3.5 - frozen.seconds))  # past the limit: no watchdog covers it now
    assert not frozen.fired
    assert writable(root)
    try:
        assert not writable(data, within=0.3)
    finally:
        subprocess.run(["fsfreeze", "-u", str(data)], check=True)
    assert writable(data)
