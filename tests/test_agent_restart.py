"""Restarts: an orderly stop hands tracking over, so the next start need not resync.

Real daemons (devkit.embedded), real loop devices, a real tracefs instance.
Every way the hand-over can leave a write unseen must end in a resync: a
crash (test_end_to_end), lost trace events, a vanished instance with writes
since, a disk written after it reappeared, a filesystem in use at the stop.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support import wait_for

from devkit.embedded import Embedded, FileWriter, digest

pytestmark = [pytest.mark.root, pytest.mark.tracefs, pytest.mark.slow]

MiB = 1 << 20
DISK = "web01-disk0"
INSTANCES = Path("/sys/kernel/tracing/instances")


@pytest.fixture
def deployment(tmp_path, azurite, tenant):
    emb = Embedded(tmp_path / "ferry", tenant=tenant, machine="web01", azurite=azurite)
    emb.start_storage()
    yield emb
    emb.close()


def start(emb: Embedded, timeout: float = 300) -> dict:
    """Start the agent and wait until the disk replicates and its last tag is applied."""
    emb.start("agent")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        emb.check_alive()
        disk = ((emb.agent_status() or {}).get("disks") or [{}])[0]
        if disk.get("phase") == "replicating" and disk.get("last_tag"):
            emb.wait_applied(disk["last_tag"]["id"], timeout=timeout)
            return disk
        time.sleep(0.2)
    raise AssertionError(f"no tag; agent log: {emb.log_tail('agent', 10)}")


def stop(emb: Embedded) -> str:
    """Stop the agent in order (SIGTERM); return the trace instance it left running."""
    pid = emb.procs["agent"].pid
    emb.stop("agent")
    left = [
        p.name
        for p in INSTANCES.glob("ferry-web01-*")
        if int(p.name.rsplit("-", 1)[1]) in emb.agent_pids
    ]
    assert len(left) == 1, f"one trace instance is left for the next start (agent {pid}): {left}"
    return left[0]


def write_blocks(device: str, count: int, first: int = 0) -> None:
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)
    try:
        for i in range(count):
            buf[:16] = os.urandom(16)
            os.pwritev(fd, [buf], ((first + i * 7919) % 8192) * 4096)
    finally:
        os.close(fd)


def converged(emb: Embedded, device: str, target: Path, size: int) -> None:
    tag = emb.tag("crash", timeout=120)
    emb.wait_applied(tag["id"], timeout=300)
    assert digest(str(target), size) == digest(device, size), "target differs from source"


def remove_instance(name: str) -> None:
    """What a reboot does to a trace instance."""
    (INSTANCES / name / "tracing_on").write_text("0")
    (INSTANCES / name).rmdir()


def reattach(disk) -> None:
    """Detach and attach the loop device again (it keeps its I/O counters)."""
    subprocess.run(["losetup", "-d", disk.device], check=True)
    subprocess.run(["losetup", "--direct-io=on", disk.device, str(disk.image)], check=True)


def pretend_reboot(emb: Embedded, name: str) -> None:
    """What a reboot changes for the next start: the instance is gone, the boot id differs.

    The boot id is changed in the agent's stop record: this machine cannot
    reboot (the QEMU lab can).
    """
    remove_instance(name)
    for path in (emb.base / "agent" / "disks").glob("*.stop.json"):
        record = json.loads(path.read_text())
        record["epoch"] = "another-boot"
        path.write_text(json.dumps(record))


def test_an_orderly_restart_resumes_without_reading_the_disk_again(deployment, loopdisk, tmp_path):
    size = 128 * MiB
    disk = loopdisk(size, fs=True)
    target = tmp_path / "target.img"
    deployment.configure([{"id": DISK, "device": disk.device}], {DISK: str(target)})
    writer = FileWriter(disk.mountpoint, MiB)
    writer.start()
    deployment.start("process-server")
    deployment.wait_port()
    deployment.start("master-target")
    first = start(deployment)
    assert first["gen"] == 1 and first["bytes_read"] >= size

    stop(deployment)
    time.sleep(2)  # the writer goes on while the agent is down
    resumed = start(deployment)
    assert resumed["start"] == "resumed" and resumed["gen"] == 1 and resumed["resyncs"] == 0
    assert resumed["bytes_read"] < size // 4, "a resumed disk is not read in full"
    writer.stop.set()
    writer.join()
    os.sync()
    converged(deployment, disk.device, target, size)

    # A filesystem was mounted read-write at the stop: after a reboot writes
    # may have escaped, so it resyncs.
    name = stop(deployment)
    disk.unmount()
    pretend_reboot(deployment, name)
    again = start(deployment)
    assert again["gen"] == 2 and "in use read-write" in again["start"], again
    converged(deployment, disk.device, target, size)


def test_every_gap_in_the_hand_over_ends_in_a_resync(deployment, loopdisk, tmp_path):
    size = 32 * MiB
    disk = loopdisk(size, fs=False)
    target = tmp_path / "target.img"
    deployment.configure(
        [{"id": DISK, "device": disk.device}], {DISK: str(target)}, agent={"trace_buffer_kb": 64}
    )
    deployment.start("process-server")
    deployment.wait_port()
    deployment.start("master-target")
    assert start(deployment)["gen"] == 1

    # Writes while down are in the surviving instance: resumed, and shipped.
    stop(deployment)
    write_blocks(disk.device, 20)
    d = start(deployment)
    assert (d["gen"], d["start"]) == (1, "resumed"), d
    converged(deployment, disk.device, target, size)

    # More writes than the instance's buffer holds: events were dropped.
    stop(deployment)
    write_blocks(disk.device, 6000, first=3)
    d = start(deployment)
    assert d["gen"] == 2 and "lost" in d["start"], d
    converged(deployment, disk.device, target, size)

    # The instance vanished and the disk was written meanwhile.
    remove_instance(stop(deployment))
    write_blocks(disk.device, 1, first=5)
    d = start(deployment)
    assert d["gen"] == 3 and "writes completed while the agent was down" in d["start"], d
    converged(deployment, disk.device, target, size)

    # The instance vanished and the device went and came back, unwritten:
    # its counters prove nothing escaped.
    remove_instance(stop(deployment))
    reattach(disk)
    d = start(deployment)
    assert (d["gen"], d["start"]) == (3, "resumed"), d

    # A reboot with nothing in use on the disk at the stop, but the disk
    # written since the boot (a loop device's counters never restart, as a
    # real disk's do at boot): the written blocks are unknown.
    pretend_reboot(deployment, stop(deployment))
    d = start(deployment)
    assert d["gen"] == 4 and "since the boot" in d["start"], d
    converged(deployment, disk.device, target, size)


def test_an_orderly_stop_in_the_middle_of_a_long_pass_still_hands_over(
    deployment, loopdisk, tmp_path
):
    # A first sync (as a resync) reads the whole disk in one pass: longer than a stop
    # may take on a slow machine. The stop ends the pass where it is, puts what it did
    # not send back into the dirty map, and hands that map over.
    size = 768 * MiB
    disk = loopdisk(size, fs=False)
    subprocess.run(["dd", "if=/dev/urandom", f"of={disk.device}", "bs=4M", "oflag=direct",
                    f"count={size // (4 * MiB)}", "status=none"], check=True)  # fmt: skip
    target = tmp_path / "target.img"
    deployment.configure([{"id": DISK, "device": disk.device}], {DISK: str(target)})
    deployment.start("process-server")
    deployment.wait_port()
    deployment.start("master-target")
    deployment.start("agent")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        deployment.check_alive()
        now = ((deployment.agent_status() or {}).get("disks") or [{}])[0]
        if now.get("phase") == "initial-sync" and now.get("bytes_read", 0) >= 32 * MiB:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"no initial sync under way: {deployment.log_tail('agent', 10)}")
    assert now["bytes_read"] < size, "the pass ended before the stop: nothing tested"
    stop(deployment)
    assert "stopping in the middle of a pass" in deployment.log_tail("agent", 20)
    resumed = start(deployment)
    assert resumed["start"] == "resumed" and resumed["gen"] == 1 and resumed["resyncs"] == 0
    converged(deployment, disk.device, target, size)


def test_an_orderly_stop_with_the_process_server_gone_keeps_its_unacknowledged_batches(
    deployment, loopdisk, tmp_path
):
    # At an orderly reboot the network goes before the agent stops (systemd-networkd
    # drops its DHCP address): the last batches are sent but never acknowledged. The
    # stop keeps them, verbatim; the next start sends them again before anything new.
    size = 32 * MiB
    disk = loopdisk(size, fs=False)
    target = tmp_path / "target.img"
    deployment.configure([{"id": DISK, "device": disk.device}], {DISK: str(target)})
    deployment.start("process-server")
    deployment.wait_port()
    deployment.start("master-target")
    assert start(deployment)["gen"] == 1

    # The process server stops answering (as a vanished address does) and then dies
    # with what it had not read: those batches exist only in the agent.
    os.kill(deployment.procs["process-server"].pid, signal.SIGSTOP)
    write_blocks(disk.device, 20, first=11)
    wait_for(
        lambda: ((deployment.agent_status() or {}).get("disks") or [{}])[0].get("backlog_batches"),
        120, "a batch sent and not acknowledged", interval=0.2,
    )  # fmt: skip
    stop(deployment)
    log = deployment.log_tail("agent", 5)
    assert "unacknowledged batches kept to send again" in log, log
    deployment.kill("process-server")
    deployment.start("process-server")
    deployment.wait_port()

    resumed = start(deployment)
    assert (resumed["start"], resumed["gen"], resumed["resyncs"]) == ("resumed", 1, 0), resumed
    assert resumed["bytes_read"] < size // 4, "a resumed disk is not read in full"
    assert deployment.agent_status()["bytes_resent"] > 0, "the kept batch was not sent again"
    converged(deployment, disk.device, target, size)
