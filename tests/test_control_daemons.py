"""The daemons' server mode on the command line: one clear line for operator errors, patience
with a configuration server that cannot be reached, a clean exit when asked."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from support import ROOT, wait_for
from support.config_server import serve_config

from ferry.control.credentials import Credentials
from ferry.control.defaults import ATTEMPTS

MODULES = ("agent", "processserver", "mastertarget")
COMPONENT = {"agent": "agent", "processserver": "process-server", "mastertarget": "master-target"}


def pki_args(module: str, certs: Path) -> list[str]:
    if module == "mastertarget":
        return []
    name = "agent" if module == "agent" else "process-server"
    return [
        "--ca",
        str(certs / "ca" / "ca.pem"),
        "--cert",
        str(certs / f"{name}.pem"),
        "--key",
        str(certs / f"{name}.key"),
    ]


def run(module: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=timeout,
    )


def closed_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def saved(tmp_path: Path, component_id: str, server: str, token: str = "c.demo.x.SECRET") -> Path:
    path = tmp_path / f"{component_id}.json"
    Credentials(server, "demo", component_id, token).save(path)
    return path


@pytest.mark.parametrize("module", MODULES)
def test_missing_credentials_file_is_one_line_and_exit_2(module, tmp_path, certs):
    state = ["--state-dir", str(tmp_path / "state")]
    result = run(
        module,
        "--server-credentials",
        str(tmp_path / "none.json"),
        *state,
        *pki_args(module, certs),
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"{COMPONENT[module]}: error: credentials file {tmp_path}/none.json: "
        "file not found (register first)"
    )


@pytest.mark.parametrize("module", MODULES)
def test_settings_file_and_credentials_exclude_each_other(module, tmp_path):
    result = run(module, "--config", "a.toml", "--server-credentials", "b.json")
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr


@pytest.mark.parametrize("module", ["agent", "processserver"])
def test_unreadable_certificate_is_named(module, tmp_path, certs):
    creds = saved(tmp_path, "ps-ps1", closed_url())
    args = pki_args(module, certs)
    args[args.index("--cert") + 1] = "/nonexistent/cert.pem"
    result = run(module, "--server-credentials", str(creds), *args)
    assert result.returncode == 2
    assert "--cert: cannot read /nonexistent/cert.pem" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_credentials_of_another_kind_are_refused(tmp_path, certs):
    creds = saved(tmp_path, "ag-web01", closed_url())
    result = run("mastertarget", "--server-credentials", str(creds), "--state-dir", str(tmp_path))
    assert result.returncode == 2
    assert "these are the credentials of ag-web01, not a master target" in result.stderr
    result = run("processserver", "--server-credentials", str(creds), *pki_args("ps", certs))
    assert "not a process server" in result.stderr


class DroppingServer:
    """Accepts connections and resets them at once, counting them: a server nobody reaches."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                self.connections += 1

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def dropping():
    server = DroppingServer()
    yield server
    server.close()


@pytest.mark.parametrize("module", MODULES)
def test_an_unreachable_server_is_waited_for_and_sigterm_exits_cleanly(
    module, tmp_path, certs, dropping
):
    prefix = {"agent": "ag-web01", "processserver": "ps-ps1", "mastertarget": "mt-mt1"}[module]
    creds = saved(tmp_path, prefix, dropping.url)
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                module,
                "--server-credentials",
                str(creds),
                "--state-dir",
                str(tmp_path / "state"),
                *pki_args(module, certs),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    try:
        wait_for(lambda: "retrying" in log.read_text() or proc.poll() is not None, 60,
                 lambda: f"a 'retrying' line: {log.read_text()}")  # fmt: skip
        assert proc.poll() is None, log.read_text()
        # A try is ATTEMPTS connections: once the second try has made its last, its
        # failure is handled before the daemon exits, and must not be logged again.
        connections = 2 * ATTEMPTS
        wait_for(lambda: dropping.connections >= connections or proc.poll() is not None, 60,
                 f"{connections} connections")  # fmt: skip
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert text.count("retrying") == 1, text  # logged once, not on every attempt
    assert "SECRET" not in text


@pytest.fixture(scope="module")
def config_server(tmp_path_factory):
    yield from serve_config(tmp_path_factory, tls=False)


@pytest.mark.parametrize("module", MODULES)
def test_a_refused_token_ends_the_daemon_with_one_line(module, config_server, tmp_path, certs):
    prefix = {"agent": "ag-web01", "processserver": "ps-ps1", "mastertarget": "mt-mt1"}[module]
    creds = saved(tmp_path, prefix, config_server.url, token=f"c.demo.{prefix}.SECRETSECRET")
    result = run(
        module,
        "--server-credentials",
        str(creds),
        "--state-dir",
        str(tmp_path / "state"),
        *pki_args(module, certs),
    )
    assert result.returncode == 8, result.stderr
    lines = [x for x in result.stderr.strip().splitlines() if " error: " in x]
    assert lines and lines[-1].startswith(f"{COMPONENT[module]}: error: the configuration server ")
    assert "(HTTP 401)" in lines[-1] or "(HTTP 403)" in lines[-1]
    assert "SECRET" not in result.stderr
