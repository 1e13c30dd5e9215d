"""Adaptation and boot check: the cut-over copy of the lab machine must boot and hold its data.

The ``qemu`` tests take the lab guest (tests/support/lab.py) as the source:
a writer runs in it, it writes a marker, and its disks are copied at one
instant (QMP ``stop`` drains and flushes them, as a crash-consistent tag
would have them).  The copies go through the cutover's own ``convert``:
fixed VHDs, adaptation, boot check, manifest.  One boot check per scenario.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import time
from pathlib import Path

import pytest
from support.lab import LONG

from mastertarget import adapt, bootcheck, cutover

MiB = 1 << 20


# -- pure parts: what the check concludes from the console, what adaptation writes ------


def console(*lines: str) -> dict:
    return {"outcome": "reported", "text": "\n".join(lines)}


def test_the_check_passes_only_on_multi_user_and_the_marker_digest():
    marker = bootcheck.parse_marker("/srv/data/m:" + "a" * 64)
    good = console(f"{bootcheck.BEGIN} multi-user=active", f"FERRY-MARKER /srv/data/m {'a' * 64}",
                   bootcheck.END)  # fmt: skip
    assert bootcheck.verdict(good, [marker])["passed"]
    # As CI saw it: the serial getty's prompt landed on the console just before the marker.
    shared = console(f"{bootcheck.BEGIN} multi-user=active",
                     f"ferry-lab login: FERRY-MARKER /srv/data/m {'a' * 64}", bootcheck.END)  # fmt: skip
    assert bootcheck.verdict(shared, [marker])["passed"]
    stale = console(f"{bootcheck.BEGIN} multi-user=active", f"FERRY-MARKER /srv/data/m {'b' * 64}")
    result = bootcheck.verdict(stale, [marker])
    assert not result["passed"] and "marker not as written" in result["reason"]
    gone = console(f"{bootcheck.BEGIN} multi-user=active", "FERRY-MARKER /srv/data/m missing")
    assert "missing" in bootcheck.verdict(gone, [marker])["reason"]
    degraded = console(
        f"{bootcheck.BEGIN} multi-user=inactive", f"FERRY-MARKER /srv/data/m {'a' * 64}"
    )
    assert bootcheck.verdict(degraded, [marker])["reason"] == (
        "the guest did not reach multi-user.target"
    )


def test_console_clues_are_plain_text_even_where_systemd_cut_a_colour_code():
    text = ("\x1b[K[\x1b[0;1;31m TIME \x1b[0m] Timed out waiting for device \x1b[0;1;…dc0de.\n"
            "Welcome\n[\x1b[0;1;38;5;185mDEPEND\x1b[0m] Dependency failed for /srv/gone.\n")  # fmt: skip
    assert bootcheck.console_clues(text) == [
        "[ TIME ] Timed out waiting for device …dc0de.",
        "[DEPEND] Dependency failed for /srv/gone.",
    ]


class DyingQemu:
    """A process that dies at once, as QEMU under a nested KVM that cannot set an MSR does."""

    def __init__(self, tmp_path: Path) -> None:
        self.console = tmp_path / "console.log"
        self.console.write_text("SeaBIOS (version 1.16)\n")
        self.proc = subprocess.Popen(
            ["sh", "-c", "echo 'error: failed to set MSR 0x10a to 0x69' >&2; exit 1"],
            stderr=subprocess.PIPE,
        )
        self.proc.wait()

    def text(self) -> str:
        return self.console.read_text()


def test_qemu_dying_under_a_kvm_probe_falls_back_to_tcg_and_fails_a_check_otherwise(tmp_path):
    probing = bootcheck.watch(DyingQemu(tmp_path), time.monotonic() + 60, time.monotonic() + 30)
    assert probing["outcome"] == "kvm-hangs" and "failed to set MSR" in probing["reason"]
    checking = bootcheck.watch(DyingQemu(tmp_path), time.monotonic() + 60)
    assert checking["outcome"] == "failed"
    assert checking["reason"].startswith("QEMU exited before the check reported: error: failed")


def test_a_marker_must_be_an_absolute_guest_path():
    assert bootcheck.parse_marker("/x") == {"path": "/x", "sha256": None}
    with pytest.raises(bootcheck.BootCheckError, match="absolute path"):
        bootcheck.parse_marker("x:abc")


def test_grub_defaults_gain_the_serial_console_once():
    text = 'GRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX="quiet"\nGRUB_DISABLE_LINUX_UUID=true\n'
    new, said = adapt._grub_defaults(text)
    assert 'GRUB_CMDLINE_LINUX="quiet console=ttyS0,115200 net.ifnames=0"' in new
    assert "GRUB_DISABLE_LINUX_UUID=false" in new and 'GRUB_TERMINAL="serial console"' in new
    assert len(said) == 4
    again, said = adapt._grub_defaults(new)
    assert again == new and said == []
    # The last assignment is the one the shell keeps (Debian's file has an empty one first).
    appended = new.replace("GRUB_DEFAULT=0", 'GRUB_CMDLINE_LINUX=""')
    assert adapt._grub_defaults(appended) == (appended, [])


def test_networkd_dhcp_on_eth0_is_recognised_and_static_is_not():
    assert adapt._networkd_dhcp_on_eth0("[Match]\nName=eth0\n\n[Network]\nDHCP=ipv4\n")
    static = "[Match]\nName=eth0\n[Network]\nDHCP=no\nAddress=10.0.0.5/24\n"
    assert not adapt._networkd_dhcp_on_eth0(static)
    assert not adapt._networkd_dhcp_on_eth0("[Match]\nName=ens3\n[Network]\nDHCP=yes\n")


# -- the lab machine ------------------------------------------------------------------


WRITER = (
    "mkdir -p /srv/data/live; i=0; while :; do "
    "head -c 65536 /dev/urandom > /srv/data/live/f$((i % 40)); "
    "echo $i >> /srv/data/live/journal; i=$((i + 1)); sleep 0.05; done"
)


def copy_at_one_instant(machine, out: Path) -> dict[str, Path]:
    """The guest's disks as raw images at one instant (QMP stop drains and flushes them)."""
    machine.qmp("stop")
    try:
        copies = {}
        for name, overlay in machine.overlays.items():
            copies[name] = out / f"{name}.raw"
            subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw",
                            str(overlay), str(copies[name])], check=True)  # fmt: skip
    finally:
        machine.qmp("cont")
    return copies


