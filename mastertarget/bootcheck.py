"""Boot check: does the migrated machine boot, and does it hold the data of its final tag?

Runs on the master target's host, after adaptation (mastertarget/adapt.py)::

    python -m mastertarget.bootcheck --disk web01-disk0.vhd --disk web01-disk1.vhd \\
        --marker /var/tmp/ferry-cutover-marker:<sha256> [--timeout 900] --report boot.json

The disks themselves are never written: each gets a qcow2 overlay
(``qemu-img create -f qcow2 -b disk.vhd -F vpc``) in a scratch directory, and
only the overlays change.  Into the OS disk's overlay the check puts a oneshot
systemd unit, ordered after ``multi-user.target``, that writes to the serial
console whether ``multi-user.target`` is active and the SHA-256 of each marker
file, then powers the guest off.  QEMU then boots the overlays from the
guest's own bootloader, with no network, the console going to a file that the
check reads as it grows.

The check passes only when the guest reports ``multi-user.target`` active and
every marker is there (with the expected digest when one is given).  It fails
at once when the console shows emergency mode, a kernel panic, GRUB's rescue
prompt or no bootable disk, and when the time limit passes; the report then
says which, with the console's last lines (the whole log is kept).

KVM is used when it works: the first boot under KVM must print the kernel's
first line within ``BOOT_CHECK_KVM_PROBE`` seconds without QEMU dying, or the
check starts again under TCG (nested KVM hangs on some hosts, and on others
QEMU aborts setting an MSR).  ``--accel`` or
``FERRY_BOOT_CHECK_ACCEL`` chooses instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ferry.errors import Exit, FerryError
from mastertarget import defaults
from mastertarget.guestfs import Guestfish

UNIT = "ferry-boot-check.service"
SCRIPT = "/usr/local/sbin/ferry-boot-check"
BEGIN, END = "FERRY-BOOT-CHECK-BEGIN", "FERRY-BOOT-CHECK-END"

FAILURES = (
    ("You are in emergency mode", "the guest stopped in emergency mode"),
    ("Give root password for maintenance", "the guest stopped in emergency mode"),
    ("Cannot open access to console, the root account is locked", "the guest stopped in emergency mode"),
    ("Kernel panic", "the kernel panicked"),
    ("grub rescue>", "GRUB could not find its files (rescue prompt)"),
    ("No bootable device", "no disk has a bootloader"),
    ("Boot failed: not a bootable disk", "no disk has a bootloader"),
)  # fmt: skip
"""Console lines that end a boot check at once, and what they mean."""

CLUES = ("Timed out waiting for device", "Dependency failed for", "Failed to mount", "error:",
         "ALERT!", "not found", "Failed to start")  # fmt: skip
"""Console lines worth quoting when a check fails."""


class BootCheckError(FerryError):
    """boot check: {detail}"""

    exit_code = Exit.CUTOVER


def parse_marker(spec: str) -> dict[str, str | None]:
    """``/path`` or ``/path:sha256`` -> ``{"path", "sha256"}``."""
    path, _, digest = spec.partition(":")
    if not path.startswith("/"):
        raise BootCheckError(detail=f"marker {spec!r}: give an absolute path in the guest")
    return {"path": path, "sha256": digest or None}


def check_script(markers: list[dict[str, str | None]]) -> str:
    """The shell script the injected unit runs in the booted guest."""
    lines = [
        "#!/bin/sh",
        "# Written by Ferry's boot check into a throw-away overlay; never on the migrated disks.",
        "# Each line opens the console afresh: a getty starting on ttyS0 hangs up every",
        "# descriptor already open on it, and what is written to one of those is lost.",
        'say() { echo "$*" >>/dev/ttyS0; }',
        f'say "{BEGIN} multi-user=$(systemctl is-active multi-user.target)"',
    ]
    for marker in markers:
        p = marker["path"]
        lines.append(
            f'if [ -f "{p}" ]; then say "FERRY-MARKER {p} $(sha256sum <"{p}" | cut -d" " -f1)"; '
            f'else say "FERRY-MARKER {p} missing"; fi'
        )
    lines += [f'say "{END}"', "sync", "systemctl poweroff --no-block", ""]
    return "\n".join(lines)


UNIT_TEXT = f"""[Unit]
Description=Ferry boot check (reports on the serial console, then powers off)
# After the serial getty too, whose start hangs up the console (see the script).
After=multi-user.target serial-getty@ttyS0.service

[Service]
Type=oneshot
ExecStart=/bin/sh {SCRIPT}

