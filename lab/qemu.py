"""What every lab QEMU shares: the binary, the accelerator probe, disk arguments."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from lab.errors import LabError

QEMU = "qemu-system-x86_64"

KVM_PROBE_SECONDS = 10.0
"""How long a kernel gets under KVM to reach its root-mount panic (it takes under 2 s)."""


def binary() -> str:
    found = shutil.which(QEMU)
    if not found:
        raise LabError(detail=f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    return found


def disk_args(path: Path, fmt: str, serial: str) -> list[str]:
    """A virtio disk the guest sees as /dev/disk/by-id/virtio-<serial>."""
    return [
        "-drive",
        f"file={path},format={fmt},if=none,id={serial},cache=writeback,discard=unmap",
        "-device",
        f"virtio-blk-pci,drive={serial},serial={serial}",
    ]


def common_args(accel: str, memory_mib: int, cpus: int, console: Path) -> list[str]:
    """No display, no default devices; the serial console goes to a file."""
    cpu = "host" if accel == "kvm" else "max"
    return [
        *("-accel", accel, "-machine", "pc", "-cpu", cpu),
        *("-smp", str(cpus), "-m", str(memory_mib)),
        *("-nodefaults", "-display", "none", "-serial", f"file:{console}"),
    ]


def accelerator(kernel: Path, cache: Path) -> str:
    """``kvm`` if a kernel really runs under it here, else ``tcg``.

    /dev/kvm existing proves nothing: nested KVM on this kind of machine hangs
    right after the BIOS. So boot the image's kernel with no root under KVM
    and wait briefly for its panic. The verdict is kept per host boot (the
    host's boot id), since only a host reboot can change it.
    FERRY_LAB_ACCEL=kvm|tcg overrides the probe.
    """
    forced = os.environ.get("FERRY_LAB_ACCEL")
    if forced:
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    host_boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    verdict_file = cache / "kvm-probe.json"
    try:
        verdict = json.loads(verdict_file.read_text())
        if verdict["host_boot"] == host_boot:
            return verdict["accel"]
    except (OSError, ValueError, KeyError):
        pass
    accel = "kvm" if _kvm_boots(kernel) else "tcg"
    verdict_file.write_text(json.dumps({"host_boot": host_boot, "accel": accel}))
    return accel


def _kvm_boots(kernel: Path) -> bool:
    with tempfile.TemporaryDirectory(prefix="ferry-kvm-probe-") as tmp:
        console = Path(tmp) / "console.log"
        cmd = [binary(), *common_args("kvm", 256, 1, console), "-no-reboot"]
        cmd += ["-kernel", str(kernel), "-append", "console=ttyS0 panic=-1"]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent
        )
        deadline = time.monotonic() + KVM_PROBE_SECONDS
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    break
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        return "Kernel panic" in console.read_text(errors="replace")


def die_with_parent() -> None:
    """In the child: SIGKILL QEMU when its parent dies, so no failure leaves one behind."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