def source_with_marker(machine, out: Path, fstab_extra: str = "") -> tuple[dict, str]:
    """Under a running writer: write a marker (and break fstab if asked), copy the disks."""
    machine.ssh(f"nohup sh -c '{WRITER}' >/dev/null 2>&1 & echo $! > /run/ferry-writer.pid")
    marker = f"written before the final tag {secrets.token_hex(8)}\n"
    try:
        # The writer is under way (slow in an emulated guest), then the marker goes down.
        machine.ssh("while [ $(cat /srv/data/live/journal 2>/dev/null | wc -l) -lt 5 ]; do "
                    "sleep 0.5; done; cat > /srv/data/ferry-marker; sync -f /srv/data/ferry-marker",
                    input=marker)  # fmt: skip
        if fstab_extra:
            machine.ssh("cp /etc/fstab /etc/fstab.ferry-test; cat >> /etc/fstab; sync",
                        input=fstab_extra)  # fmt: skip
        copies = copy_at_one_instant(machine, out)
    finally:
        machine.ssh("kill $(cat /run/ferry-writer.pid)", check=False)
        if fstab_extra:
            machine.ssh("mv /etc/fstab.ferry-test /etc/fstab; sync", check=False)
    assert int(machine.ssh("wc -l < /srv/data/live/journal").stdout) >= 5, "the writer did not run"
    return copies, hashlib.sha256(marker.encode()).hexdigest()