[Install]
WantedBy=multi-user.target
"""


def make_overlays(disks: list[Path], work: Path, fmt: str) -> list[Path]:
    """One qcow2 overlay per disk in ``work``; the disks are only read from now on."""
    overlays = []
    for i, disk in enumerate(disks):
        overlay = work / f"disk{i}.qcow2"
        made = subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(disk.resolve()), "-F", fmt,
             str(overlay)],
            capture_output=True, text=True,
        )  # fmt: skip
        if made.returncode != 0:
            raise BootCheckError(detail=f"cannot put an overlay on {disk}: {made.stderr.strip()}")
        overlays.append(overlay)
    return overlays


def inject(overlays: list[Path], markers: list[dict[str, str | None]], root: str | None) -> float:
    """Put the check's unit into the guest's root filesystem, in the overlay; seconds taken.

    ``root`` (the appliance's name for it, as adaptation found it) spares an
    inspection, which takes a minute in an emulated appliance.
    """
    started = time.monotonic()
    with Guestfish([(o, "qcow2") for o in overlays], readonly=False) as g:
        if not (root and g.attempt("mount", root, "/") is not None):
            roots = g.lines("inspect-os")
            if not roots:
                raise BootCheckError(detail="no operating system found on the disks")
            g.run("mount", roots[0], "/")
        if g.attempt("is-dir", "/usr/local/sbin") != "true\n":
            g.run("mkdir-p", "/usr/local/sbin")
        g.write(SCRIPT, check_script(markers))
        g.write(f"/etc/systemd/system/{UNIT}", UNIT_TEXT)
        g.run("mkdir-p", "/etc/systemd/system/multi-user.target.wants")
        g.run("ln-sf", f"/etc/systemd/system/{UNIT}",
              f"/etc/systemd/system/multi-user.target.wants/{UNIT}")  # fmt: skip
        g.run("sync")
        g.run("umount-all")
    return time.monotonic() - started


def qemu_command(overlays: list[Path], console: Path, accel: str) -> list[str]:
    tool = shutil.which("qemu-system-x86_64")
    if not tool:
        raise BootCheckError(detail="qemu-system-x86_64 is not installed (Debian qemu-system-x86)")
    cmd = [tool, "-name", "ferry-boot-check", "-accel", accel, "-machine", "pc",
           "-cpu", "host" if accel == "kvm" else "max", "-smp", "2",
           "-m", str(defaults.BOOT_CHECK_MEMORY_MIB), "-nodefaults", "-display", "none",
           "-serial", f"file:{console}", "-nic", "none", "-no-reboot"]  # fmt: skip
    for i, overlay in enumerate(overlays):
        cmd += ["-drive", f"file={overlay},format=qcow2,if=none,id=d{i}",
                "-device", f"virtio-blk-pci,drive=d{i}" + (",bootindex=0" if i == 0 else "")]  # fmt: skip
    return cmd


class Boot:
    """One QEMU run of the overlays, watched through its console log."""

    def __init__(self, overlays: list[Path], console: Path, accel: str) -> None:
        console.unlink(missing_ok=True)
        self.console, self.accel = console, accel
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            qemu_command(overlays, console, accel),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip

    def text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, grace: float = 0.0) -> None:
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def watch(boot: Boot, deadline: float, probe_until: float | None = None) -> dict[str, Any]:
    """Read the console until the check reports, the boot fails, or time runs out."""
    while True:
        exited = boot.proc.poll() is not None  # before reading: the log is then complete
        text = boot.text()
        if END in text:
            return {"outcome": "reported", "text": text}
        for needle, why in FAILURES:
            if needle in text:
                return {"outcome": "failed", "reason": why, "text": text}
        if exited:
            stderr = boot.proc.stderr.read() if boot.proc.stderr else b""
            said = stderr.decode(errors="replace").strip()
            why = "QEMU exited before the check reported" + (f": {said}" if said else "")
            code = boot.proc.returncode
            if code is not None and code < 0:
                why += f" (killed by signal {-code})"
            elif code == 0 and not said:
                why += " (the guest reset or powered off: QEMU runs with -no-reboot)"
            if probe_until is not None and "Linux version" not in text:
                # Nested KVM may also kill QEMU outright (an MSR it cannot set): TCG then.
                return {"outcome": "kvm-hangs", "reason": why, "text": text}
            return {"outcome": "failed", "reason": why, "text": text}
        if (
            probe_until is not None
            and time.monotonic() > probe_until
            and "Linux version" not in text
        ):
            return {"outcome": "kvm-hangs", "text": text}
        if time.monotonic() > deadline:
            return {"outcome": "failed", "reason": "time limit reached", "text": text}
        time.sleep(0.5)


def choose_accel(requested: str) -> tuple[str, bool]:
    """The accelerator to start with, and whether a KVM boot must prove itself (a probe)."""
    requested = os.environ.get("FERRY_BOOT_CHECK_ACCEL") or requested
    if requested != "auto":
        return requested, False
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", False
    known = _kvm_verdict()
    return (known, False) if known else ("kvm", True)


KVM_VERDICT = Path("/var/tmp/ferry-boot-check-kvm.json")
"""Whether KVM boots guests on this host, kept until the host reboots (its boot id changes)."""


def _host_boot() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _kvm_verdict() -> str | None:
    try:
        known = json.loads(KVM_VERDICT.read_text())
        return known["accel"] if known["host_boot"] == _host_boot() else None
    except (OSError, ValueError, KeyError):
        return None


def _remember(accel: str) -> None:
    try:
        KVM_VERDICT.write_text(json.dumps({"host_boot": _host_boot(), "accel": accel}))
    except OSError:
        pass


def _run_once(overlays, console, accel, timeout, probe: bool):
    boot = Boot(overlays, console, accel)
    seen: dict[str, Any] = {}
    try:
        until = time.monotonic() + defaults.BOOT_CHECK_KVM_PROBE if probe else None
        seen = watch(boot, time.monotonic() + timeout, until)
    finally:
        boot.stop(grace=30 if seen.get("outcome") == "reported" else 0)
    return seen, boot


def boot_and_watch(overlays: list[Path], console: Path, accel: str, timeout: float):
    """Boot (KVM first when usable, falling back to TCG if it hangs); the watch result and boot."""
    chosen, probe = choose_accel(accel)
    seen, boot = _run_once(overlays, console, chosen, timeout, probe)
    if probe:
        _remember("tcg" if seen["outcome"] == "kvm-hangs" else "kvm")
    if seen["outcome"] == "kvm-hangs":
        seen, boot = _run_once(overlays, console, "tcg", timeout, False)
    return seen, boot


MARKER_LINE = re.compile(r"FERRY-MARKER (/\S*) ([0-9a-f]{64}|missing)\b")
"""One marker's report on the console: its path and digest, or ``missing``."""


def verdict(seen: dict[str, Any], markers: list[dict[str, str | None]]) -> dict[str, Any]:
    """Passed or not, why, and what each marker showed."""
    text = seen["text"]
    # Searched anywhere in a line: a getty's prompt written to the console at the same
    # moment can share the marker's line ("ferry-lab login: FERRY-MARKER /srv/...").
    found = {path: got for path, got in MARKER_LINE.findall(text)}
    results = []
    for m in markers:
        got = found.get(m["path"])
        ok = got not in (None, "missing") and (m["sha256"] is None or got == m["sha256"])
        results.append({"path": m["path"], "expected": m["sha256"], "found": got, "ok": ok})
    multi_user = f"{BEGIN} multi-user=active" in text
    if seen["outcome"] != "reported":
        reason = seen["reason"]
    elif not multi_user:
        reason = "the guest did not reach multi-user.target"
    elif not all(r["ok"] for r in results):
        bad = [f"{r['path']} ({r['found'] or 'not reported'})" for r in results if not r["ok"]]
        reason = f"marker not as written before the final tag: {', '.join(bad)}"
    else:
        reason = None
    return {"passed": reason is None, "reason": reason, "multi_user": multi_user,
            "markers": results}  # fmt: skip


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]?")
"""Colour and cursor sequences systemd writes to a console."""


