"""The `ferry` CLI against a real configuration server process (functions.local + Azurite)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support.config_server import start_local, stop_local

from devkit.azurite import Azurite

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


def operator(server: str, tenant: str) -> dict[str, str]:
    """A new tenant's operator environment for the CLI."""
    created = ferry("tenant", "create", tenant, "--server", server, "--token", ADMIN, "--json")
    assert created.returncode == 0, created.stderr
    return {"FERRY_SERVER": server, "FERRY_TOKEN": json.loads(created.stdout)["operator_token"]}


def one_line(result: subprocess.CompletedProcess, code: int, *parts: str) -> str:
    """The single error line of a failed run, checked for its exit code and parts."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, (result.returncode, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("ferry: error: "), lines
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


def test_every_refusal_the_server_can_send_is_one_line_with_its_code(
    server, tenant, azurite, tmp_path
):
    env = operator(server, tenant)
    token = env["FERRY_TOKEN"]
    other = operator(server, tenant + "x")

    bad = ferry("status", "--server", server, "--token", f"op.{tenant}.BADSECRET")
    line = one_line(bad, 8, f"refused GET /tenants/{tenant}/status:", "(HTTP 401)")
    assert "BADSECRET" not in line
    one_line(ferry("status", "--tenant", tenant + "x", env=env), 8, "another tenant", "(HTTP 403)")
    one_line(ferry("jobs", "job-nope", env=env), 8, "(HTTP 404)")
    # The body (with the CLI's idempotency key) passes; the machine does not exist.
    one_line(ferry("tag", "web99", env=env), 8, "machines/web99/commands:", "(HTTP 404)")
    again = ferry("tenant", "create", tenant, "--server", server, "--token", ADMIN)
    assert ADMIN not in one_line(again, 8, f"tenant {tenant} already exists (HTTP 409)")

    # Five wrong passphrases lock registration for the tenant: 429 with the wait.
    register = ("register", "--kind", "agent", "--name", "web01", "--out", str(tmp_path / "c.json"))
    for n in range(5):
        wrong = ferry(*register, "--passphrase", f"wrong{n}", env=other)
        one_line(wrong, 8, "wrong passphrase (HTTP 401)")
    locked = ferry(*register, "--passphrase", "wrong5", env=other)
    assert "wrong5" not in one_line(locked, 8, "too many wrong passphrases", "(HTTP 429)")

    # An answer that is not the configuration server's JSON (here Azurite's XML).
    blob = azurite.connection_string.split("BlobEndpoint=")[1].split(";")[0]
    xml = ferry("status", env={**env, "FERRY_SERVER": blob.rsplit("/", 1)[0]})
    one_line(xml, 8, "application/xml, not Ferry's JSON: is the URL right?", "(HTTP 4")
    assert token not in xml.stderr


def test_an_unreachable_or_misnamed_server_is_one_line(server, tenant):
    down = ferry(
        "status", "--server", "http://127.0.0.1:9", "--token", "secret", "--tenant", tenant
    )
    one_line(down, 75, "the configuration server at http://127.0.0.1:9 is unavailable", "refused")

    not_tls = ferry("status", "--server", server.replace("http:", "https:"), "--token", "x",
                    "--tenant", tenant)  # fmt: skip
    one_line(not_tls, 14, "TLS to the configuration server", "check the CA")

    one_line(ferry("status"), 2, "no configuration server")
    one_line(ferry("status", "--server", "127.0.0.1:7071", "--tenant", tenant), 2, "http://")
    no_ca = ferry("status", "--server", server, "--ca", "/nonexistent/ca.pem", "--tenant", tenant)
    one_line(no_ca, 2, "cannot read the CA file /nonexistent/ca.pem")


def test_an_untrusted_server_certificate_is_one_line_and_the_right_ca_works(azurite, certs, tenant):
    proc, url = start_local(
        {"FERRY_STORAGE": azurite.connection_string, "FERRY_ADMIN_KEY": ADMIN},
        "--tls-cert", str(certs / "process-server.pem"), "--tls-key", str(certs / "process-server.key"),
    )  # fmt: skip
    try:
        assert url.startswith("https://")
        create = ("tenant", "create", tenant, "--server", url, "--token", ADMIN)
        untrusted = ferry(*create)
        one_line(untrusted, 14, "CERTIFICATE_VERIFY_FAILED", "check the CA (--ca, FERRY_CA)")
        rogue = ferry(*create, "--ca", str(certs / "rogue-ca" / "ca.pem"))
        one_line(rogue, 14, "CERTIFICATE_VERIFY_FAILED")
        trusted = ferry(*create, env={"FERRY_CA": str(certs / "ca" / "ca.pem")})
        assert trusted.returncode == 0 and f"tenant {tenant} created" in trusted.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)


def test_a_server_whose_storage_is_gone_is_one_line_and_retry_later(tenant):
    """The real app answers 503 when its storage fails; the CLI retries, then says so."""
    own = Azurite().start()  # this test stops it
    proc = None
    try:
        proc, url = start_local({"FERRY_STORAGE": own.connection_string, "FERRY_ADMIN_KEY": ADMIN})
        env = operator(url, tenant)
        own.stop()
        result = ferry("status", env=env)
        one_line(
            result,
            75,
            f"{url} is unavailable: GET /tenants/{tenant}/status: HTTP 503 storage is unavailable",
        )
        assert env["FERRY_TOKEN"] not in result.stderr
    finally:
        own.stop()
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=20)


def test_protect_of_an_unknown_machine_is_refused_clearly(server, tenant):
    result = ferry("protect", "web99", env=operator(server, tenant))
    one_line(result, 8, f"refused POST /tenants/{tenant}/machines/web99/protect:", "(HTTP 404)")


def test_an_unknown_command_id_is_refused_clearly(server, tenant):
    result = ferry("command", "cmd-0000", env=operator(server, tenant))
    assert result.stderr.strip() == (
        f"ferry: error: the configuration server refused GET /tenants/{tenant}/commands/cmd-0000: "
        "command cmd-0000 does not exist (HTTP 404)"
    ), result.stderr
    assert result.returncode == 8


def test_a_command_to_an_unknown_component_is_refused_clearly(server, tenant):
    result = ferry("component", "ps-nope", "stop", env=operator(server, tenant))
    one_line(result, 8, "component ps-nope does not exist (HTTP 404)")


def test_tables_are_drawn_with_rich_on_a_terminal(server, tenant):
    env = operator(server, tenant)
    drawn = ferry("status", env={**env, "FORCE_COLOR": "1", "COLUMNS": "160"})
    assert drawn.returncode == 0, drawn.stderr
    assert "\x1b[" in drawn.stdout, "a terminal gets rich's styled output"
    text = re.sub(r"\x1b\[[0-9;]*m", "", drawn.stdout)
    header = next(line for line in text.splitlines() if "MACHINE" in line)
    assert "COMPONENT" in text and "─" in text, text
    assert header.split()[:3] == ["MACHINE", "DISK", "PHASE"]
    for cmd in (["alerts"], ["jobs"], ["recovery-points"]):
        result = ferry(*cmd, env={**env, "FORCE_COLOR": "1"})
        assert result.returncode == 0 and "─" in result.stdout, (cmd, result.stdout)


@pytest.mark.parametrize("terminal", [False, True], ids=["pipe", "terminal"])
def test_status_watch_redraws_until_interrupted(server, tenant, terminal):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    env.update(operator(server, tenant), PYTHONPATH=str(ROOT))
    if terminal:
        env.update(FORCE_COLOR="1", COLUMNS="200")  # rich's live display, as on a terminal
    watch = subprocess.Popen(
        [sys.executable, "-m", "ferrycli.main", "status", "--watch", "--interval", "0.2"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # Ctrl-C as on a terminal: a suite started in the background (`make test &`)
        # passes SIGINT on ignored, and an ignored SIGINT never reaches Python.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    seen = []
    while sum("ferry status" in line for line in seen) < 2:
        line = watch.stdout.readline()
        assert line, watch.stderr.read()
        seen.append(line)
    watch.send_signal(signal.SIGINT)
    out, err = watch.communicate(timeout=20)
    assert watch.returncode == 0, err
    shown = "".join(seen)
    assert "PROGRESS" in re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", shown), seen
    assert ("(Ctrl-C to stop)" in shown) == terminal and ("\x1b[" in shown) == terminal, seen


def test_version_and_shell_completion():
    version = ferry("--version")
    assert version.returncode == 0
    from ferry import __version__

    assert version.stdout.strip() == f"ferry {__version__}"
    script = ferry("--print-completion", "bash")
    assert script.returncode == 0, script.stderr
    assert "complete " in script.stdout and "ferry" in script.stdout
    assert ferry("--print-completion", "powershell-2").returncode == 2


def test_completion_answers_the_shell(tmp_path):
    """What bash asks through argcomplete's protocol: the words that complete ``ferry st``."""
    out = tmp_path / "words"
    line = "ferry st"
    env = {
        "_ARGCOMPLETE": "1", "_ARGCOMPLETE_IFS": "\n", "COMP_LINE": line,
        "COMP_POINT": str(len(line)), "_ARGCOMPLETE_STDOUT_FILENAME": str(out),
    }  # fmt: skip
    result = ferry(env=env)
    assert result.returncode == 0, result.stderr
    assert out.read_text().split() == ["status"]
