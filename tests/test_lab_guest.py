"""Ferry on a real server: the lab guest deployed, protected and cut over with the playbooks.

The agent runs inside the Debian 12 guest under systemd (installed from a
wheelhouse: the guest has no package index); storage, the configuration
server, the process server and the master target run on this machine
(``tests/support/lab.py``, ``protected_lab``; the playbooks run with
Mitogen's strategy, docs/lab.md). The scenarios share one deployment on the
session's guest, in file order: the state after ``site.yml`` and
``protect.yml`` (asserted with pytest-ansible's modules on the hosts, not by
reading playbook output), a seeded initial sync of both whole disks, the RPO
under a writer in the guest, an orderly reboot under that writer, and the
cutover through ``playbooks/cutover.yml`` under the writer: both disks at
one final tag, adapted, and boot-checked with the workload's marker.

``make lab`` (``python -m lab test``, ``FERRY_LAB_LONG=1``) also protects
unseeded, measures the RPO longer, crashes the guest under the writer, and
first cuts over a source made unbootable (not committed, then resumed).
``FERRY_LAB_UNBOOTABLE=1`` adds that unbootable cutover to a seeded run;
``FERRY_LAB_CUTOVER=0`` ends with a final tag by the agent's command instead
of the cutover, and compares both targets with their disks byte for byte.
Each figure is recorded with the image's figures (``python -m lab report``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import time
from pathlib import Path

import pytest
from support import wait_for
from support.lab import (
    GUEST_AGENT_STATE,
    LAB_DISKS,
    LONG,
    LabDeployment,
    protected_lab,
)

from lab.image import BOOT_OFFSET, BOOT_SIZE

pytestmark = [pytest.mark.qemu]

# make lab (LONG): an unseeded first sync (every used block of both disks through the
# guest's emulated CPU), a longer RPO window and the cutover through the playbook.
RPO_WINDOW = 180 if LONG else 30
"""Seconds the RPO is sampled under the writer."""
CATCH_UP = 900
"""Seconds a resync after a reboot may take (it reads whole disks under TCG)."""
UNIT = "ferry-agent.service"
WRITER = r"""
mkdir -p /srv/data/live /var/lib/lab-writer
i=0
while :; do
  dd if=/dev/urandom of=/srv/data/live/f$((i % 40)) bs=64k count=1 conv=fsync status=none
  echo "$i $(date +%s.%N)" >> /var/lib/lab-writer/journal
  i=$((i + 1))
  sleep 0.2
done
"""
"""Rewrites files on the data disk's XFS and appends to a journal on the root ext4."""


@pytest.fixture(scope="module")
def lab(lab_machine, tmp_path_factory):
    base = tmp_path_factory.mktemp("lab-ferry")
    with protected_lab(lab_machine, base, seed=not LONG) as deployment:
        yield deployment


@pytest.fixture
def ansible_adhoc(ansible_adhoc, lab):
    """pytest-ansible's host manager on the lab inventory (the guest is lab01)."""

    def hosts(**kwargs):
        inventory = [a for a in lab.inventory_args() if a != "-i"]
        return ansible_adhoc(**{"inventory": inventory, "host_pattern": "lab01", **kwargs})

    return hosts


def only(result) -> dict:
    """The one host's answer of a pytest-ansible module call."""
    (answer,) = result.values()
    assert not answer.get("failed") and not answer.get("unreachable"), answer
    return answer


class Writer:
    """The writer in the guest: a transient systemd unit (a crash or reboot ends it)."""

    def __init__(self, lab: LabDeployment) -> None:
        self.machine = lab.machine

    def start(self) -> None:
        """Start the writer unless it runs (a crash or a reboot ends it, a cutover does not)."""
        # The script as an argument: a transient unit's stdin is not this SSH session's.
        self.machine.ssh(
            "systemctl is-active --quiet lab-writer || "
            f"systemd-run --quiet --collect --unit=lab-writer /bin/sh -c {shlex.quote(WRITER)}"
        )

    def stop(self) -> None:
        self.machine.ssh("systemctl stop lab-writer", check=False)

    def writes(self) -> int:
        out = self.machine.ssh("wc -l < /var/lib/lab-writer/journal", check=False).stdout
        return int(out.strip() or 0)


@pytest.fixture
def writer(lab):
    w = Writer(lab)
    w.start()
    try:
        yield w
    finally:
        w.stop()


