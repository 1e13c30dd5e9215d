"""The harnesses' own promises: loop teardown never skips a device; leaks are found."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support import wait_for
from support.disks import LoopDisk, release_all
from support.leaks import TRACEFS_INSTANCES, LeakCheck, loop_devices

pytestmark = [pytest.mark.root]
MiB = 1 << 20


def new_disk(base, fs: bool) -> LoopDisk:
    base.mkdir()
    return LoopDisk.new(base, 16 * MiB, fs)


def test_loop_teardown_detaches_every_device_even_when_one_is_busy(tmp_path):
    busy, other = new_disk(tmp_path / "a", fs=True), new_disk(tmp_path / "b", fs=True)
    with open(busy.mountpoint / "held-open", "w"):
        with pytest.raises(AssertionError, match=r"umount .*/a/mnt: .*\(unmounted lazily\)"):
            release_all([busy, other])
        assert not os.path.ismount(busy.mountpoint) and not os.path.ismount(other.mountpoint)
        assert other.device not in loop_devices(tmp_path)
    # The busy device goes once its last user does (losetup -d set autoclear).
    wait_for(lambda: busy.device not in loop_devices(tmp_path), 10, f"{busy.device} detached")


@pytest.mark.tracefs
def test_the_leak_check_finds_what_a_test_left_and_removes_it(tmp_path):
    check = LeakCheck(tmp_path / "session")
    (tmp_path / "session").mkdir()
    image = tmp_path / "session" / "left.img"
    image.write_bytes(bytes(16 * MiB))
    disk = LoopDisk(image, tmp_path / "session" / "mnt")  # left mounted
    device = disk.device
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    check.started(proc.pid)
    instance = f"ferry-leakcheck-{proc.pid}"
    (TRACEFS_INSTANCES / instance).mkdir()
    try:
        found = check.leftovers()
        assert found["loop devices"] == {device: str(image)}
        assert list(found["tracefs instances"]) == [instance]
        assert list(found["processes"]) == [proc.pid]
        check.clean(found)
        proc.wait(10)
        assert not os.path.ismount(disk.mountpoint)
        wait_for(lambda: check.leftovers() == {}, 10, "everything removed")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if (TRACEFS_INSTANCES / instance).exists():
            (TRACEFS_INSTANCES / instance).rmdir()
        if os.path.ismount(disk.mountpoint):
            subprocess.run(["umount", "-l", str(disk.mountpoint)], capture_output=True)
        subprocess.run(["losetup", "-d", device], capture_output=True)
