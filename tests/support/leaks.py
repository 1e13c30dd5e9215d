"""What a test session must not leave behind: loop devices, tracefs instances, processes.

Other sessions run on the same machine at the same time, so only what is
this session's counts:

- loop devices whose backing file lies under the session's base temporary
  directory (every test image does);
- tracefs instances created during the session whose name ends in the pid of
  a process this session started (an agent names its instance
  ``ferry-<machine>-<pid>``; the tracker tests use the pytest process's pid);
- live processes descended from pytest, or carrying the session's marker in
  their environment (daemons that detach from their parent keep it), or
  naming the base temporary directory on their command line or working in
  it (a supervised daemon started with an environment of its own).

:class:`LeakCheck` snapshots at the start and compares at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

TRACEFS_INSTANCES = Path("/sys/kernel/tracing/instances")
MARKER = "FERRY_TEST_SESSION"
"""Environment variable every process the session starts inherits, with the session's id."""


def loop_devices(under: Path) -> dict[str, str]:
    """Attached loop devices whose backing file is under ``under``: {device: file}."""
    try:
        out = subprocess.run(["losetup", "--list", "--json"], capture_output=True, text=True)
        devices = json.loads(out.stdout or "{}").get("loopdevices", [])
    except (OSError, ValueError):
        return {}
    found = {}
    for device in devices:
        backing = (device.get("back-file") or "").removesuffix(" (deleted)")
        if backing.startswith(f"{under}/"):
            found[device["name"]] = backing
    return found


def trace_instances() -> set[str]:
    """Names of the tracefs instances on the machine (empty if tracefs is not readable)."""
    try:
        return {p.name for p in TRACEFS_INSTANCES.iterdir()}
    except OSError:
        return set()


def _stat(pid: str) -> tuple[int, str] | None:
    """(parent pid, state) of a process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0]


def _processes() -> tuple[dict[int, int], dict[int, str]]:
    """({pid: parent pid}, {pid: state}) of every process on the machine."""
    parents, states = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(entry)):
            parents[int(entry)], states[int(entry)] = stat
    return parents, states


def _descends(pid: int, ancestor: int, parents: dict[int, int]) -> bool:
    for _ in range(64):
        pid = parents.get(pid, 0)
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
    return False


def _mounts_of(device: str) -> list[str]:
    """Where ``device`` is mounted (octal escapes such as ``\\040`` decoded)."""
    found = []
    for line in _read("/proc/mounts").decode(errors="replace").splitlines():
        fields = line.split()
        if len(fields) > 1 and fields[0] == device:
            found.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[1]))
    return found


def _cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""


class LeakCheck:
    """The session's footprint at the start, compared with what is left at the end."""

    def __init__(self, basetemp: Path, session: str | None = None) -> None:
        self.basetemp = Path(basetemp)
        self.pid = os.getpid()
        self.session = session or uuid.uuid4().hex  # the value of MARKER in our processes
        self.children: set[int] = set()
        self.loops = set(loop_devices(self.basetemp))
        self.instances = trace_instances()
        self.processes = set(self.session_processes())

    def started(self, pid: int) -> None:
        """Remember a process this session started (its pid may name a tracefs instance)."""
        self.children.add(pid)

    def session_processes(self) -> dict[int, str]:
        """Live processes of this session (see the module's docstring): {pid: command line}."""
        parents, states = _processes()
        ours = {}
        needle = str(self.basetemp).encode()
        marker = f"{MARKER}={self.session}".encode()
        for pid, state in states.items():
            if pid == self.pid or state == "Z":
                continue
            cmdline = _read(f"/proc/{pid}/cmdline")
            if (
                _descends(pid, self.pid, parents)
                or needle in cmdline
                or _cwd(pid).startswith(f"{self.basetemp}/")
                or marker in _read(f"/proc/{pid}/environ").split(b"\0")
            ):
                ours[pid] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
        return ours

    def leftovers(self) -> dict[str, dict]:
        """What this session added and did not remove, by kind (empty kinds left out)."""
        loops = {d: f for d, f in loop_devices(self.basetemp).items() if d not in self.loops}
        ours = {f"ferry-test-{self.pid}"} | {str(pid) for pid in self.children}
        instances = {
            name: ""
            for name in trace_instances() - self.instances
            if name in ours or name.rsplit("-", 1)[-1] in ours
        }
        processes = {
            pid: cmd for pid, cmd in self.session_processes().items() if pid not in self.processes
        }
        found = {"loop devices": loops, "tracefs instances": instances, "processes": processes}
        return {kind: items for kind, items in found.items() if items}

    def settle(self, grace: float = 5.0) -> dict[str, dict]:
        """:meth:`leftovers`, given ``grace`` seconds for things being torn down to go."""
        deadline = time.monotonic() + grace
        while (found := self.leftovers()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return found

    def clean(self, found: dict[str, dict]) -> None:
        """Remove what leaked, so that the machine is left as it was found."""
        leaked = set(found.get("processes", {}))
        parents, _ = _processes()
        for pid in parents:  # their children too, or they would live on as orphans
            if pid not in leaked and any(_descends(pid, top, parents) for top in leaked):
                leaked.add(pid)
        for pid in leaked:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for name in found.get("tracefs instances", {}):
            with contextlib.suppress(OSError):
                (TRACEFS_INSTANCES / name / "tracing_on").write_text("0")
                (TRACEFS_INSTANCES / name).rmdir()
        for device in found.get("loop devices", {}):
            for mountpoint in _mounts_of(device):  # lazily: a leaked mount may still be busy
                subprocess.run(["umount", "-l", mountpoint], capture_output=True)
            subprocess.run(["losetup", "-d", device], capture_output=True)


def describe(found: dict[str, dict]) -> list[str]:
    """One line per leaked thing."""
    lines = []
    for kind, items in found.items():
        for key, detail in items.items():
            lines.append(f"{kind}: {key}" + (f" ({detail[:200]})" if detail else ""))
    return lines
