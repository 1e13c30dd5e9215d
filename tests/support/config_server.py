"""The configuration server as a process: ``python -m functions.local`` on an Azurite.

:class:`ConfigServer` is the server the ``test_control_*`` modules talk to
over real HTTP (or HTTPS with a CA of the test's own), with an Azurite of
its own; :func:`start_local` starts it the way an operator does and reads
the URL from its "listening on" line.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests

from devkit.azurite import Azurite, free_port
from ferry import pki
from support import ROOT
from support.operator import Operator

ADMIN_KEY = "ferry-test-admin-key-" + "k" * 16
"""The admin key every :class:`ConfigServer` is started with."""


class ConfigServer:
    """The real configuration server as a process, with an operator's helpers."""

    def __init__(self, azurite, base: Path, tls: bool = False) -> None:
        self.azurite = azurite
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.ca: str | None = None
        self.tls_args: list[str] = []
        if tls:
            pki.make_ca(self.base / "cs-ca", name="Config Server Test CA")
            cert, key = pki.issue(
                self.base / "cs-ca", self.base, "config-server", ["localhost", "127.0.0.1"]
            )
            self.ca = str(self.base / "cs-ca" / "ca.pem")
            self.tls_args = ["--tls-cert", str(cert), "--tls-key", str(key)]
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = self.base / "config-server.log"

    def start(self, timeout: float = 60) -> ConfigServer:
        env = {
            **os.environ,
            "FERRY_STORAGE": self.azurite.connection_string,
            "FERRY_ADMIN_KEY": ADMIN_KEY,
            "PYTHONPATH": str(ROOT),
        }
        args = [sys.executable, "-m", "functions.local", "--port", str(self.port)]
        args += ["--timer-interval", "2", *self.tls_args]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"config server exited: {self.log.read_text()[-2000:]}")
            try:
                if requests.get(f"{self.url}/health", timeout=1, verify=self.ca or True).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"config server did not answer: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    # -- an operator --------------------------------------------------------------------

    def call(self, method: str, path: str, token: str, body: Any = None) -> Any:
        answer = requests.request(
            method,
            self.url + path,
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
            verify=self.ca or True,
        )
        assert answer.status_code < 300, f"{method} {path}: {answer.status_code} {answer.text}"
        return answer.json() if answer.content else None

    def tenant(self, tenant: str) -> Operator:
        token = self.call("POST", "/tenants", ADMIN_KEY, {"tenant": tenant})["operator_token"]
        return Operator(self, tenant, token)


def serve_config(tmp_path_factory, tls: bool = False):
    """Fixture body: the real server on an Azurite of its own (its tables are nobody else's)."""
    base = tmp_path_factory.mktemp("config-server")
    with Azurite(log=str(base / "azurite.log")) as azurite:
        server = ConfigServer(azurite, base, tls=tls).start()
        try:
            yield server
        finally:
            server.stop()


def start_local(env_extra: dict[str, str], *args: str) -> tuple[subprocess.Popen, str]:
    """``python -m functions.local --port 0 *args``; (process, its URL).

    Its stderr is drained by a thread from the start (a full pipe would stall the
    server), so a test can wait for a line with :func:`wait_logged` while it runs.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    env.update(env_extra)
    env["PYTHONFAULTHANDLER"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "functions.local", "--port", "0", *args],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []

    def drain() -> None:
        for line in proc.stderr:
            lines.append(line)

    reader = threading.Thread(target=drain, daemon=True)
    _LOGS[proc.pid] = (lines, reader)
    reader.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        match = re.search(r"listening on (https?://\S+)", "".join(lines))
        if match:
            return proc, match.group(1)
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    reader.join(10)
    raise AssertionError("no 'listening on' line:\n" + "".join(lines))


_LOGS: dict[int, tuple[list[str], threading.Thread]] = {}


def wait_logged(proc: subprocess.Popen, pattern: str, timeout: float) -> str:
    """The first line the running server logged matching ``pattern``; fails after ``timeout`` s."""
    lines, _ = _LOGS[proc.pid]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(lines):
            if re.search(pattern, line):
                return line
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(
        f"no line matching {pattern!r} within {timeout:g} s:\n" + "".join(lines)[-3000:]
    )


def stop_local(proc: subprocess.Popen) -> str:
    """SIGTERM, then its stderr; fails unless it exits 0 within 20 s (SIGABRT shows where)."""
    lines, reader = _LOGS.pop(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        proc.wait(timeout=20)
        reader.join(10)
        raise AssertionError("".join(lines)[-6000:]) from None
    reader.join(10)
    err = "".join(lines)
    assert proc.returncode == 0, err
    return err
