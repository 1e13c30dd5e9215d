"""The `ferry` CLI against a real configuration server process (functions.local + Azurite)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.config_server import start_local, stop_local

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "cli-admin-key-" + "z" * 24


def ferry(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    return subprocess.run(
        [sys.executable, "-m", "ferrycli.main", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**base, "PYTHONPATH": str(ROOT), **(env or {})},
        timeout=60,
    )


@pytest.fixture(scope="module")
def server(azurite):
    proc, url = start_local({"FERRY_STORAGE": azurite.connection_string, "FERRY_ADMIN_KEY": ADMIN})
    yield url
    stop_local(proc)


def test_tenant_passphrase_and_status(server, tenant):
    created = ferry("tenant", "create", tenant, "--server", server, "--token", ADMIN, "--json")
    assert created.returncode == 0, created.stderr
    token = json.loads(created.stdout)["operator_token"]
    assert token.startswith(f"op.{tenant}.")
    env = {"FERRY_SERVER": server, "FERRY_TOKEN": token}

    pp = ferry("passphrase", "--ttl", "600", env=env)
    assert pp.returncode == 0 and "single use" in pp.stdout, pp.stderr

    table = ferry("status", env=env)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split()[:3] == ["MACHINE", "DISK", "PHASE"]
    as_json = json.loads(ferry("status", "--json", env=env).stdout)
    assert as_json["machines"] == [] and as_json["components"] == []

    for cmd in (["alerts"], ["jobs"], ["recovery-points"]):
        result = ferry(*cmd, env=env)
        assert result.returncode == 0, (cmd, result.stderr)


def test_refusals_and_unreachable_server_are_one_line(server, tenant):
    wrong = ferry("status", "--server", server, "--token", "op.nobody.bad", "--tenant", tenant)
    assert wrong.returncode != 0
    lines = wrong.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "ferry: error: configuration server refused (40"
    ), lines

    down = ferry("status", "--server", "http://127.0.0.1:9", "--token", "x", "--tenant", tenant)
    assert down.returncode == 75
    assert (
        down.stderr.strip()
        == "ferry: error: cannot reach configuration server http://127.0.0.1:9: ConnectionError"
    )

    missing = ferry("status")
    assert missing.returncode == 2 and "no configuration server" in missing.stderr


def test_protect_of_an_unknown_machine_is_refused_clearly(server, tenant):
    token = json.loads(
        ferry("tenant", "create", tenant, "--server", server, "--token", ADMIN, "--json").stdout
    )["operator_token"]
    result = ferry("protect", "web99", env={"FERRY_SERVER": server, "FERRY_TOKEN": token})
    assert result.returncode == 8
    assert result.stderr.startswith("ferry: error: configuration server refused (404)"), (
        result.stderr
    )


def test_an_unknown_command_id_is_refused_clearly(server, tenant):
    token = json.loads(
        ferry("tenant", "create", tenant, "--server", server, "--token", ADMIN, "--json").stdout
    )["operator_token"]
    result = ferry("command", "cmd-0000", env={"FERRY_SERVER": server, "FERRY_TOKEN": token})
    assert result.returncode == 8
    assert result.stderr.strip() == (
        "ferry: error: configuration server refused (404): command cmd-0000 does not exist"
    ), result.stderr


def test_a_command_to_an_unknown_component_is_refused_clearly(server, tenant):
    token = json.loads(
        ferry("tenant", "create", tenant, "--server", server, "--token", ADMIN, "--json").stdout
    )["operator_token"]
    env = {"FERRY_SERVER": server, "FERRY_TOKEN": token}
    result = ferry("component", "ps-nope", "stop", env=env)
    assert result.returncode == 8
    assert result.stderr.strip() == (
        "ferry: error: configuration server refused (404): component ps-nope does not exist"
    ), result.stderr
