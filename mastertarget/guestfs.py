"""One libguestfs appliance, driven through guestfish's remote control.

libguestfs boots its own small Linux under QEMU and sees partitions, LVM and
XFS whatever the host's kernel lacks.  Its Python bindings exist only for
Debian's system Python, so Ferry drives ``guestfish --listen`` instead: one
appliance per session, one short ``guestfish --remote`` call per command, so
a whole adaptation (inspect, read, decide, write, rebuild the initramfs) costs
one appliance start.

This host's KVM hangs inside nested guests, so the appliance runs with
``LIBGUESTFS_BACKEND=direct LIBGUESTFS_BACKEND_SETTINGS=force_tcg`` unless the
environment names a backend already.

guestfish exits on the first failed command when it is not interactive; a
remote server then goes away, so :meth:`Guestfish.run` ends the session with
a :class:`GuestfsError` on any failure.  A command that may fail without harm
goes through :meth:`Guestfish.attempt`, guestfish's ``-command`` form: the
server stays, and the error is returned instead.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from ferry.errors import Exit, FerryError
from mastertarget import defaults


class GuestfsError(FerryError):
    """libguestfs: {detail}"""

    exit_code = Exit.CUTOVER


def guestfs_env() -> dict[str, str]:
    """The environment for guestfish: the direct backend under TCG unless told otherwise."""
    env = dict(os.environ)
    if "LIBGUESTFS_BACKEND" not in env:
        env["LIBGUESTFS_BACKEND"] = "direct"
        env.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
    return env


class Guestfish:
    """A running appliance with ``disks`` attached (``(path, format)`` pairs), in order.

    Use as a context manager: the appliance is launched on entry and shut
    down (and its QEMU gone) on exit, whatever happened.
    """

    def __init__(self, disks: list[tuple[str | Path, str]], readonly: bool) -> None:
        self.disks = [(str(Path(p).resolve()), fmt) for p, fmt in disks]
        self.readonly = readonly
        self.pid = 0
        self.env = guestfs_env()
        self.launch_s = 0.0
        self.last_error = ""

    def __enter__(self) -> Guestfish:
        tool = shutil.which("guestfish")
        if not tool:
            raise GuestfsError(
                detail="guestfish is not installed (Debian package libguestfs-tools)"
            )
        argv = [tool, "--listen", *(["--ro"] if self.readonly else [])]
        for path, fmt in self.disks:
            argv += [f"--format={fmt}", "-a", path]
        started = time.monotonic()
        # The server forks and keeps the parent's stdout: read files, not pipes, or wait forever.
        with tempfile.TemporaryFile("w+") as said, tempfile.TemporaryFile("w+") as err:
            status = subprocess.run(argv, stdout=said, stderr=err, env=self.env, timeout=60)
            said.seek(0)
            err.seek(0)
            found = re.search(r"GUESTFISH_PID=(\d+)", said.read())
            if status.returncode != 0 or not found:
                raise GuestfsError(detail=f"guestfish --listen failed: {err.read().strip()}")
        self.pid = int(found[1])
        try:
            self.run("run", timeout=defaults.GUESTFS_LAUNCH_TIMEOUT)
        except BaseException:
            self.close()
            raise
        self.launch_s = time.monotonic() - started
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, *args: str, timeout: float = defaults.GUESTFS_COMMAND_TIMEOUT) -> str:
        """One guestfish command; its output.  A failure ends the session (see the module)."""
        argv = ["guestfish", f"--remote={self.pid}", "--", *args]
        try:
            out = subprocess.run(
                argv, capture_output=True, text=True, env=self.env, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            self.close()
            raise GuestfsError(
                detail=f"{args[0]} took over {timeout:.0f} s; the appliance was stopped"
            )
        if out.returncode != 0:
            self.close()
            said = " ".join(out.stderr.split()) or f"exit status {out.returncode}"
            raise GuestfsError(detail=f"{' '.join(args)[:200]}: {said}")
        return out.stdout

    def attempt(self, *args: str, timeout: float = defaults.GUESTFS_COMMAND_TIMEOUT) -> str | None:
        """One command whose failure is an answer: None (and the session goes on), else its output."""
        argv = ["guestfish", f"--remote={self.pid}", "--", f"-{args[0]}", *args[1:]]
        try:
            out = subprocess.run(
                argv, capture_output=True, text=True, env=self.env, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            self.close()
            raise GuestfsError(
                detail=f"{args[0]} took over {timeout:.0f} s; the appliance was stopped"
            )
        if out.returncode != 0 or "libguestfs: error:" in out.stderr:
            self.last_error = " ".join(out.stderr.replace("libguestfs: error:", "").split())
            return None
        return out.stdout

    def lines(self, *args: str) -> list[str]:
        return [line for line in self.run(*args).splitlines() if line]

    def flag(self, *args: str) -> bool:
        return self.run(*args).strip() == "true"

    def mapping(self, *args: str) -> dict[str, str]:
        """A command that prints ``key: value`` lines (hashtables)."""
        return dict(line.split(": ", 1) for line in self.lines(*args) if ": " in line)

    def read(self, path: str) -> str | None:
        """The text of ``path`` in the guest, or None if it is not a regular file."""
        return self.run("cat", path) if self.flag("is-file", path, "followsymlinks:true") else None

    def glob(self, pattern: str) -> list[str]:
        return self.lines("glob-expand", pattern)

    def write(self, path: str, text: str) -> None:
        self.run("write", path, text)

    def shell(self, line: str, timeout: float = defaults.GUESTFS_COMMAND_TIMEOUT) -> str:
        """``/bin/sh -c line`` chrooted in the guest, with /dev, /proc and /sys bound in."""
        return self.run("sh", line, timeout=timeout)

    def close(self) -> None:
        """Shut the appliance down; kill the server if it does not go."""
        if not self.pid:
            return
        pid, self.pid = self.pid, 0
        subprocess.run(["guestfish", f"--remote={pid}", "--", "exit"], capture_output=True,
                       env=self.env, timeout=120)  # fmt: skip
        deadline = time.monotonic() + 60
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is gone for our purposes (the server is not our child: it daemonised).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def inspect_and_mount(g: Guestfish) -> dict[str, Any]:
    """Find the guest's operating system and mount its filesystems as its fstab has them.

    Returns the inspection facts: ``root`` (appliance device), ``distro``,
    ``product``, ``version``, ``mountpoints`` (guest path to appliance
    device) and ``unmounted`` (mountpoints that could not be mounted, with why).
    """
    roots = g.lines("inspect-os")
    if not roots:
        raise GuestfsError(
            detail="no operating system found on the disks (inspect-os found no root)"
        )
    root = roots[0]
    facts: dict[str, Any] = {
        "root": root,
        "roots": roots,
        "type": g.run("inspect-get-type", root).strip(),
        "distro": g.run("inspect-get-distro", root).strip(),
        "product": g.run("inspect-get-product-name", root).strip(),
        "version": f"{g.run('inspect-get-major-version', root).strip()}."
        f"{g.run('inspect-get-minor-version', root).strip()}",
    }
    mountpoints = g.mapping("inspect-get-mountpoints", root)
    facts["mountpoints"] = mountpoints
    unmounted: dict[str, str] = {}
    facts["unmounted"] = unmounted
    for mountpoint in sorted(mountpoints, key=len):
        how = ["mount-options", "ro"] if g.readonly else ["mount"]
        if g.attempt(*how, mountpoints[mountpoint], mountpoint) is None:
            if mountpoint == "/":
                raise GuestfsError(detail=f"cannot mount the root filesystem: {g.last_error}")
            unmounted[mountpoint] = g.last_error
    return facts
