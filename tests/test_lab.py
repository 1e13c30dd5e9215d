"""The lab guest is the server Ferry migrates: a real boot, real disks, real systemd.

Each test asserts something a scenario built on the lab relies on. They share
one booted guest (the session's ``lab_machine``); the reboot and crash tests
come last and leave it up.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from support.lab import LONG

pytestmark = [pytest.mark.qemu, pytest.mark.root]

ROOT = Path(__file__).resolve().parent.parent
BY_ID = "/dev/disk/by-id"


def mounts(machine) -> dict[str, dict]:
    out = machine.ssh("findmnt --list --json --real -o TARGET,SOURCE,FSTYPE").stdout
    return {fs["target"]: fs for fs in json.loads(out)["filesystems"]}


def resolve(machine, path: str) -> str:
    return machine.ssh(f"readlink -f {path}").stdout.strip()


def test_systemd_is_pid_1_and_the_system_is_running(lab_machine):
    assert lab_machine.ssh("cat /proc/1/comm").stdout.strip() == "systemd"
    state = lab_machine.ssh("systemctl is-system-running", check=False).stdout.strip()
    failed = lab_machine.ssh("systemctl --failed --plain --no-legend", check=False).stdout
    assert state == "running", failed


def test_both_disks_are_seen_by_serial(lab_machine):
    names = set(lab_machine.ssh(f"ls {BY_ID}").stdout.split())
    assert {"virtio-ferry-sys", "virtio-ferry-sys-part1", "virtio-ferry-sys-part2"} <= names
    assert "virtio-ferry-data" in names
    assert resolve(lab_machine, f"{BY_ID}/virtio-ferry-sys") != resolve(
        lab_machine, f"{BY_ID}/virtio-ferry-data"
    )


def test_boot_and_root_are_ext4_partitions_of_the_system_disk(lab_machine):
    found = mounts(lab_machine)
    for target, part in (("/boot", "part1"), ("/", "part2")):
        assert found[target]["fstype"] == "ext4"
        assert resolve(lab_machine, found[target]["source"]) == resolve(
            lab_machine, f"{BY_ID}/virtio-ferry-sys-{part}"
        )
    fstab = lab_machine.ssh("findmnt --fstab --noheadings -o SOURCE").stdout.split()
    assert fstab and all(source.startswith("UUID=") for source in fstab), fstab


def test_srv_data_is_xfs_on_an_lvm_volume_of_the_data_disk(lab_machine):
    data = mounts(lab_machine)["/srv/data"]
    assert data["fstype"] == "xfs"
    assert resolve(lab_machine, data["source"]) == resolve(lab_machine, "/dev/data/srv")
    pvs = lab_machine.ssh("pvs --noheadings -o pv_name,vg_name").stdout.split()
    assert [resolve(lab_machine, pvs[0]), pvs[1]] == [
        resolve(lab_machine, f"{BY_ID}/virtio-ferry-data"),
        "data",
    ]


def test_the_system_disk_carries_its_own_bootloader(lab_machine):
    # GRUB's boot code in the MBR, and its configuration booting this root by UUID: a copy
    # of the disk boots by itself (FERRY_LAB_BOOTLOADER=1 boots the lab through it too).
    mbr = lab_machine.ssh(f"head -c 512 {BY_ID}/virtio-ferry-sys | od -c").stdout
    assert "G   R   U   B" in mbr
    root = lab_machine.ssh("findmnt -n -o UUID /").stdout.strip()
    assert f"root=UUID={root}" in lab_machine.ssh("cat /boot/grub/grub.cfg").stdout


def test_guest_reaches_a_host_port_and_nothing_else(lab_machine):
    port = lab_machine.host_ports[0]
    with socket.create_server(("127.0.0.1", port)) as server:
        server.settimeout(60)
        threading.Thread(target=_echo_once, args=(server,), daemon=True).start()
        probe = (
            "import socket, sys; s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 5);"
            "s.sendall(b'ping'); print(s.recv(4).decode())"
        )
        answer = lab_machine.ssh(f'python3 -c "{probe}" ferry-host {port}').stdout.strip()
        assert answer == "PING"
        # restrict=on: QEMU's host address (the usual way out) leads nowhere.
        escaped = lab_machine.ssh(f'python3 -c "{probe}" 10.0.2.2 {port}', check=False)
        assert escaped.returncode != 0


def _echo_once(server: socket.socket) -> None:
    conn, _ = server.accept()
    with conn:
        conn.sendall(conn.recv(4).upper())


def test_copy_to_puts_files_in_the_guest(lab_machine, tmp_path):
    (tmp_path / "payload").mkdir()
    blob = os.urandom(300_000)
    (tmp_path / "payload" / "blob").write_bytes(blob)
    lab_machine.copy_to(tmp_path / "payload", "/root/")
    out = lab_machine.ssh("sha256sum /root/payload/blob && rm -r /root/payload").stdout
    assert out.split()[0] == hashlib.sha256(blob).hexdigest()


def test_the_inventory_reaches_the_guest_with_ansible(lab_machine):
    controller = ROOT / ".venv-controller" / "bin" / "ansible"
    result = subprocess.run(
        [str(controller), "lab01", "-i", str(lab_machine.inventory), "-o",
         "-m", "ansible.builtin.setup", "-a", "filter=ansible_service_mgr"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg")},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"ansible_service_mgr": "systemd"' in result.stdout


# make lab: in make test the guest reboots with Ferry on it (test_lab_guest.py).
only_long = pytest.mark.skipif(not LONG, reason="make lab: test_lab_guest.py reboots the guest")


@only_long
def test_a_reboot_keeps_the_machine_and_its_data(lab_machine):
    lab_machine.ssh("echo kept > /srv/data/reboot-proof && sync")
    pid, before = lab_machine.pid, lab_machine.boot_id()
    lab_machine.reboot()
    assert lab_machine.boot_id() != before
    assert lab_machine.pid == pid and lab_machine.running()
    assert lab_machine.ssh("cat /srv/data/reboot-proof").stdout.strip() == "kept"


@only_long
def test_a_crash_reset_comes_back_with_synced_data(lab_machine):
    lab_machine.ssh("echo synced > /srv/data/crash-proof && sync")
    before = lab_machine.boot_id()
    lab_machine.crash()
    assert lab_machine.boot_id() != before
    # No clean unmount happened: XFS had to replay its log when /srv/data was mounted again.
    assert "Starting recovery" in lab_machine.ssh("dmesg | grep XFS").stdout
    assert lab_machine.ssh("cat /srv/data/crash-proof").stdout.strip() == "synced"
    assert mounts(lab_machine)["/srv/data"]["fstype"] == "xfs"