def spec_for(copies: dict, out: Path, digest: str, adapt_it: bool) -> dict:
    return {
        "started": time.time(),
        "machine": "lab01", "tenant": "demo", "out_dir": str(out / "cutover"),
        "final_tag": {"id": "lab01-final"}, "vm": {"name": "lab01"},
        "disks": [{"id": "lab01-system"}, {"id": "lab01-data"}],
        "targets": {"lab01-system": str(copies["system"]), "lab01-data": str(copies["data"])},
        "adapt": adapt_it, "boot_check": True, "markers": [f"/srv/data/ferry-marker:{digest}"],
    }  # fmt: skip


@pytest.mark.qemu
@pytest.mark.skipif(
    not LONG,
    reason="make lab: in make test the lab guest is cut over through the playbook, "
    "adapted and boot-checked with its marker (test_lab_guest.py)",
)
def test_the_cut_over_lab_machine_is_adapted_and_boots_with_its_marker(lab_machine, tmp_path):
    copies, digest = source_with_marker(lab_machine, tmp_path)
    spec = spec_for(copies, tmp_path, digest, adapt_it=True)
    manifest = cutover.convert(spec)
    print(json.dumps({k: manifest.get(k) for k in ("timings", "reason")}))
    assert manifest["verified"]
    for disk in manifest["disks"]:  # Azure-ready: a whole number of MiB and a valid footer
        assert disk["vhd_data_size"] % MiB == 0 and disk["checks"]["qemu"]
    changes = manifest["adaptation"]["changes"]
    steps = {c["step"] for c in changes}
    assert steps == {"initramfs"}, changes  # the lab lists no Hyper-V drivers; all else fits
    assert all(c["done"] for c in changes)
    assert not [w for w in manifest["adaptation"]["warnings"] if "fstab" in w]
    assert manifest["vm"]["hyper_v_generation"] == "V1"  # GRUB in the MBR: a BIOS boot
    check = manifest["boot_check"]
    assert check["passed"] and check["multi_user"], check
    assert check["markers"] == [{"path": "/srv/data/ferry-marker", "expected": digest,
                                 "found": digest, "ok": True}]  # fmt: skip
    assert manifest["complete"]
    assert set(manifest["timings"]) == {"disks_ready_s", "adapted_s", "boot_checked_s"}
    # The boot check ran on overlays: no VHD was written after adaptation.
    adapted_at = manifest["timings"]["adapted_s"]
    for disk in manifest["disks"]:
        assert Path(disk["vhd"]).stat().st_mtime <= spec["started"] + adapted_at + 1
    # Adapted for good: nothing is left to change, and the cutover is committed once.
    again = adapt.adapt([d["vhd"] for d in manifest["disks"]], dry_run=True)
    assert again["changes"] == [], again["changes"]
    assert cutover.convert(spec)["changed"] is False


@pytest.mark.qemu
def test_a_machine_that_cannot_boot_is_not_cut_over(lab_machine, tmp_path):
    # Unbootable as with any missing device, only sooner: systemd gives up on it after 5 s,
    # not its default 90 s of an emulated boot.
    broken = (
        "UUID=0badc0de-0000-4000-8000-000000000000 /srv/gone ext4 "
        "defaults,x-systemd.device-timeout=5s 0 2\n"
    )
    copies, digest = source_with_marker(lab_machine, tmp_path, fstab_extra=broken)
    spec = spec_for(copies, tmp_path, digest, adapt_it=False)
    manifest = cutover.convert(spec)
    assert manifest["verified"] and not manifest["complete"]
    assert manifest["reason"] == "boot check failed: the guest stopped in emergency mode"
    said = " ".join(manifest["boot_check"]["console"])
    # The console's own words for it (systemd shortens the device's name with an ellipsis).
    assert "Timed out waiting for device" in said and "/srv/gone" in said, said
    assert "\x1b[" not in said
    on_disk = json.loads((tmp_path / "cutover" / "manifest.json").read_text())
    assert on_disk["complete"] is False and on_disk["reason"] == manifest["reason"]
    assert Path(manifest["boot_check"]["console_log"]).stat().st_size > 0
