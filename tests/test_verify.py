"""RPO from what the target holds, scheduled app-consistent points, and online verify.

The three daemons in server mode under the real configuration server (over
Azurite), the source a loop device with a mounted ext4 tracked through
tracefs, the target an image file the master target applies to:

* a scheduled app-consistent point appears in the recovery points, marked
  ``app``, without anyone asking for a tag;
* while the master target's applying is held, the RPO the status shows grows
  (the process server still holds fresh points) and the monitoring timer
  raises an ``rpo`` alert; it clears once the target catches up;
* garbage written into known blocks of the target is found by a verify
  exactly, no more and no less, while the source is being written, and
  nothing changes; a verify with repair
  ships exactly those blocks again, after which the target equals the source.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import uuid
from typing import Any

import pytest
from support import ROOT
from support.config_server import serve_config
from support.daemons import Fleet, write_files

from devkit.embedded import digest
from ferrycli.main import _runs_text
from mastertarget import applylock

pytestmark = [pytest.mark.root, pytest.mark.tracefs, pytest.mark.slow]

MiB = 1 << 20
BLOCK = 4096
SIZE = 96 * MiB  # two verify ranges of 64 MiB and 32 MiB
THRESHOLD = 12  # seconds of RPO that raise the alert (app-consistent points come every 2 s)


@pytest.fixture(scope="module")
def config_server(tmp_path_factory):
    yield from serve_config(tmp_path_factory)


@pytest.fixture
def fleet(config_server, tenant, tmp_path, certs):
    machine = "vf" + uuid.uuid4().hex[:6]
    made = Fleet(tmp_path, config_server.tenant(tenant), certs, machine)
    yield made
    made.close()


def disk_view(fleet: Fleet) -> dict[str, Any]:
    machines = fleet.operator.status()["machines"]
    return (machines[0]["disks"] or [{}])[0] if machines else {}


def open_alerts(fleet: Fleet, disk: str) -> list[dict[str, Any]]:
    alerts = fleet.operator.call("GET", "/alerts?open=true")["alerts"]
    return [a for a in alerts if a["kind"] == "rpo" and a["subject"] == disk]


def verified(fleet: Fleet, verify_id: str) -> dict[str, Any] | None:
    """The disk's verify report once verify ``verify_id`` is done, else None."""
    report = disk_view(fleet).get("verify") or {}
    return report if report.get("id") == verify_id and report.get("state") == "done" else None


def run_verify(fleet: Fleet, repair: bool = False) -> dict[str, Any]:
    answer = fleet.operator.call(
        "POST", f"/machines/{fleet.machine}/commands",
        {"command": "verify", "args": {"repair": repair}},
    )  # fmt: skip
    verify_id = answer["verify_id"]
    return fleet.wait(f"verify {verify_id}", lambda: verified(fleet, verify_id), timeout=240)


def ferry_cli(fleet: Fleet, *args: str) -> str:
    """``ferry *args`` as the tenant's operator; its standard output."""
    op = fleet.operator
    env = {**os.environ, "FERRY_SERVER": op.server.url, "FERRY_TOKEN": op.token,
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "ferrycli", *args], capture_output=True,
                            text=True, env=env, cwd=ROOT, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def file_blocks(path, count: int) -> list[int]:
    """The first ``count`` physical blocks (4 KiB) of a file on the ext4 (``filefrag``)."""
    out = subprocess.run(["filefrag", "-e", "-b4096", str(path)], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    blocks: list[int] = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(":")]
        if len(parts) >= 4 and parts[0].isdigit():
            first = int(parts[2].split("..")[0])
            last = int(parts[2].split("..")[1])
            blocks += range(first, last + 1)
    return blocks[:count]


