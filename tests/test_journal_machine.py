"""Machine-wide recovery points under a dependent writer, on the real data path.

Agent, process server and master target run as processes (devkit.embedded)
against Azurite, on two real loop devices with a real tracefs instance.  The
writer issues record ``i`` only after record ``i-1`` completed, alternating
between the two disks: any moment of the machine holds records ``0..k-1``
and nothing else, so a point that holds a later record while missing an
earlier one (on the other disk) is not a moment of the machine.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support import wait_for

from devkit.embedded import Embedded
from mastertarget import recovery

pytestmark = [pytest.mark.root, pytest.mark.tracefs]

MiB = 1 << 20
SIZE = 32 * MiB
DISKS = ("web01-disk0", "web01-disk1")
SLOT = 4096


class RecordWriter(threading.Thread):
    """Record ``i`` goes to disk ``i % 2`` at slot ``i // 2``, each only after the previous one."""

    def __init__(self, devices: list[str]) -> None:
        super().__init__(name="record-writer", daemon=True)
        self.devices = devices
        self.stop = threading.Event()
        self.count = 0

    def run(self) -> None:
        fds = [os.open(d, os.O_WRONLY | os.O_DIRECT) for d in self.devices]
        buf = mmap.mmap(-1, SLOT)
        try:
            while not self.stop.is_set() and (self.count // 2 + 1) * SLOT < SIZE:
                i = self.count
                buf[:] = (f"REC {i:08d} ".encode() * (SLOT // 13 + 1))[:SLOT]
                os.pwritev(fds[i % 2], [buf], (i // 2) * SLOT)  # returns once complete
                self.count += 1
                self.stop.wait(0.002)
        finally:
            for fd in fds:
                os.close(fd)


def records_in(images: list[Path]) -> set[int]:
    """The record numbers found in the images' slots."""
    found = set()
    for disk, image in enumerate(images):
        data = image.read_bytes()[:SIZE]  # a VHD's footer follows
        for slot in range(len(data) // SLOT):
            head = data[slot * SLOT : slot * SLOT + 13]
            if head.startswith(b"REC "):
                i = int(head[4:12])
                assert (i % 2, i // 2) == (disk, slot), f"record {i} in the wrong place"
                found.add(i)
    return found


@pytest.fixture
def deployment(tmp_path, azurite, tenant):
    emb = Embedded(tmp_path / "ferry", tenant=tenant, machine="web01", azurite=azurite)
    emb.start_storage()
    yield emb
    emb.close()


def test_every_retained_machine_point_holds_a_gap_free_prefix_of_records(
    deployment, loopdisk, tmp_path
):
    sources = [loopdisk(SIZE, fs=False) for _ in DISKS]
    targets = {d: tmp_path / f"{d}.img" for d in DISKS}
    deployment.configure(
        [{"id": d, "device": s.device} for d, s in zip(DISKS, sources, strict=True)],
        {d: str(p) for d, p in targets.items()},
        agent={"freeze_after": 5.0},
    )
    deployment.start_all()
    state_dir = deployment.base / "master-target"
    wait_for(lambda: recovery.machine_points(state_dir, list(DISKS)), 300, "a first point")
    writer = RecordWriter([s.device for s in sources])
    writer.start()
    began = time.monotonic()
    while time.monotonic() - began < 6 and writer.is_alive():
        deployment.check_alive()
        time.sleep(0.5)
    # A point materialised while the writer and replication go on.
    recovery.materialise(state_dir, "web01", {d: str(p) for d, p in targets.items()},
                                tmp_path / "live", check=False)  # fmt: skip
    writer.stop.set()
    writer.join()
    assert writer.count > 100, writer.count
    tag = deployment.tag("crash", timeout=120)
    deployment.wait_applied(tag["id"], timeout=300)

    points = recovery.machine_points(state_dir, list(DISKS))
    assert len(points) >= 5, points
    assert points[-1]["id"] == tag["id"]
    prefixes = []
    for p in points:
        out = tmp_path / "points"
        made = recovery.materialise(
            state_dir, "web01", {d: str(t) for d, t in targets.items()}, out, tag=p["id"],
            check=False,
        )  # fmt: skip
        assert made["point"]["id"] == p["id"]
        found = records_in([out / f"{d}.img" for d in DISKS])
        k = len(found)
        assert found == set(range(k)), (
            f"point {p['id']}: records {sorted(set(range(max(found, default=0))) - found)[:5]} missing"
        )
        prefixes.append(k)
    assert prefixes == sorted(prefixes), f"points are not monotone: {prefixes}"
    assert prefixes[-1] == writer.count, "the newest point holds every record"
    assert len(set(prefixes)) >= 3, f"the points show different moments: {prefixes}"
    found = records_in([tmp_path / "live" / f"{d}.img" for d in DISKS])
    assert found == set(range(len(found))), "the point materialised during the writes has a gap"
    # By time: the newest point at or before a moment between two points.
    mid = points[len(points) // 2]
    made = recovery.materialise(state_dir, "web01", {d: str(t) for d, t in targets.items()},
                                tmp_path / "bytime", at=mid["t0_wall"] + 1e-3, check=False)  # fmt: skip
    assert made["point"]["id"] == mid["id"]
    # The test failover at that point, as the cutover role runs it: both VHDs at one tag.
    out = subprocess.run(
        [sys.executable, "-m", "mastertarget.cutover", "test-failover", "--state-dir",
         str(state_dir), "--machine", "web01", "--out-dir", str(tmp_path / "tf"),
         "--targets-json", json.dumps({d: str(t) for d, t in targets.items()}),
         "--point", mid["id"]],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    record = json.loads(out.stdout)
    assert record["point"]["id"] == mid["id"]
    assert {d["tag"]["id"] for d in record["disks"]} == {mid["id"]}
    found = records_in([Path(d["vhd"]) for d in record["disks"]])
    assert len(found) == prefixes[len(points) // 2] and found == set(range(len(found)))