def tags(lab: LabDeployment) -> dict[str, str]:
    """Each disk's last tag durable on the master target."""
    return {disk: (lab.cursor(disk).get("last_tag") or {}).get("id", "") for disk in LAB_DISKS}


def caught_up(lab: LabDeployment, since: dict[str, str]):
    """The agent's status once every disk replicates and has a tag newer than ``since``."""
    status = lab.status()
    phases = {d["disk"]: d["phase"] for d in status["disks"]}
    now = tags(lab)
    done = all(phases.get(d) == "replicating" and now[d] and now[d] != since[d] for d in LAB_DISKS)
    return status if done else None


def agent_after_boot(lab: LabDeployment) -> None:
    """The agent came up at boot under systemd, before the filesystems it tracks."""
    wait_for(
        lambda: (
            lab.machine.ssh(f"systemctl is-active {UNIT}", check=False).stdout.strip() == "active"
        ),
        120,
        "the agent to be active after the boot",
        interval=2,
    )
    order = lab.machine.ssh(
        f"systemctl show -p ActiveEnterTimestampMonotonic --value {UNIT} srv-data.mount"
    ).stdout.split()
    assert int(order[0]) <= int(order[1]), "the agent started after /srv/data was mounted"


def per_disk(status: dict, key: str) -> dict[str, int]:
    return {d["disk"]: d[key] for d in status["disks"]}


def test_site_deploys_the_agent_into_the_guest_under_systemd_hardened(lab, ansible_module):
    facts = only(ansible_module.setup(filter="ansible_service_mgr"))["ansible_facts"]
    assert facts["ansible_service_mgr"] == "systemd"
    unit = only(ansible_module.systemd_service(name=UNIT))["status"]
    assert (unit["ActiveState"], unit["UnitFileState"]) == ("active", "enabled")
    assert unit["FragmentPath"] == f"/etc/systemd/system/{UNIT}"
    # Hardened as on every host: no new privileges, a read-only system, and
    # only the capabilities tracing, freezing and raw reads need.
    assert unit["NoNewPrivileges"] == "yes" and unit["ProtectSystem"] == "strict"
    caps = set(unit["CapabilityBoundingSet"].split())
    assert caps == {"cap_dac_override", "cap_dac_read_search", "cap_sys_admin"}
    for path, mode in (
        (f"/etc/systemd/system/{UNIT}", "0644"),
        ("/etc/ferry/agent.toml", "0640"),
        ("/etc/ferry/pki/agent-lab01.key", "0600"),
        ("/etc/ferry/pki/ca.pem", "0644"),
    ):
        stat = only(ansible_module.stat(path=path))["stat"]
        assert stat["exists"] and (stat["mode"], stat["pw_name"]) == (mode, "root"), path


def test_the_agent_is_installed_from_the_wheelhouse_alone(lab, ansible_module):
    manifest = (lab.wheelhouse / "wheelhouse.sha256").read_text().strip()
    stamp = only(ansible_module.slurp(src="/opt/ferry/venv/.ferry-source.agent.sha256"))
    assert base64.b64decode(stamp["content"]).decode().strip() == manifest
    version = only(ansible_module.command(argv=["/opt/ferry/venv/bin/ferry", "--help"]))
    assert "agent" in version["stdout"]
    # No checkout in the guest: the code is the wheel's.
    assert not only(ansible_module.stat(path="/opt/ferry/src"))["stat"]["exists"]


def test_the_daemons_on_this_machine_run(lab, ansible_adhoc):
    for host, name in (("ps01", "process-server"), ("mt01", "master-target"),
                       ("config01", "config-server"), ("storage01", "azurite")):  # fmt: skip
        pidfile = lab.ferry / "run" / f"{name}.pid"
        read = only(ansible_adhoc(host_pattern=host)[host].slurp(src=str(pidfile)))
        pid = json.loads(base64.b64decode(read["content"]))["pid"]
        assert Path(f"/proc/{pid}").exists(), name


