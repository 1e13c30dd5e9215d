"""``python -m lab``: build the image, boot a machine, run the lab tests, report figures.

python -m lab build            build the image, or say it is cached (and how fast)
python -m lab up               boot a machine that stays up (run/lab/), print how to SSH in
python -m lab ssh [CMD...]     log in to it, or run a command in it
python -m lab down             power it off
python -m lab test [--keep]    boot, run `pytest -m qemu` against it, power off, report
python -m lab report           the figures: cold and cached build, boot to SSH
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from ferry.errors import FerryError
from lab.cache import built_image, ensure_image
from lab.errors import LabError
from lab.machine import Machine

ROOT = Path(__file__).resolve().parent.parent
RUNDIR = ROOT / "run" / "lab"


def cmd_build(args) -> int:
    ensure_image()
    return 0


def cmd_up(args) -> int:
    machine = _boot(detach=True)
    _print_access(machine)
    return 0


def cmd_ssh(args) -> int:
    machine = Machine.attach(RUNDIR)
    return subprocess.call([*machine._ssh_base(), "-t", "root@127.0.0.1", *args.command])


def cmd_down(args) -> int:
    Machine.attach(RUNDIR).stop()
    print("lab machine stopped")
    return 0


def cmd_test(args) -> int:
    machine = _boot(detach=args.keep)
    extra = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    # FERRY_LAB_LONG: the scenarios' longer version (tests/test_lab_guest.py).
    env = {**os.environ, "FERRY_LAB_ATTACH": str(RUNDIR), "FERRY_LAB_LONG": "1"}
    pytest = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-m", "qemu", *extra], cwd=ROOT, env=env
    )
    try:
        status = pytest.wait()
    finally:
        if pytest.poll() is None:  # interrupted: the tests must not outlive their machine
            pytest.terminate()
            pytest.wait()
        if args.keep:
            _print_access(machine)
        else:
            machine.stop()
    cmd_report(args)
    return status


def cmd_report(args) -> int:
    image = built_image()
    if image is None:
        raise LabError(detail="no image built for this recipe yet (python -m lab build)")
    figures, facts = image.figures(), image.facts
    print(f"lab report (image {image.dir.name}, Debian {facts['suite']}, {facts['built_at']})")
    print("  (boot figures are the latest of any run on this image)")
    rows = [
        ("cold build", "cold_build_s", "debootstrap, mkfs, first boot"),
        ("first boot", "first_boot_s", "grub-install, LVM, XFS in the guest"),
        ("cached build", "cached_s", "lookup of the cached image"),
        ("boot to SSH", "boot_to_ssh_s", f"QEMU start to systemd up ({figures.get('boot')})"),
        ("reboot", "reboot_s", "guest reboot until up again"),
        ("crash reset", "crash_s", "QMP system_reset until up again"),
    ]
    for label, key, what in rows:
        value = figures.get(key, facts.get(key))
        shown = f"{value:8.2f} s" if isinstance(value, int | float) else "       - "
        print(f"  {label:<13} {shown}   {what}")
    print("  Ferry on the guest (tests/test_lab_guest.py):")
    for label, key, what in FERRY_ROWS:
        seconds, sent, read = (figures.get(f"{key}{s}") for s in ("_s", "_bytes", "_read_bytes"))
        shown = f"{seconds:8.2f} s" if isinstance(seconds, int | float) else "       - "
        volume = f"sent {_mib(sent)}, read {_mib(read)}" if sent is not None else ""
        print(f"  {label:<13} {shown}   {what}{'; ' + volume if volume else ''}")
    if "rpo_max_s" in figures:
        print(
            f"  {'RPO':<13} {figures['rpo_median_s']:8.2f} s   median under the writer "
            f"(max {figures['rpo_max_s']} s over {figures['rpo_window_s']} s)"
        )
    return 0


FERRY_ROWS = (
    ("wheelhouse", "wheelhouse", "the agent's wheels for the guest"),
    ("site.yml", "site", "every role deployed, the agent in the guest"),
    ("initial sync", "initial_sync", "protect.yml: both disks on their first tag"),
    ("crash resync", "crash_resync", "reset under the writer until tagged again"),
    ("reboot resync", "reboot_resync", "orderly reboot under the writer until tagged again"),
)
"""Figure label, key prefix in figures.json (``_s``, ``_bytes``, ``_read_bytes``), what."""


def _mib(value: object) -> str:
    return f"{value / (1 << 20):.1f} MiB" if isinstance(value, int | float) else "-"


def _boot(detach: bool) -> Machine:
    if RUNDIR.exists():
        try:
            Machine.attach(RUNDIR).stop()  # one kept machine at a time
        except FerryError:
            pass
    machine = Machine(ensure_image(), RUNDIR, detach=detach)
    # A SIGTERM (make interrupted, CI cancelled) still runs the finally that stops QEMU.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        seconds = machine.boot()
    except BaseException:
        machine.stop()
        raise
    print(f"lab machine up: boot to SSH {seconds:.1f} s ({machine.accel})")
    return machine


def _print_access(machine: Machine) -> None:
    print(
        f"lab machine kept up in {RUNDIR}\n"
        f"  ssh:       {machine.ssh_command()}   (or: python -m lab ssh)\n"
        f"  inventory: {machine.inventory}\n"
        f"  console:   {machine.console}\n"
        f"  guest reaches host 127.0.0.1 ports {machine.host_ports} as ferry-host\n"
        f"  stop:      python -m lab down"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build").set_defaults(func=cmd_build)
    sub.add_parser("up").set_defaults(func=cmd_up)
    ssh = sub.add_parser("ssh")
    ssh.add_argument("command", nargs=argparse.REMAINDER)
    ssh.set_defaults(func=cmd_ssh)
    sub.add_parser("down").set_defaults(func=cmd_down)
    test = sub.add_parser("test")
    test.add_argument("--keep", action="store_true", help="leave the machine up afterwards")
    test.add_argument("pytest_args", nargs=argparse.REMAINDER, help="passed on to pytest")
    test.set_defaults(func=cmd_test)
    sub.add_parser("report").set_defaults(func=cmd_report)
    # Options the lab does not know go to pytest (python -m lab test -k crash).
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.cmd != "test":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.cmd == "test":
        args.pytest_args = unknown + args.pytest_args
    try:
        return args.func(args)
    except FerryError as e:
        print(e, file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
