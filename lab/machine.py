"""A booted lab machine: QEMU on copy-on-write overlays of the cached image.

Everything a run writes is in its run directory: the qcow2 overlays, the
serial console log, QEMU's log and QMP socket, the Ansible inventory and
``machine.json`` (what :meth:`Machine.attach` needs to drive a machine another
process booted, e.g. ``python -m lab up``).

Networking is QEMU user mode with ``restrict=on``: the guest reaches nothing
but what is forwarded explicitly. SSH is forwarded from a free port on the
host's 127.0.0.1; ``forwards`` host ports are reachable from the guest at
``ferry-host`` (10.0.2.100) on the same port numbers, each connection relayed
by ``socat`` to 127.0.0.1 on the host, inside QEMU's process. A process server
under test listens on one of :attr:`Machine.host_ports`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from lab import qemu
from lab.cache import Image
from lab.errors import GuestGone, GuestNotReady, LabError
from lab.image import HOST_ALIAS

GUEST_HOST_ADDRESS = "10.0.2.100"
"""Where the guest reaches the host's forwarded ports (as ``ferry-host`` in its /etc/hosts)."""

READY_SECONDS = 600
"""How long a boot may take to answer SSH with systemd up (TCG on a busy 2-core host)."""

STOP_SECONDS = 60
"""How long a clean poweroff may take before QEMU is told to quit, then killed."""

CPUS = 1
"""One vCPU: under TCG on a busy host, a second one stalls the first (soft lockups, stuck boots)."""

DISKS = (("system", "ferry-sys"), ("data", "ferry-data"))
"""Image disk name and the serial the guest sees it by (/dev/disk/by-id/virtio-<serial>)."""


