"""``python -m functions.local``: the configuration server as a process, as operators run it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
CANARY_KEY = "canary-admin-key-" + "q" * 24


def _start(env_extra: dict[str, str], *args: str) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    env.update(env_extra)
    env["PYTHONFAULTHANDLER"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "functions.local", "--port", "0", *args],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"listening on (https?://\S+)", line)
        if match:
            return proc, match.group(1)
    proc.kill()
    raise AssertionError("no 'listening on' line:\n" + "".join(lines))


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=20)
        raise AssertionError(err[-6000:])
    assert proc.returncode == 0, err
    return err


def test_it_serves_the_api_and_runs_the_timer(azurite):
    env = {"FERRY_STORAGE": azurite.connection_string, "FERRY_ADMIN_KEY": CANARY_KEY}
    proc, url = _start(env, "--timer-interval", "0.3")
    try:
        assert requests.get(f"{url}/health", timeout=10).json()["ok"] is True
        tenant = "loc" + str(os.getpid())
        created = requests.post(
            f"{url}/tenants",
            json={"tenant": tenant},
            headers={"Authorization": f"Bearer {CANARY_KEY}"},
            timeout=10,
        )
        assert created.status_code == 201, created.text
        token = created.json()["operator_token"]
        status = requests.get(
            f"{url}/tenants/{tenant}/status",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert status.status_code == 200 and status.json()["machines"] == []
        garbage = requests.post(f"{url}/register", data=b"\x00\xff", timeout=10)
        assert garbage.status_code == 400 and "error" in garbage.json()
        time.sleep(1)  # a few timer runs
    finally:
        err = _stop(proc)
    assert CANARY_KEY not in err and token not in err
    assert f"GET /tenants/{tenant}/status 200" in err
    assert "timer" not in err.lower() or "failed" not in err.lower()


def test_it_serves_https(azurite, certs):
    env = {"FERRY_STORAGE": azurite.connection_string, "FERRY_ADMIN_KEY": CANARY_KEY}
    proc, url = _start(env, "--host", "127.0.0.1", "--tls-cert",
                       str(certs / "process-server.pem"), "--tls-key",
                       str(certs / "process-server.key"), "--verbose")  # fmt: skip
    try:
        assert url.startswith("https://127.0.0.1:")
        answer = requests.get(f"{url}/health", verify=str(certs / "ca" / "ca.pem"), timeout=10)
        assert answer.status_code == 200
        answer.close()  # its socket stays open while the response lives
    finally:
        _stop(proc)


def test_missing_settings_are_one_line_and_exit_two():
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    done = subprocess.run([sys.executable, "-m", "functions.local", "--port", "0"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("config-server: error:") and "FERRY_STORAGE" in lines[-1]
    assert "Traceback" not in done.stderr


def test_a_malformed_connection_string_is_one_line_and_exit_two():
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    env["FERRY_STORAGE"] = "AccountKey=c2VjcmV0;nonsense"
    done = subprocess.run([sys.executable, "-m", "functions.local", "--port", "0"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "not a valid connection string" in done.stderr and "c2VjcmV0" not in done.stderr
