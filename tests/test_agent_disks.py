"""Real server disks: partitions, filesystems on them, several disks, disk identity.

Agent, process server and master target run as processes (devkit.embedded)
against Azurite, on real loop devices (partitions added with ``partx -a``)
with a real tracefs instance.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devkit.embedded import Embedded, FileWriter, digest

pytestmark = [pytest.mark.root, pytest.mark.tracefs, pytest.mark.slow]

MiB = 1 << 20
FERRY = str(Path(sys.executable).parent / "ferry")


@pytest.fixture
def deployment(tmp_path, azurite, tenant):
    emb = Embedded(tmp_path / "ferry", tenant=tenant, machine="web01", azurite=azurite)
    emb.start_storage()
    yield emb
    emb.close()


def configure(emb: Embedded, disks: dict[str, str], targets: Path, **agent) -> dict[str, Path]:
    """Protect ``disks`` ({id: device}); return each disk's target image."""
    paths = {d: targets / f"{d}.img" for d in disks}
    emb.configure(
        [{"id": d, "device": dev} for d, dev in disks.items()],
        {d: str(p) for d, p in paths.items()},
        agent={"freeze_after": 5.0, **agent},
    )
    return paths


def wait_disks(emb: Embedded, phase: str = "replicating", timeout: float = 300) -> dict:
    """Wait until every disk is in ``phase`` (replicating: and its last tag is applied)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        emb.check_alive()
        status = emb.agent_status() or {}
        disks = status.get("disks") or []
        if disks and all(d["phase"] == phase for d in disks):
            if phase != "replicating":
                return status
            if all(d.get("last_tag") for d in disks):
                emb.wait_applied(disks[0]["last_tag"]["id"], timeout=timeout)
                return status
        time.sleep(0.2)
    raise AssertionError(f"disks not {phase}; agent log: {emb.log_tail('agent', 10)}")


def write_direct(device: str, offset: int, data: bytes) -> None:
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, len(data))
        buf.write(data)
        os.pwritev(fd, [buf], offset)
    finally:
        os.close(fd)


def read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def agent_log(emb: Embedded) -> str:
    return (emb.base / "agent.log").read_text(errors="replace")


# -- partitions ----------------------------------------------------------------------


def test_a_partition_named_as_a_disk_is_refused(deployment, loopdisk, tmp_path):
    disk = loopdisk(64 * MiB, fs=False, partitions=[16 * MiB, 16 * MiB])
    configure(deployment, {"web01-disk0": disk.parts[1]}, tmp_path)
    deployment.start("agent")
    assert deployment.procs["agent"].wait(60) == 3, "a device error exits with status 3"
    last = agent_log(deployment).strip().splitlines()[-1]
    assert f"partition 2 of {disk.device}" in last and "protect " + disk.device in last, last
    assert "Traceback" not in agent_log(deployment)


def test_writes_through_each_partition_land_at_their_place_on_the_target(
    deployment, loopdisk, tmp_path
):
    disk = loopdisk(96 * MiB, fs=False, partitions=[32 * MiB, 32 * MiB])
    targets = configure(deployment, {"web01-disk0": disk.device}, tmp_path)
    deployment.start_all()
    wait_disks(deployment)
    written = {}
    for index, part in enumerate(disk.parts, 1):
        data = os.urandom(64 * 1024)
        write_direct(part, 5 * MiB, data)  # through the partition's own device
        written[disk.part_offset(index) + 5 * MiB] = data
    # Nothing is mounted: an app tag runs its hooks and says it froze nothing.
    tag = deployment.tag("app")
    assert tag["kind"] == "app" and tag["frozen"] == [], tag
    assert "nothing to freeze" in agent_log(deployment)
    deployment.wait_applied(tag["id"])
    target = targets["web01-disk0"]
    for offset, data in written.items():
        assert read_at(target, offset, len(data)) == data, f"write at {offset} misplaced"
    assert digest(str(target), 96 * MiB) == digest(disk.device, 96 * MiB)


def test_an_app_tag_freezes_every_filesystem_on_the_disks_partitions(
    deployment, loopdisk, tmp_path
):
    disk = loopdisk(128 * MiB, fs=True, partitions=[56 * MiB, 56 * MiB])
    targets = configure(deployment, {"web01-disk0": disk.device}, tmp_path)
    writers = [FileWriter(point, MiB) for point in disk.mountpoints]
    for writer in writers:
        writer.start()
    deployment.start_all()
    wait_disks(deployment)
    tag = deployment.tag("app")
    assert tag["kind"] == "app"
    assert sorted(tag["frozen"]) == sorted(str(p) for p in disk.mountpoints), tag
    before = [w.written for w in writers]
    time.sleep(1.5)
    assert all(w.written > b for w, b in zip(writers, before, strict=True)), "left frozen"
    for writer in writers:
        writer.stop.set()
        writer.join()
    deployment.wait_applied(tag["id"])
    deployment.stop("master-target")
    # Frozen: each partition's filesystem on the target is clean as it stands.
    for index in (1, 2):
        copy = tmp_path / f"part{index}.img"
        with open(targets["web01-disk0"], "rb") as src, open(copy, "wb") as dst:
            src.seek(disk.part_offset(index))
            dst.write(src.read(56 * MiB))
        result = subprocess.run(["e2fsck", "-fn", str(copy)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-3000:]


# -- several disks -------------------------------------------------------------------


def test_two_disks_share_each_tag_and_a_final_tag_lands_both(deployment, loopdisk, tmp_path):
    a, b = loopdisk(64 * MiB, fs=True), loopdisk(64 * MiB, fs=True)
    targets = configure(deployment, {"web01-disk0": a.device, "web01-disk1": b.device}, tmp_path)
    writers = [FileWriter(a.mountpoint, MiB), FileWriter(b.mountpoint, MiB)]
    for writer in writers:
        writer.start()
    deployment.start_all()
    status = wait_disks(deployment)
    tags = {d["disk"]: d["last_tag"]["id"] for d in status["disks"]}
    assert len(set(tags.values())) == 1, f"one tag covers both disks: {tags}"
    for writer in writers:
        writer.stop.set()
        writer.join()
    a.unmount()
    b.unmount()
    socket = str(deployment.base / "agent" / "agent.sock")
    out = subprocess.run(
        [FERRY, "agent", "tag", "--socket", socket, "--final", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    tag = json.loads(out.stdout)
    assert tag["final"] is True and tag["disks"] == ["web01-disk0", "web01-disk1"]
    deployment.wait_applied(tag["id"])
    for disk, source in (("web01-disk0", a), ("web01-disk1", b)):
        state = deployment.target_state(disk)
        assert state["last_tag"]["id"] == tag["id"] and state["fenced"], state
        assert digest(str(targets[disk]), 64 * MiB) == digest(source.device, 64 * MiB), disk


# -- identity ------------------------------------------------------------------------


def swap_backing_files(a, b) -> None:
    """Attach ``a``'s image to ``b``'s loop device and the other way round."""
    for disk in (a, b):
        subprocess.run(["losetup", "-d", disk.device], check=True)
    for device, image in ((a.device, b.image), (b.device, a.image)):
        subprocess.run(["losetup", "--direct-io=on", device, str(image)], check=True)
    a.image, b.image = b.image, a.image


def test_a_device_swapped_between_runs_is_refused_and_its_target_kept(
    deployment, loopdisk, tmp_path
):
    a, b = loopdisk(32 * MiB, fs=False), loopdisk(32 * MiB, fs=False)
    write_direct(a.device, 0, os.urandom(MiB))
    write_direct(b.device, 0, os.urandom(MiB))
    targets = configure(deployment, {"web01-disk0": a.device, "web01-disk1": b.device}, tmp_path)
    deployment.start_all()
    wait_disks(deployment)
    deployment.stop("agent")
    kept = {d: digest(str(p), 32 * MiB) for d, p in targets.items()}
    gens = {d: deployment.target_state(d)["gen"] for d in targets}

    swap_backing_files(a, b)  # what a reboot can do to /dev/sdb and /dev/sdc
    deployment.start("agent")
    status = wait_disks(deployment, "identity-mismatch", timeout=60)
    time.sleep(3)  # give a wrong agent time to ship
    status = deployment.agent_status()
    for d in status["disks"]:
        assert d["phase"] == "identity-mismatch" and d["bytes_read"] == 0, d
        assert "not the disk first protected" in d["problem"], d
    shown = subprocess.run(
        [FERRY, "agent", "status", "--socket", str(deployment.base / "agent" / "agent.sock")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert shown.count("identity-mismatch") == 2, shown
    for disk, path in targets.items():
        assert digest(str(path), 32 * MiB) == kept[disk], "a target was overwritten"
        assert deployment.target_state(disk)["gen"] == gens[disk], "no resync may start"

    swap_backing_files(a, b)  # the right disks again: replication resumes
    deployment.start("agent")
    wait_disks(deployment)
    tag = deployment.tag()
    deployment.wait_applied(tag["id"])
    for disk, source in (("web01-disk0", a), ("web01-disk1", b)):
        assert digest(str(targets[disk]), 32 * MiB) == digest(source.device, 32 * MiB)


def test_disks_are_accepted_by_a_stable_path(deployment, loopdisk, tmp_path):
    disk = loopdisk(32 * MiB, fs=False)
    link = tmp_path / "by-id" / "ferry-test-disk"
    link.parent.mkdir()
    link.symlink_to(disk.device)  # as /dev/disk/by-id/... links to ../../sdb
    targets = configure(deployment, {"web01-disk0": str(link)}, tmp_path)
    deployment.start_all()
    status = wait_disks(deployment)
    assert status["disks"][0]["device_path"] == disk.device
    assert status["disks"][0]["identity"].startswith("loop:" + str(disk.image))
    assert digest(str(targets["web01-disk0"]), 32 * MiB) == digest(disk.device, 32 * MiB)
    shutil.rmtree(link.parent)
