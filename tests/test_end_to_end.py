"""Agent -> process server -> Azurite -> master target, on real loop devices.

These tests run the real daemons as processes (devkit.embedded), with real
mutual TLS, a real tracefs instance and real Azurite, while a writer keeps
changing the source.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support import wait_for

from devkit.embedded import Embedded, FileWriter, RawWriter, digest

pytestmark = [pytest.mark.root, pytest.mark.tracefs, pytest.mark.slow]

MiB = 1 << 20
DISK = "web01-disk0"


def fill_with_files(mnt: Path, budget: int) -> None:
    from devkit.embedded import copy_tree_sample

    copy_tree_sample(mnt, budget)
    os.sync()


def materialised_fsck(target: str, work: Path) -> subprocess.CompletedProcess:
    """Copy the target, replay its journal as a mount would, then e2fsck -fn."""
    copy = work / "materialised.img"
    shutil.copyfile(target, copy)
    subprocess.run(["e2fsck", "-E", "journal_only", "-y", str(copy)], capture_output=True)
    result = subprocess.run(["e2fsck", "-fn", str(copy)], capture_output=True, text=True)
    copy.unlink()
    return result


@pytest.fixture
def deployment(tmp_path, azurite, tenant):
    emb = Embedded(tmp_path / "ferry", tenant=tenant, machine="web01", azurite=azurite)
    emb.start_storage()
    yield emb
    emb.close()


def configure(emb: Embedded, device: str, target: Path, **agent) -> None:
    emb.configure(
        [{"id": DISK, "device": device}],
        {DISK: str(target)},
        agent={"freeze_after": 5.0, **agent},
    )


def wait_first_tag(emb: Embedded, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        emb.check_alive()
        status = emb.agent_status() or {}
        disk = (status.get("disks") or [{}])[0]
        if disk.get("phase") == "replicating" and disk.get("last_tag"):
            emb.wait_applied(disk["last_tag"]["id"], timeout=timeout)
            return status
        time.sleep(0.2)
    raise AssertionError(f"no first tag; agent log: {emb.log_tail('agent', 10)}")


def applied(emb: Embedded) -> int:
    """The ``t0_mono_ns`` of the tag the target sits on (-1 before any)."""
    return ((emb.target_state(DISK) or {}).get("last_tag") or {}).get("t0_mono_ns", -1)


def final_tag_and_compare(emb: Embedded, device: str, target: Path, size: int) -> None:
    """With the source quiet: tag, wait until applied, compare byte for byte."""
    tag = emb.tag("crash", timeout=120)
    emb.wait_applied(tag["id"], timeout=300)
    assert digest(str(target), size) == digest(device, size), "target differs from source"


def test_filesystem_replicates_consistently_under_writes(deployment, loopdisk, tmp_path):
    size = 256 * MiB
    disk = loopdisk(size, fs=True)
    fill_with_files(disk.mountpoint, 96 * MiB)
    target = tmp_path / "target.img"
    configure(deployment, disk.device, target)
    writer = FileWriter(disk.mountpoint, 2 * MiB)
    writer.start()
    deployment.start_all()
    wait_first_tag(deployment)
    # Stop the master target at several moments: each time it finishes the
    # group in hand, so the target sits on a tag and must be a clean filesystem.
    for _ in range(3):
        since, written = applied(deployment), writer.written
        wait_for(
            lambda since=since, written=written: (
                applied(deployment) > since and writer.written > written
            ),
            120,
            "the master target to apply a new tag while files change",
        )
        deployment.stop("master-target")
        result = materialised_fsck(str(target), tmp_path)
        assert result.returncode == 0, result.stdout[-3000:]
        deployment.start("master-target")
    writer.stop.set()
    writer.join()
    disk.unmount()
    final_tag_and_compare(deployment, disk.device, target, size)
    status = deployment.agent_status()
    assert status["tracker"] == "tracefs"
    assert status["disks"][0]["resyncs"] == 1, "no resync beyond the start was needed"
    # The agent offered its record protocols and got the first: AEGIS-256 (ferry.records).
    served = json.loads((deployment.base / "process-server" / "status.json").read_text())
    assert [agent["records"] for agent in served["agents"]] == ["ferry-records-2"]


def test_initial_sync_skips_zeros_and_resync_sends_only_differences(deployment, loopdisk, tmp_path):
    size = 128 * MiB
    disk = loopdisk(size, fs=False)
    fd = os.open(disk.device, os.O_WRONLY)
    os.pwrite(fd, os.urandom(8 * MiB), 16 * MiB)
    os.fsync(fd)
    os.close(fd)
    target = tmp_path / "target.img"
    configure(deployment, disk.device, target)
    deployment.start_all()
    status = wait_first_tag(deployment)
    assert status["disks"][0]["bytes_read"] >= size, "initial sync reads the whole disk"
    assert status["disks"][0]["bytes_shipped"] < 9 * MiB, "zero blocks must not travel"
    final_tag_and_compare(deployment, disk.device, target, size)

    # Change 1 MiB while the agent is down; on restart only that travels.
    deployment.kill("agent")
    fd = os.open(disk.device, os.O_WRONLY)
    os.pwrite(fd, os.urandom(MiB), 64 * MiB)
    os.fsync(fd)
    os.close(fd)
    deployment.start("agent")
    status = wait_first_tag(deployment)
    assert status["disks"][0]["gen"] == 2
    assert status["disks"][0]["bytes_shipped"] <= 2 * MiB, "resync sends only differing blocks"
    final_tag_and_compare(deployment, disk.device, target, size)


def memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (the peak) of a process, in KiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {name: int(fields[name].split()[0]) for name in ("VmRSS", "VmHWM")}


def test_a_sync_ships_larger_batches_and_hands_their_memory_back(deployment, loopdisk, tmp_path):
    # Initial sync: 96 MiB of data in batches of sync_batch_bytes (16 MiB), each a segment
    # and a group at the master target; then replication goes back to batch_bytes (4 MiB)
    # and the three daemons give the memory the sync took back.
    size = 160 * MiB
    disk = loopdisk(size, fs=False)
    fd = os.open(disk.device, os.O_WRONLY)
    os.pwrite(fd, os.urandom(96 * MiB), 32 * MiB)
    os.fsync(fd)
    os.close(fd)
    target = tmp_path / "target.img"
    configure(deployment, disk.device, target)
    deployment.start_all()
    status = wait_first_tag(deployment)
    first = status["disks"][0]["last_tag"]
    assert first["seq"] <= 96 // 16 + 1, f"the sync took {first['seq']} batches, not 6-7"
    back = {"agent": 0.55, "process-server": 0.6, "master-target": 0.5}
    pids = {k: deployment.procs[k].pid for k in back}
    # The process server and master target keep their heap in huge pages (ferry.memory).
    for name, pid in pids.items():
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert (b"GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in environ) == (name != "agent"), name
    # Measured: the agent from 85 to 36 MiB (52 while it kept the sync's read buffer), the
    # process server from 290 to 120 (250 to 200 without handing the heap back), the
    # master target from 170 to 55 (120 without).
    wait_for(
        lambda: all(
            memory_kib(pid)["VmRSS"] < back[name] * memory_kib(pid)["VmHWM"]
            for name, pid in pids.items()
        ),
        30,
        "the daemons to give the sync's memory back",
    )
    # A burst of 24 MiB once replicating: batches of at most 4 MiB again.
    before = deployment.agent_status()["disks"][0]["last_tag"]["seq"]
    fd = os.open(disk.device, os.O_WRONLY)
    os.pwrite(fd, os.urandom(24 * MiB), 136 * MiB)
    os.fsync(fd)
    os.close(fd)
    tag = deployment.tag("crash", timeout=120)
    deployment.wait_applied(tag["id"], timeout=120)
    batches = deployment.agent_status()["disks"][0]["last_tag"]["seq"] - before
    assert batches >= 24 // 4, f"24 MiB went in {batches} batches once replicating"
    final_tag_and_compare(deployment, disk.device, target, size)


@pytest.mark.parametrize("victim", ["agent", "process-server", "master-target"])
def test_sigkill_mid_stream_converges(deployment, loopdisk, tmp_path, victim):
    size = 192 * MiB
    disk = loopdisk(size, fs=False)
    fd = os.open(disk.device, os.O_WRONLY)
    for i in range(0, size, 4 * MiB):
        if (i // (4 * MiB)) % 3 == 0:
            os.pwrite(fd, os.urandom(4 * MiB), i)
    os.fsync(fd)
    os.close(fd)
    target = tmp_path / "target.img"
    # Small batches and a slow uploader keep the stream busy when the kill lands.
    configure(deployment, disk.device, target, batch_bytes=MiB, sync_batch_bytes=MiB)
    writer = RawWriter(disk.device, size, 3 * MiB)
    writer.start()
    deployment.start_all()
    deadline = time.monotonic() + 120
    shipped = 0
    while time.monotonic() < deadline:  # kill once data is flowing
        status = deployment.agent_status() or {}
        shipped = (status.get("disks") or [{}])[0].get("bytes_shipped", 0)
        if shipped > 8 * MiB:
            break
        time.sleep(0.05)
    assert shipped > 8 * MiB, f"only {shipped} bytes flowed before the kill"
    deployment.kill(victim, signal.SIGKILL)
    writes = writer.writes
    wait_for(lambda: writer.writes >= writes + 50, 60, f"writes while the {victim} is down")
    deployment.start(victim)
    wait_first_tag(deployment)
    resumed, writes = applied(deployment), writer.writes
    wait_for(
        lambda: applied(deployment) > resumed and writer.writes > writes,
        120,
        f"a tag applied after the {victim} came back, under writes",
    )
    writer.stop.set()
    writer.join()
    final_tag_and_compare(deployment, disk.device, target, size)
    resyncs = deployment.agent_status()["disks"][0]["resyncs"]
    if victim != "agent":
        assert resyncs == 1, "killing a server must not lose an acknowledged batch (no resync)"


def test_app_consistent_tag_runs_hooks_and_freezes(deployment, loopdisk, tmp_path):
    size = 128 * MiB
    disk = loopdisk(size, fs=True)
    target = tmp_path / "target.img"
    marks = tmp_path / "hooks.log"
    configure(
        deployment,
        disk.device,
        target,
        pre_hook=f"echo pre $(date +%s.%N) >> {marks}",
        post_hook=f"echo post $(date +%s.%N) >> {marks}",
    )
    writer = FileWriter(disk.mountpoint, MiB)
    writer.start()
    deployment.start_all()
    wait_first_tag(deployment)
    tag = deployment.tag("app")
    writer.stop.set()
    writer.join()
    assert tag["kind"] == "app" and tag["frozen"] == [str(disk.mountpoint)]
    lines = marks.read_text().split()
    assert lines[0] == "pre" and lines[2] == "post", lines
    assert float(lines[1]) <= tag["t0_wall"] <= float(lines[3]), "the tag lies between the hooks"
    deployment.wait_applied(tag["id"])
    # A frozen tag has a clean journal: the target passes e2fsck -fn as it is.
    deployment.stop("master-target")
    result = subprocess.run(["e2fsck", "-fn", str(target)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert deployment.agent_status()["frozen_passes"] >= 1


def test_lost_trace_events_lead_to_resync(deployment, loopdisk, tmp_path):
    size = 64 * MiB
    disk = loopdisk(size, fs=False)
    target = tmp_path / "target.img"
    configure(deployment, disk.device, target, trace_buffer_kb=4)
    deployment.start_all()
    wait_first_tag(deployment)
    # Stall the agent: its trace reader stops, the tiny ring buffer overflows.
    agent = deployment.procs["agent"]
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        fd = os.open(disk.device, os.O_WRONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, 4096)
        for i in range(4000):
            buf[:8] = i.to_bytes(8, "little")
            os.pwritev(fd, [buf], (i * 7919 % (size // 4096)) * 4096)
        os.close(fd)
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        d = deployment.agent_status()["disks"][0]
        if d["resyncs"] >= 2 and d["phase"] == "replicating":
            break
        time.sleep(0.2)
    assert d["resyncs"] >= 2 and d["gen"] >= 2, d
    final_tag_and_compare(deployment, disk.device, target, size)


def test_agent_memory_stays_bounded_while_the_process_server_is_down(
    deployment, loopdisk, tmp_path
):
    size = 512 * MiB
    disk = loopdisk(size, fs=False)
    target = tmp_path / "target.img"
    configure(deployment, disk.device, target)
    deployment.start_all()
    wait_first_tag(deployment)
    deployment.kill("process-server")
    writer = RawWriter(disk.device, size, 40 * MiB)
    writer.start()
    peak = 0
    end = time.monotonic() + 12
    while time.monotonic() < end:
        status = Path(f"/proc/{deployment.procs['agent'].pid}/status").read_text()
        rss = int(
            next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))
        )
        peak = max(peak, rss * 1024)
        time.sleep(0.2)
    writer.stop.set()
    writer.join()
    d = deployment.agent_status()["disks"][0]
    # Beyond what the window holds (8 batches of at most 4 MiB, filled faster or slower as
    # passes end clean or collide), the writes wait in the dirty map, not in memory.
    assert d["bytes_to_go"] > 32 * MiB, "the dirty map absorbed the writes"
    assert peak < 200 * MiB, f"agent resident memory peaked at {peak / MiB:.0f} MiB"
    deployment.start("process-server")
    final_tag_and_compare(deployment, disk.device, target, size)