def console_clues(text: str, limit: int = 12) -> list[str]:
    """The console's telling lines (the last ones if none tells), without terminal codes."""
    plain = [ANSI.sub("", line).strip() for line in text.splitlines()]
    lines = [line for line in plain if any(c in line for c in CLUES)]
    return lines[-limit:] or [line for line in plain[-limit:] if line]


def boot_check(
    disks: list[str | Path],
    markers: list[str] | None = None,
    timeout: float = defaults.BOOT_CHECK_TIMEOUT,
    fmt: str = "vpc",
    accel: str = "auto",
    console_log: str | Path | None = None,
    root: str | None = None,
) -> dict[str, Any]:
    """Boot ``disks`` (OS disk first) on throw-away overlays; the report (``passed``, ``reason``)."""
    paths = [Path(d) for d in disks]
    wanted = [parse_marker(m) for m in markers or []]
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=".ferry-boot-check-", dir=paths[0].resolve().parent))
    try:
        overlays = make_overlays(paths, work, fmt)
        inject_s = inject(overlays, wanted, root)
        console = work / "console.log"
        seen, boot = boot_and_watch(overlays, console, accel, timeout)
        result = verdict(seen, wanted)
        kept = Path(console_log) if console_log else paths[0].with_suffix(".boot-console.log")
        shutil.copyfile(console, kept) if console.exists() else kept.write_text("")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        **result, "disks": [str(d) for d in paths], "accel": boot.accel,
        "boot_s": round(boot.elapsed(), 1), "inject_s": round(inject_s, 1),
        "duration_s": round(time.monotonic() - started, 1), "console_log": str(kept),
        "console": [] if result["passed"] else console_clues(seen["text"]),
    }  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mastertarget.bootcheck", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--disk", action="append", required=True, help="OS disk first; repeat")
    parser.add_argument("--marker", action="append", default=[],
                        help="PATH or PATH:SHA256 of a file the guest must show; repeat")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=defaults.BOOT_CHECK_TIMEOUT)
    parser.add_argument("--format", default="vpc", help="disk format for QEMU (default vpc)")
    parser.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    parser.add_argument("--console-log", help="where to keep the serial console's log")
    parser.add_argument("--report", help="also write the report (JSON) to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m mastertarget.bootcheck``: the report; status 1 if it failed."""
    from ferry.process import run_main

    args = _parser().parse_args(argv)

    def body() -> int:
        report = boot_check(args.disk, args.marker, args.timeout, args.format, args.accel,
                            args.console_log)  # fmt: skip
        if args.report:
            Path(args.report).write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(report))
        return 0 if report["passed"] else 1

    return run_main("bootcheck", body)


if __name__ == "__main__":
    sys.exit(main())
