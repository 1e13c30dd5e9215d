"""The three daemons of one machine in server mode, as processes: :class:`Fleet`.

Each is started with ``--server-credentials`` (registered through an
:class:`~support.operator.Operator`), logs to ``<base>/<kind>.log`` and keeps
its state under ``<base>/<kind>``; the agent's status is read from its
``status.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from devkit.azurite import free_port
from ferry.control.client import register_and_save
from support import ROOT
from support.operator import Operator

MODULES = {"agent": "agent", "process-server": "processserver", "master-target": "mastertarget"}
"""The module each kind of component runs as."""


class Fleet:
    """The three daemons of one machine, in server mode, as processes."""

    def __init__(self, base: Path, operator: Operator, certs: Path, machine: str) -> None:
        self.base = base
        self.operator = operator
        self.certs = certs
        self.machine = machine
        self.ps_port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.creds: dict[str, Path] = {}

    def register(self, device: str, size: int) -> None:
        server, op = self.operator.server, self.operator
        for kind, name, extra in (
            ("process-server", "ps1", {"listen": f"127.0.0.1:{self.ps_port}"}),
            ("master-target", "mt1", {"target_dir": str(self.base / "targets")}),
            (
                "agent",
                self.machine,
                {"disks": [{"id": f"{self.machine}-disk0", "device": device, "size": size}]},
            ),
        ):
            path = self.base / f"{kind}.json"
            register_and_save(
                server.url, op.tenant, op.passphrase(), kind, name, path, ca=server.ca, **extra
            )
            self.creds[kind] = path

    def args(self, kind: str) -> list[str]:
        state = ["--state-dir", str(self.base / kind)]
        pki = self.certs
        if kind == "agent":
            tls = ["--cert", str(pki / "agent.pem"), "--key", str(pki / "agent.key")]
        elif kind == "process-server":
            tls = [
                "--cert",
                str(pki / "process-server.pem"),
                "--key",
                str(pki / "process-server.key"),
            ]
        else:  # the master target: its targets directory, as registered (the role does the same)
            return [*state, "--targets-dir", str(self.base / "targets")]
        return [*state, "--ca", str(pki / "ca" / "ca.pem"), *tls]

    def start(self, kind: str, argv: list[str] | None = None) -> None:
        """Start ``kind`` with its credentials and :meth:`args`, or exactly as ``argv`` says."""
        cmd = [sys.executable, "-m", MODULES[kind], "--server-credentials", str(self.creds[kind])]
        with open(self.base / f"{kind}.log", "ab") as log:
            self.procs[kind] = subprocess.Popen(
                argv or [*cmd, *self.args(kind)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
            )

    def alive(self, *kinds: str) -> None:
        for kind in kinds or list(self.procs):
            proc = self.procs[kind]
            if proc.poll() is not None:
                raise AssertionError(f"{kind} exited ({proc.returncode}): {self.tail(kind)}")

    def tail(self, kind: str, lines: int = 15) -> str:
        text = (self.base / f"{kind}.log").read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def agent_status(self) -> dict[str, Any]:
        try:
            return json.loads((self.base / "agent" / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def wait(self, what: str, check, timeout: float = 180) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.alive(*[k for k in self.procs if k != "agent" or what != "agent exit"])
            found = check()
            if found:
                return found
            time.sleep(0.3)
        logs = "\n".join(f"--- {k}\n{self.tail(k)}" for k in self.procs)
        raise AssertionError(f"timed out waiting for {what}\n{logs}")

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        instances = Path("/sys/kernel/tracing/instances")
        for inst in instances.glob(f"ferry-{self.machine}-*"):
            with contextlib.suppress(OSError):
                inst.rmdir()


def write_files(root: Path, count: int, size: int, seed: int) -> None:
    """``count`` files of ``size`` random bytes (seeded) under ``root/data``, synced."""
    rng = __import__("random").Random(seed)
    (root / "data").mkdir(exist_ok=True)
    for i in range(count):
        (root / "data" / f"f{seed}-{i:03d}").write_bytes(rng.randbytes(size))
    os.sync()