def test_protect_names_whole_disks_by_identity_and_syncs_both(lab, ansible_module):
    record = only(ansible_module.slurp(src=f"{GUEST_AGENT_STATE}/protected.json"))
    protected = json.loads(base64.b64decode(record["content"]))
    assert {d["id"]: d["device"] for d in protected["disks"]} == LAB_DISKS
    status = lab.status()
    assert status["tracker"] == "tracefs", status["tracker_description"]
    for disk in status["disks"]:
        assert disk["phase"] == "replicating", disk
        assert disk["identity"], disk  # what a reboot that renames the disks is checked against
        assert disk["device_path"].startswith("/dev/vd"), disk
    assert all(tags(lab).values())
    shipped, sizes = per_disk(status, "bytes_shipped"), per_disk(status, "size")
    if not LONG:  # seeded: a digest comparison, only what the guest changed since its image travels
        assert all(shipped[d] < sizes[d] // 8 for d in LAB_DISKS), (shipped, sizes)
    lab.machine.image.record(
        initial_sync_seeded=not LONG,
        initial_sync_s=round(lab.timings["protect.yml"], 1),
        initial_sync_bytes=sum(per_disk(status, "bytes_shipped").values()),
        initial_sync_read_bytes=sum(per_disk(status, "bytes_read").values()),
        site_s=round(lab.timings["site.yml"], 1),
        wheelhouse_s=round(lab.timings["wheelhouse_s"], 1),
    )


def test_rpo_under_a_writer_in_the_guest(lab, writer):
    offset = clock_offset(lab)
    first = tags(lab)
    samples: list[float] = []
    seen: set[str] = set()
    deadline = time.monotonic() + RPO_WINDOW
    while time.monotonic() < deadline:
        for disk in LAB_DISKS:
            tag = lab.cursor(disk).get("last_tag") or {}
            if tag.get("t0_wall"):
                samples.append(time.time() + offset - tag["t0_wall"])
                seen.add(tag["id"])
        time.sleep(3)
    assert writer.writes() > 10
    assert len(seen - set(first.values())) >= 2, "no new recovery point under the writer"
    lab.machine.image.record(
        rpo_median_s=round(statistics.median(samples), 1),
        rpo_max_s=round(max(samples), 1),
        rpo_window_s=RPO_WINDOW,
    )


def clock_offset(lab: LabDeployment) -> float:
    """Guest wall clock minus this machine's (the guest's clock drifts under TCG)."""
    before = time.time()
    guest = float(lab.machine.ssh("date +%s.%N").stdout)
    return guest - (before + time.time()) / 2


@pytest.mark.skipif(not LONG, reason="make lab: about 3 min (a crash resyncs by digest under TCG)")
def test_a_crash_under_a_writer_resyncs_only_the_differences(lab, writer):
    lab.machine.ssh("echo synced > /srv/data/crash-proof && sync")
    before = tags(lab)
    started = time.monotonic()
    lab.machine.crash()
    agent_after_boot(lab)
    writer.start()  # the crash ended it; it writes on while the agent resyncs
    status = wait_for(lambda: caught_up(lab, before), CATCH_UP, "a resync after the crash", 5)
    took = time.monotonic() - started
    starts = {d["disk"]: d["start"] for d in status["disks"]}
    # A crash leaves no handover: tracking was interrupted and each disk is resynced...
    assert all(reason != "resumed" for reason in starts.values()), starts
    # ...by comparing digests with the target: only the differences travel.
    shipped, sizes = per_disk(status, "bytes_shipped"), per_disk(status, "size")
    assert all(shipped[d] < sizes[d] // 8 for d in LAB_DISKS), (shipped, sizes)
    # The guest itself came back whole: XFS replayed its log, synced data is there.
    assert "Starting recovery" in lab.machine.ssh("dmesg | grep XFS").stdout
    assert lab.machine.ssh("cat /srv/data/crash-proof").stdout.strip() == "synced"
    lab.machine.image.record(
        crash_resync_s=round(took, 1),
        crash_resync_bytes=sum(shipped.values()),
        crash_resync_read_bytes=sum(per_disk(status, "bytes_read").values()),
        crash_start_reasons=starts,
    )


def test_an_orderly_reboot_under_a_writer_keeps_the_dirty_map(lab, writer):
    lab.machine.ssh("echo kept > /srv/data/reboot-proof && sync")
    before = tags(lab)
    started = time.monotonic()
    lab.machine.reboot()
    agent_after_boot(lab)
    writer.start()
    status = wait_for(lambda: caught_up(lab, before), CATCH_UP, "replication after the reboot", 5)
    took = time.monotonic() - started
    starts = {d["disk"]: d["start"] for d in status["disks"]}
    # The data disk was unmounted before the agent stopped: its dirty map was
    # handed over and it resumes without reading the disk again.
    assert starts["lab01-data"] == "resumed", starts
    read = per_disk(status, "bytes_read")
    assert read["lab01-data"] < per_disk(status, "size")["lab01-data"] // 8, read
    assert lab.machine.ssh("cat /srv/data/reboot-proof").stdout.strip() == "kept"
    lab.machine.image.record(
        reboot_resync_s=round(took, 1),
        reboot_resync_bytes=sum(per_disk(status, "bytes_shipped").values()),
        reboot_resync_read_bytes=sum(read.values()),
        reboot_start_reasons=starts,
    )


# -- the cutover through the playbook (#16) -----------------------------------------------------
CUTOVER = os.environ.get("FERRY_LAB_CUTOVER") != "0"
"""Cut the guest over through the playbook (the default), instead of the final tag by the
agent's command (FERRY_LAB_CUTOVER=0)."""
cutover_tests = pytest.mark.skipif(not CUTOVER, reason="FERRY_LAB_CUTOVER=0: the final tag instead")


def workload_marker(lab: LabDeployment) -> str:
    """A file the guest's workload writes (under the writer) before the final tag: its check."""
    text = f"written by the workload before the final tag {os.urandom(8).hex()}\n"
    lab.machine.ssh("cat > /srv/data/ferry-marker && sync -f /srv/data/ferry-marker", input=text)
    return f"/srv/data/ferry-marker:{hashlib.sha256(text.encode()).hexdigest()}"


def cutover(
    lab: LabDeployment, marker: str, *extra: str
) -> tuple[subprocess.CompletedProcess, dict]:
    """``cutover.yml`` of the guest; its result and the master target's manifest."""
    markers = json.dumps({"cutover_boot_check_markers": [marker]})
    result = lab.playbook("cutover.yml", "-e", "machine=lab01", "-e", markers, *extra, timeout=3600)
    path = lab.ferry / "cutover" / "lab01" / "manifest.json"  # cutover_output_dir
    if not path.exists():  # the playbook stopped before the master target's part: say why
        raise AssertionError(" ".join(result.stdout.split())[-4000:])
    return result, json.loads(path.read_text())


UNBOOTABLE = LONG or os.environ.get("FERRY_LAB_UNBOOTABLE") == "1"
"""First cut over a source made unbootable (``make lab``; FERRY_LAB_UNBOOTABLE=1 in a seeded run)."""


@cutover_tests
@pytest.mark.skipif(not UNBOOTABLE, reason="make lab: a second cutover, about 5 min under TCG")
def test_a_cutover_of_a_source_that_cannot_boot_is_not_committed_and_replication_resumes(
    lab, writer
):
    # Unbootable as with any missing device, only sooner (5 s, not systemd's default 90 s).
    broken = (
        "UUID=0badc0de-0000-4000-8000-000000000000 /srv/gone ext4 "
        "defaults,x-systemd.device-timeout=5s 0 2\n"
    )
    lab.machine.ssh(
        "cp /etc/fstab /etc/fstab.ferry-test && cat >> /etc/fstab && sync", input=broken
    )
    try:
        result, manifest = cutover(lab, workload_marker(lab))
        said = " ".join(result.stdout.split())
        assert result.returncode != 0, said[-3000:]
        assert manifest["verified"] and not manifest["complete"], manifest.get("reason")
        assert manifest["reason"] == "boot check failed: the guest stopped in emergency mode"
        assert f"lab01 is not cut over: {manifest['reason']}" in said
        final = manifest["final_tag"]["id"]
        assert {lab.cursor(d)["fenced"]["tag"]["id"] for d in LAB_DISKS} == {final}
    finally:
        lab.machine.ssh("mv /etc/fstab.ferry-test /etc/fstab && sync", check=False)
    # The operator resumes replication (the fstab is fixed meanwhile, and replicated).
    said = " ".join(lab.ok("cutover.yml", "-e", "machine=lab01", "-e", "cutover_action=resume")
                    .stdout.split())  # fmt: skip
    assert "replication resumed" in said
    writer.start()  # the fence stopped nothing in the guest: it still writes
    wait_for(lambda: all(t and t != final for t in tags(lab).values()), CATCH_UP,
             "a tag after the uncommitted cutover's final tag on both disks", 5)  # fmt: skip
    assert all(lab.cursor(d)["fenced"] is None for d in LAB_DISKS)


@cutover_tests
def test_the_cutover_through_the_playbook_boots_the_adapted_disks_with_the_marker(lab, writer):
    marker = workload_marker(lab)
    result, manifest = cutover(lab, marker)
    said = " ".join(result.stdout.split())
    assert result.returncode == 0, said[-4000:]
    # Both disks at one final tag, each an Azure-ready VHD equal to its source at it.
    final = manifest["final_tag"]["id"]
    assert set(tags(lab).values()) == {final}
    assert manifest["verified"] and manifest["complete"], manifest.get("reason")
    for disk in manifest["disks"]:
        assert disk["expected_sha256"] == disk["data_sha256"], disk
        assert disk["vhd_data_size"] % (1 << 20) == 0 and disk["checks"]["qemu"], disk
    # Adapted on the cut-over disks (never on the source): the agent and its unit are gone.
    changes = manifest["adaptation"]["changes"]
    assert all(c["done"] for c in changes), changes
    assert "agent" in {c["step"] for c in changes}, changes
    assert "adapted_s" in manifest["timings"], manifest["timings"]
    check = manifest["boot_check"]
    assert check["passed"] and check["multi_user"], check
    path, digest = marker.split(":")
    assert {"path": path, "expected": digest, "found": digest, "ok": True} in check["markers"]
    assert all(m["ok"] for m in check["markers"]), check["markers"]
    # The source was thawed (the writer went on) and its agent is fenced for good.
    before = writer.writes()
    wait_for(lambda: writer.writes() > before, 120, "the writer to go on after the thaw", 2)
    state = lab.machine.ssh(f"systemctl is-enabled {UNIT}", check=False).stdout.strip()
    assert state != "enabled", state
    timings = manifest["timings"]
    lab.machine.image.record(
        cutover_timings=timings,  # disks_ready_s, adapted_s, boot_checked_s
        cutover_boot_s=check.get("boot_s"),
    )


@pytest.mark.skipif(CUTOVER, reason="the guest is cut over through the playbook instead")
def test_a_final_tag_lands_both_disks_on_it_equal_to_their_sources(lab):
    # Quiesce the sources as a cutover does: nothing writes the data disk (its volume
    # group deactivated) nor /boot (unmounted); the final app tag freezes / itself.
    lab.machine.ssh("umount /boot && umount /srv/data && vgchange -q -an data")
    try:
        tag = json.loads(lab.agent("tag", "--final", "--kind", "app", "--json", timeout=600))
        assert tag["final"] is True
        wait_for(lambda: set(tags(lab).values()) == {tag["id"]}, 300, "both disks on it", 2)
        data = lab.machine.ssh(f"sha256sum {LAB_DISKS['lab01-data']}", timeout=900).stdout
        boot = lab.machine.ssh(
            f"head -c {BOOT_OFFSET} {LAB_DISKS['lab01-sys']} | sha256sum;"
            f"sha256sum {LAB_DISKS['lab01-sys']}-part1"
        ).stdout.split()
    finally:
        lab.machine.ssh("vgchange -q -ay data; mount /srv/data; mount /boot", check=False)
    assert file_digest(lab.target("lab01-data")) == data.split()[0]
    system = lab.target("lab01-sys")
    assert file_digest(system, 0, BOOT_OFFSET) == boot[0]  # MBR, GRUB's core image
    assert file_digest(system, BOOT_OFFSET, BOOT_SIZE) == boot[2]  # /boot
    # / was live until the tag froze it: its copy is a clean ext4 holding the writer's journal.
    start, size = root_partition(system)
    with losetup(system, start, size) as device:
        fsck = subprocess.run(["e2fsck", "-fn", device], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        listing = subprocess.run(["debugfs", "-R", "ls -l /var/lib/lab-writer", device],
                                 capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert "journal" in listing


def root_partition(image: Path) -> tuple[int, int]:
    """Byte offset and size of partition 2 in a disk image (sfdisk reads the table)."""
    table = json.loads(subprocess.run(["sfdisk", "--json", str(image)], capture_output=True,
                                      text=True, check=True).stdout)["partitiontable"]  # fmt: skip
    part = table["partitions"][1]
    return part["start"] * 512, part["size"] * 512


@contextlib.contextmanager
def losetup(image: Path, offset: int, size: int):
    device = subprocess.run(["losetup", "--find", "--show", "--read-only", "-o", str(offset),
                             "--sizelimit", str(size), str(image)],
                            capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def file_digest(path: Path, offset: int = 0, length: int | None = None) -> str:
    h = hashlib.sha256()
    left = length if length is not None else path.stat().st_size - offset
    with open(path, "rb") as f:
        f.seek(offset)
        while left > 0 and (chunk := f.read(min(1 << 20, left))):
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()