class Machine:
    """One lab guest. Use as a context manager, or call boot() and stop()."""

    def __init__(
        self,
        image: Image,
        rundir: Path,
        memory_mib: int = 1536,
        cpus: int = CPUS,
        forwards: int = 2,
        detach: bool = False,
        bootloader: bool | None = None,
    ) -> None:
        self.image = image
        self.rundir = Path(rundir).resolve()
        self.memory_mib, self.cpus, self.forwards = memory_mib, cpus, forwards
        self.detach = detach  # survive this process (python -m lab up / --keep)
        # Through the disk's own GRUB, or straight into the image's kernel (the default):
        # under TCG, GRUB reads the initrd through the BIOS for minutes.
        if bootloader is None:
            bootloader = os.environ.get("FERRY_LAB_BOOTLOADER") == "1"
        self.bootloader = bootloader
        self.key = image.key
        self.console = self.rundir / "console.log"
        self.qemu_log = self.rundir / "qemu.log"
        self.qmp_path = self.rundir / "qmp.sock"
        self.inventory = self.rundir / "inventory.yml"
        self.overlays = {name: self.rundir / f"{name}.qcow2" for name, _ in DISKS}
        self.ssh_port = 0
        self.host_ports: list[int] = []
        self.pid = 0
        self.accel = ""
        self.ready = False  # has answered SSH with systemd up at least once
        self._proc: subprocess.Popen | None = None

    # -- life cycle ---------------------------------------------------------

    def __enter__(self) -> Machine:
        try:
            self.boot()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def boot(self) -> float:
        """Start QEMU on fresh overlays and wait for SSH; returns seconds to ready."""
        self.rundir.mkdir(parents=True, exist_ok=True)
        for path in (self.console, self.qmp_path, *self.overlays.values()):
            path.unlink(missing_ok=True)
        for name, _ in DISKS:
            base = getattr(self.image, name)
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base),
                 str(self.overlays[name])],
                check=True,
            )  # fmt: skip
        self.accel = qemu.accelerator(self.image.kernel, self.image.dir.parent)
        self.ssh_port, *self.host_ports = _free_ports(1 + self.forwards)
        started = time.monotonic()
        with open(self.qemu_log, "wb") as log:
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.detach,
                preexec_fn=None if self.detach else qemu.die_with_parent,
            )
        self.pid = self._proc.pid
        self._save()
        self.wait_ready()
        self.ready = True
        seconds = time.monotonic() - started
        how = "GRUB from the disk" if self.bootloader else "the image's kernel and initrd"
        self.image.record(boot_to_ssh_s=round(seconds, 1), boot=f"{self.accel}, {how}")
        self._write_inventory()
        return seconds

    def _command(self) -> list[str]:
        net = f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22"
        for port in self.host_ports:
            net += f",guestfwd=tcp:{GUEST_HOST_ADDRESS}:{port}-cmd:socat - TCP:127.0.0.1:{port}"
        cmd = [qemu.binary(), "-name", "ferry-lab"]
        cmd += qemu.common_args(self.accel, self.memory_mib, self.cpus, self.console)
        cmd += ["-netdev", net, "-device", "virtio-net-pci,netdev=net0"]
        cmd += ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if not self.bootloader:
            kernel, initrd = self.image.boot_files()
            root = self.image.facts["uuids"]["root"]
            cmd += ["-kernel", str(kernel), "-initrd", str(initrd), "-append", f"root=UUID={root} "
                    "ro console=tty0 console=ttyS0,115200 net.ifnames=0"]  # fmt: skip
        for name, serial in DISKS:
            cmd += qemu.disk_args(self.overlays[name], "qcow2", serial)
        return cmd

    def stop(self) -> None:
        """Power off cleanly; QMP quit, then SIGKILL, if the guest does not comply in time."""
        if not self.running():
            self._reap()
            return
        asked = self.ready and (  # a guest that does not answer will not power off either
            self.ssh("systemctl poweroff --no-block", check=False, timeout=20).returncode == 0
        )
        if not asked or not self._wait_exit(STOP_SECONDS):
            try:
                self.qmp("quit")
            except OSError:
                pass
            if not self._wait_exit(10):
                os.kill(self.pid, signal.SIGKILL)
                self._wait_exit(10)
        self._reap()
        self._close_master()

    def _close_master(self) -> None:
        """End the shared SSH connection (after a reboot it would hang on a dead peer)."""
        subprocess.run([*self._ssh_base(), "-O", "exit", "lab"], capture_output=True)

    def running(self) -> bool:
        if not self.pid:
            return False
        if self._proc is not None:
            return self._proc.poll() is None
        try:  # attached: make sure the pid is still our QEMU, not a reused one
            return str(self.qmp_path) in Path(f"/proc/{self.pid}/cmdline").read_text()
        except OSError:
            return False

    def _wait_exit(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.25)
        return not self.running()

    def _reap(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        if self._proc is not None:
            self._proc.wait()

    # -- guest state ------------------------------------------------------------

    def wait_ready(self, not_boot: str | None = None, seconds: float = READY_SECONDS) -> str:
        """Wait until SSH answers and systemd is up (running or degraded); returns the boot id.

        ``not_boot`` is the boot id before a reboot or reset: a guest still on
        that boot does not count.
        """
        deadline = time.monotonic() + seconds
        last = "no SSH answer yet"
        while time.monotonic() < deadline:
            if not self.running():
                status = self._proc.poll() if self._proc else "?"
                raise GuestGone(status=status, console=self.console, log=self.qemu_log)
            result = self.ssh(
                "cat /proc/sys/kernel/random/boot_id; systemctl is-system-running",
                check=False,
                timeout=30,
            )
            words = result.stdout.split()
            if len(words) == 2 and words[0] != not_boot and words[1] in ("running", "degraded"):
                return words[0]
            last = " ".join(words) or (result.stderr.strip().splitlines() or [last])[-1]
            time.sleep(2)
        raise GuestNotReady(seconds=seconds, last=last, console=self.console)

    def boot_id(self) -> str:
        return self.ssh("cat /proc/sys/kernel/random/boot_id").stdout.strip()

    def reboot(self) -> float:
        """A clean guest reboot (same QEMU process); returns seconds until ready again."""
        before = self.boot_id()
        started = time.monotonic()
        self.ssh("systemctl reboot --no-block", check=False)
        self._close_master()
        self.wait_ready(not_boot=before)
        seconds = time.monotonic() - started
        self.image.record(reboot_s=round(seconds, 1))
        return seconds

    def crash(self) -> float:
        """A hard reset without sync (QMP system_reset); returns seconds until ready again."""
        before = self.boot_id()
        started = time.monotonic()
        self.qmp("system_reset")
        self._close_master()
        self.wait_ready(not_boot=before)
        seconds = time.monotonic() - started
        self.image.record(crash_s=round(seconds, 1))
        return seconds

    # -- talking to the guest -------------------------------------------------

    def _ssh_base(self) -> list[str]:
        # One master connection per run: key exchange in an emulated guest costs a second.
        return [
            "ssh", "-F", "/dev/null", "-i", str(self.key), "-p", str(self.ssh_port),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
            "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
            "-o", "ControlMaster=auto", "-o", f"ControlPath={self.rundir}/ssh.ctl",
            "-o", "ControlPersist=60", "-o", "HostKeyAlias=ferry-lab",
        ]  # fmt: skip

    def ssh(
        self, command: str, check: bool = True, timeout: float = 300, input: str | None = None
    ) -> subprocess.CompletedProcess:
        """Run a shell command as root in the guest; check=True raises on a non-zero status."""
        try:
            result = subprocess.run(
                [*self._ssh_base(), "root@127.0.0.1", command],
                capture_output=True,
                text=True,
                timeout=timeout,
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            if check:
                raise LabError(detail=f"guest command timed out after {timeout} s: {command}")
            return subprocess.CompletedProcess(command, 255, "", "timed out")
        if check and result.returncode != 0:
            raise LabError(
                detail=f"guest command failed (status {result.returncode}): {command}: "
                + (result.stderr.strip().splitlines() or [""])[-1]
            )
        return result

    def copy_to(self, src: Path | str, dest: str) -> None:
        """Copy a host file or directory (recursively) to a guest path."""
        cmd = ["scp", "-q", "-r", *self._ssh_base()[1:]]
        cmd[cmd.index("-p")] = "-P"  # scp spells the port option differently
        subprocess.run([*cmd, str(src), f"root@127.0.0.1:{dest}"], check=True, timeout=600)

    def qmp(self, command: str, **arguments) -> dict:
        """One QMP command; returns its answer (events before it are skipped)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(str(self.qmp_path))
            stream = sock.makefile("rwb")
            stream.readline()  # greeting
            messages: list[dict[str, Any]] = [{"execute": "qmp_capabilities"}, {"execute": command}]
            for message in messages:
                if message["execute"] == command and arguments:
                    message["arguments"] = arguments
                stream.write(json.dumps(message).encode() + b"\n")
                stream.flush()
                while "return" not in (answer := json.loads(stream.readline() or b"{}")):
                    if "error" in answer or not answer:
                        raise LabError(detail=f"QMP {message['execute']}: {answer}")
            return answer["return"]

    # -- files other tools read -------------------------------------------------

    def _save(self) -> None:
        state = {
            "image": str(self.image.dir),
            "pid": self.pid,
            "ssh_port": self.ssh_port,
            "host_ports": self.host_ports,
            "accel": self.accel,
        }
        (self.rundir / "machine.json").write_text(json.dumps(state, indent=1))

    @classmethod
    def attach(cls, rundir: Path) -> Machine:
        """Drive a machine another process booted in rundir (it stays up unless stop() is called)."""
        try:
            state = json.loads((Path(rundir) / "machine.json").read_text())
        except OSError:
            raise LabError(detail=f"no lab machine in {rundir} (python -m lab up starts one)")
        machine = cls(Image(Path(state["image"])), rundir, forwards=len(state["host_ports"]))
        machine.pid, machine.ssh_port = state["pid"], state["ssh_port"]
        machine.host_ports, machine.accel = state["host_ports"], state["accel"]
        if not machine.running():
            raise LabError(detail=f"the lab machine in {rundir} is not running")
        machine.ready = True
        return machine

    def _write_inventory(self) -> None:
        """An Ansible inventory with the guest as host lab01 in group ferry_lab."""
        args = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
        host = {
            "ansible_host": "127.0.0.1",
            "ansible_port": self.ssh_port,
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(self.key),
            "ansible_ssh_common_args": args,
            # The same for Mitogen's strategy (docs/lab.md), which does not read the above.
            "ansible_host_key_checking": False,
            # A new SSH connection to the emulated guest can take longer than Ansible's
            # default 10 s when the host is busy (a cutover's facts failed so in CI).
            "ansible_timeout": 60,
            "ansible_python_interpreter": "/usr/bin/python3",
            "ferry_lab_host_address": HOST_ALIAS,
            "ferry_lab_host_ports": self.host_ports,
        }
        inventory = {"all": {"children": {"ferry_lab": {"hosts": {"lab01": host}}}}}
        # JSON is YAML: no YAML library needed in the runtime virtualenv.
        self.inventory.write_text(json.dumps(inventory, indent=2) + "\n")

    def ssh_command(self) -> str:
        """How a person logs in (printed by python -m lab up)."""
        return (
            f"ssh -i {self.key} -p {self.ssh_port} -o StrictHostKeyChecking=no "
            "-o UserKnownHostsFile=/dev/null root@127.0.0.1"
        )


def _free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now (the kernel picks; a tiny race is accepted)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
