"""``python -m functions.local``: the configuration server as a process, as operators run it."""

from __future__ import annotations

import os
import subprocess
import sys

import requests
from support import ROOT, wait_for
from support.config_server import start_local, stop_local, wait_logged

from functions.core import defaults

CANARY_KEY = "canary-admin-key-" + "q" * 24


def test_it_serves_the_api_and_runs_the_timer(azurite, api):
    # A component silent for longer than the heartbeat TTL (its last heartbeat
    # sent with the in-process server's clock set back): only the timer of the
    # process under test can mark it lost and raise the alert.
    estate = api.estate()
    api.clock.advance(-(defaults.HEARTBEAT_TTL + 5))
    assert api.post("/components/self/heartbeat", estate.agent, {}).status_code == 204
    env = {"FERRY_STORAGE": azurite.connection_string, "FERRY_ADMIN_KEY": CANARY_KEY}
    proc, url = start_local(env, "--timer-interval", "0.3")
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

        def lost_alerts():
            answer = requests.get(
                f"{url}/tenants/{estate.tenant}/alerts",
                headers={"Authorization": f"Bearer {estate.operator}"},
                timeout=10,
            )
            assert answer.status_code == 200, answer.text
            return [a for a in answer.json()["alerts"] if a["kind"] == "heartbeat-lost"]

        (alert,) = wait_for(lost_alerts, 60, "the timer to raise a heartbeat-lost alert")
        assert alert["subject"] == "ag-web01" and alert["cleared_at"] is None
        # This process's timer ran a whole sweep (another server on the same
        # Azurite may have raised the alert first; a sweep of a shared Azurite
        # full of other tests' tenants can take seconds).
        wait_logged(proc, r"monitoring: \d+ lost", 120)
    finally:
        err = stop_local(proc)
    assert CANARY_KEY not in err and token not in err
    assert f"GET /tenants/{tenant}/status 200" in err
    assert "timer monitor failed" not in err


def test_it_serves_https(azurite, certs):
    env = {"FERRY_STORAGE": azurite.connection_string, "FERRY_ADMIN_KEY": CANARY_KEY}
    proc, url = start_local(env, "--host", "127.0.0.1", "--tls-cert",
                       str(certs / "process-server.pem"), "--tls-key",
                       str(certs / "process-server.key"), "--verbose")  # fmt: skip
    try:
        assert url.startswith("https://127.0.0.1:")
        answer = requests.get(f"{url}/health", verify=str(certs / "ca" / "ca.pem"), timeout=10)
        assert answer.status_code == 200
        answer.close()  # its socket stays open while the response lives
    finally:
        stop_local(proc)


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