def test_rpo_schedule_and_verify(fleet, loopdisk):
    source = loopdisk(SIZE, fs=True)
    write_files(source.mountpoint, 8, 1 * MiB, seed=7)
    fleet.register(source.device, SIZE)
    op, machine = fleet.operator, fleet.machine
    disk = f"{machine}-disk0"
    for kind in ("process-server", "master-target", "agent"):
        fleet.start(kind)
    job = op.protect(machine, rpo_threshold_s=THRESHOLD, app_consistent_interval_s=2)
    fleet.wait("protected", lambda: op.job(job["job_id"])["state"] == "protected", timeout=180)
    assert op.status()["machines"][0]["schedule"]["app_consistent_interval_s"] == 2

    # A scheduled app-consistent point: nobody asked for a tag, it is marked app and froze
    # the source's filesystem.
    def app_point():
        points = op.call("GET", f"/recovery-points?disk={disk}&limit=1000")["recovery_points"]
        return next((p for p in points if p["kind"] == "app"), None)

    point = fleet.wait("a scheduled app-consistent point", app_point, timeout=120)
    assert point["tag"]["frozen"] == [str(source.mountpoint)]

    # A verify of an intact target finds nothing and compares every block.
    clean = run_verify(fleet)
    assert clean["differing_blocks"] == 0 and clean["differing"] == []
    assert clean["compared_blocks"] + clean["unverified_blocks"] == SIZE // BLOCK
    assert clean["unverified_blocks"] == 0

    # Garbage in known blocks of the target (blocks of a file the source never rewrites),
    # written while replication runs.
    files = sorted((source.mountpoint / "data").iterdir())
    corrupt = sorted({*file_blocks(files[0], 2), *file_blocks(files[-1], 1)})
    target = fleet.base / "targets" / f"{disk}.img"
    fd = os.open(target, os.O_WRONLY)
    try:
        for block in corrupt:
            os.pwrite(fd, os.urandom(BLOCK), block * BLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)
    garbage = {b: _read_block(target, b) for b in corrupt}

    with writing(source.mountpoint / "busy"):  # the source is written while it is verified
        found = run_verify(fleet)
    blocks = {b for first, n in found["differing"] for b in range(first, first + n)}
    assert blocks == set(corrupt), (found, corrupt)  # no more and no less
    assert found["differing_blocks"] == len(corrupt)
    assert found["longest_hold_s"] > 0  # applying waited for one range's digest, not the disk's
    assert {b: _read_block(target, b) for b in corrupt} == garbage  # nothing changed
    # What an operator reads: the blocks in `ferry verify --show`, the verdict in `ferry status`.
    shown = ferry_cli(fleet, "verify", machine, "--show")
    assert _runs_text(found["differing"]) in shown and found["id"] in shown, shown
    status = ferry_cli(fleet, "status")
    assert "SHIPPED RPO" in status and f"done: {len(corrupt)} differ" in status, status

    # Repair ships exactly those blocks again: the target equals the source.
    mended = run_verify(fleet, repair=True)
    assert {b for first, n in mended["differing"] for b in range(first, first + n)} == set(corrupt)
    fleet.wait("the corrupt blocks repaired",
               lambda: all(_read_block(target, b) != garbage[b] for b in corrupt), timeout=240)  # fmt: skip

    # RPO is what the target holds: hold applying and it grows, while the process
    # server keeps getting fresh points; the monitoring timer alerts, then clears.
    lock = fleet.base / "master-target" / disk / "apply.lock"
    with applylock.hold(lock, disk, "test: hold applying", 60):
        view = fleet.wait("the RPO over its threshold", lambda: (v := disk_view(fleet))
                          and (v.get("rpo_s") or 0) > THRESHOLD and v, timeout=120)  # fmt: skip
        assert view["applied_rpo_s"] == view["rpo_s"]
        assert view["shipped_rpo_s"] < view["rpo_s"]
        assert view["health"] == "lagging"
        (alert,) = fleet.wait("an rpo alert", lambda: open_alerts(fleet, disk), timeout=60)
        assert "master target applied" in alert["message"]
    fleet.wait("the target caught up", lambda: (disk_view(fleet).get("rpo_s") or 99) < THRESHOLD,
               timeout=120)  # fmt: skip
    fleet.wait("the rpo alert cleared", lambda: not open_alerts(fleet, disk), timeout=60)

    source.unmount()
    fleet.wait("target equals source",
               lambda: digest(str(target), SIZE) == digest(source.device, SIZE), timeout=120)  # fmt: skip
    assert "Traceback" not in "".join(fleet.tail(k, 400) for k in fleet.procs)


@contextlib.contextmanager
def writing(directory):
    """A writer making and syncing small files in ``directory`` until the block ends."""
    directory.mkdir()
    stop = threading.Event()

    def run():
        n = 0
        while not stop.is_set():
            with open(directory / f"w{n % 50}", "wb") as f:
                f.write(os.urandom(64 * 1024))
                os.fsync(f.fileno())
            n += 1
            stop.wait(0.02)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _read_block(path, block: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(block * BLOCK)
        return f.read(BLOCK)
