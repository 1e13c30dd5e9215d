"""ferry.control against the real configuration server (``python -m functions.local``) on Azurite.

:class:`ConfigServer` starts the real server as a process over real HTTP
(or HTTPS with a CA of the test's own); the other ``test_control_*``
modules use it too.  Failure modes the real server never shows on purpose
(5xx, hangs, dropped connections, an error that echoes the token) come
from :class:`FaultyServer`, a few lines of ``http.server`` that misbehave
as asked: it injects faults, it does not stand in for the contract.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

from devkit.azurite import Azurite, free_port
from ferry import control, naming, pki
from ferry.control.client import Client
from ferry.control.commands import CommandPoller
from ferry.control.credentials import Credentials
from ferry.control.errors import ControlRefused, ControlUnavailable, CredentialsInvalid
from ferry.control.settingsource import SettingsSource
from ferry.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "ferry-test-admin-key-" + "k" * 16

needs_server = pytest.mark.skipif(
    not (ROOT / "functions" / "local.py").exists(),
    reason="the configuration server (functions/local.py) is not there yet",
)


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


class Operator:
    """Calls the operator's routes of one tenant."""

    def __init__(self, server: ConfigServer, tenant: str, token: str) -> None:
        self.server, self.tenant, self.token = server, tenant, token

    def call(self, method: str, path: str, body: Any = None) -> Any:
        return self.server.call(method, f"/tenants/{self.tenant}{path}", self.token, body)

    def passphrase(self) -> str:
        return self.call("POST", "/passphrases", {})["passphrase"]

    def register(self, kind: str, name: str, **extra: Any) -> Credentials:
        return control.client.register(
            self.server.url,
            self.tenant,
            self.passphrase(),
            kind,
            name,
            ca=self.server.ca,
            **extra,
        )

    def command(self, machine: str, command: str, **args: Any) -> str:
        body = {"command": command, "args": args} if args else {"command": command}
        return self.call("POST", f"/machines/{machine}/commands", body)["command_id"]

    def protect(self, machine: str, **body: Any) -> dict[str, Any]:
        body.setdefault("idempotency_key", f"protect-{machine}-{uuid.uuid4().hex[:8]}")
        return self.call("POST", f"/machines/{machine}/protect", body)["job"]

    def job(self, job_id: str) -> dict[str, Any]:
        return self.call("GET", f"/jobs/{job_id}")

    def status(self) -> dict[str, Any]:
        return self.call("GET", "/status")


def serve_config(tmp_path_factory, tls: bool = False):
    """Fixture body: the real server on an Azurite of its own (its tables are nobody else's)."""
    base = tmp_path_factory.mktemp("config-server")
    with Azurite(log=str(base / "azurite.log")) as azurite:
        server = ConfigServer(azurite, base, tls=tls).start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="module")
def config_server(tmp_path_factory):
    yield from serve_config(tmp_path_factory, tls=True)


@pytest.fixture
def operator(config_server, tenant) -> Operator:
    return config_server.tenant(tenant)


def agent_disk(tmp_path: Path, name: str = "web01") -> list[dict[str, Any]]:
    image = tmp_path / f"{name}.img"
    image.write_bytes(b"")
    os.truncate(image, 1 << 20)
    return [{"id": f"{name}-disk0", "device": str(image), "size": 1 << 20}]


# -- credentials ------------------------------------------------------------------------


def test_credentials_file_is_private_and_never_shows_the_token(tmp_path):
    creds = Credentials("https://cs.example", "demo", "ag-web01", "c.demo.ag-web01.SECRET", None)
    path = tmp_path / "agent.json"
    creds.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert Credentials.load(path) == creds
    assert "SECRET" not in repr(creds) and "SECRET" not in str(creds)
    assert creds.kind == "agent" and creds.name == "web01"
    assert creds.command_queue == naming.command_queue("demo", "ag-web01")
    for mode in (0o644, 0o640):  # group-readable was once accepted
        path.chmod(mode)
        with pytest.raises(CredentialsInvalid, match="chmod 600") as err:
            Credentials.load(path)
        assert "SECRET" not in str(err.value)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{", "not valid JSON"),
        (
            '{"server": "https://x", "tenant": "demo", "component_id": "ag-w"}',
            "missing or empty token",
        ),
        (
            '{"server": "ftp://x", "tenant": "demo", "component_id": "ag-w", "token": "SECRET"}',
            "server must be an http",
        ),
        (
            '{"server": "https://x", "tenant": "Demo", "component_id": "ag-w", "token": "SECRET"}',
            "tenant 'Demo' is not a valid id",
        ),
        (
            '{"server": "https://x", "tenant": "demo", "component_id": "ag-w", "token": "SECRET",'
            ' "ca": "/nonexistent/ca.pem"}',
            "cannot read the CA file",
        ),
    ],
)
def test_bad_credentials_files_are_one_clear_line(tmp_path, content, problem):
    path = tmp_path / "c.json"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(CredentialsInvalid) as err:
        Credentials.load(path)
    assert problem in str(err.value)
    assert "SECRET" not in str(err.value)
    assert str(err.value).count("\n") == 0


def test_missing_credentials_file_says_register_first(tmp_path):
    with pytest.raises(CredentialsInvalid, match="register first"):
        Credentials.load(tmp_path / "none.json")


# -- registration and the component routes against the real server ----------------------


@needs_server
def test_register_and_save_is_idempotent_and_spends_the_passphrase_once(operator, tmp_path):
    path = tmp_path / "ps.json"
    server = operator.server
    creds = control.client.register_and_save(
        server.url,
        operator.tenant,
        operator.passphrase(),
        "process-server",
        "ps1",
        path,
        ca=server.ca,
        listen="127.0.0.1:7443",
    )
    assert creds.component_id == "ps-ps1"
    assert path.stat().st_mode & 0o777 == 0o600
    assert json.loads(path.read_text())["ca"] == server.ca
    again = control.client.register_and_save(
        server.url, operator.tenant, "not-a-passphrase", "process-server", "ps1", path
    )
    assert again == creds  # nothing was sent: the bogus passphrase was never tried
    with pytest.raises(CredentialsInvalid, match="holds the credentials of ps-ps1"):
        control.client.register_and_save(
            server.url, operator.tenant, "not-a-passphrase", "master-target", "mt1", path
        )
    with pytest.raises(CredentialsInvalid, match="not writable"):
        control.client.register_and_save(
            server.url, operator.tenant, "x", "agent", "web01", tmp_path / "no" / "dir.json"
        )
    assert Client(creds).component()["component_id"] == "ps-ps1"


@needs_server
def test_a_wrong_passphrase_is_refused_with_the_servers_line(operator):
    secret = "wrong-passphrase-" + uuid.uuid4().hex
    with pytest.raises(ControlRefused) as err:
        control.client.register(
            operator.server.url,
            operator.tenant,
            secret,
            "agent",
            "web01",
            ca=operator.server.ca,
        )
    assert err.value.status in (401, 403)
    assert secret not in str(err.value)
    assert str(err.value).startswith("the configuration server refused POST /register: ")


@needs_server
def test_tls_is_verified_against_the_credentials_ca(operator, tmp_path):
    creds = operator.register("process-server", "ps1", listen="127.0.0.1:7443")
    Client(creds).component()
    with pytest.raises(ControlUnavailable, match="CERTIFICATE_VERIFY_FAILED|certificate"):
        Client(Credentials(creds.server, creds.tenant, creds.component_id, creds.token)).component()


@needs_server
def test_component_routes_with_real_credentials(operator, tmp_path):
    ps = operator.register("process-server", "ps1", listen="127.0.0.1:7443")
    mt = operator.register("master-target", "mt1", target_dir=str(tmp_path / "targets"))
    agent = operator.register("agent", "web01", disks=agent_disk(tmp_path))
    for creds in (ps, mt, agent):
        client = Client(creds)
        client.heartbeat({"state": "testing"})
        grant = client.storage_grant()
        assert creds.command_queue in grant["queues"]
        storage = client.open_storage()
        assert storage.receive(creds.command_queue) == []
    from agent.settings import Settings as AgentSettings

    source = SettingsSource(Client(agent), AgentSettings, local={"state_dir": str(tmp_path)})
    assert source.fetch_raw() is None  # 409: not protected yet
    operator.protect("web01")
    raw = source.fetch_raw()
    assert raw["process_server"] == "127.0.0.1:7443"
    settings = source.build({**raw, "ca": "ca.pem", "cert": "a.pem", "key": "a.key"})
    assert [d.id for d in settings.disks] == ["web01-disk0"]
    assert settings.state_dir == str(tmp_path)
    Client(agent).report_disk("web01-disk0", {"phase": "initial-sync", "gen": 1, "rpo_s": 2.5})
    tag = {"id": "web01-1", "kind": "crash", "t0_wall": time.time(), "frozen": False}
    Client(mt).recovery_point("web01-disk0", tag, 1, 3)
    Client(mt).recovery_point("web01-disk0", tag, 1, 3)  # idempotent
    disk = operator.status()["machines"][0]["disks"][0]
    assert (disk["phase"], disk["rpo_s"]) == ("initial-sync", 2.5)
    points = operator.call("GET", "/recovery-points?disk=web01-disk0")["recovery_points"]
    assert [p["tag_id"] for p in points] == ["web01-1"]
    with pytest.raises(ControlRefused) as err:
        Client(agent).report_disk("other-disk", {"phase": "x"})
    assert err.value.status == 404


@needs_server
def test_rotated_credentials_are_saved_and_the_old_token_dies(operator, tmp_path):
    path = tmp_path / "agent.json"
    creds = control.client.register_and_save(
        operator.server.url,
        operator.tenant,
        operator.passphrase(),
        "agent",
        "web01",
        path,
        ca=operator.server.ca,
        disks=agent_disk(tmp_path),
    )
    client = Client(creds)
    poller = CommandPoller(
        client,
        client.open_storage(),
        tmp_path / "state",
        {"rotate-credentials": control.commands.rotate_handler(client, path)},
    )
    command = operator.command("web01", "rotate-credentials")
    deadline = time.monotonic() + 30
    while poller.handled == 0 and time.monotonic() < deadline:
        poller.poll_once()
    saved = Credentials.load(path)
    assert saved.token != creds.token
    assert client.credentials == saved
    assert poller.journal.get(command)["reported"]
    assert "token" not in json.dumps(poller.journal.get(command))
    Client(saved).heartbeat({})
    with pytest.raises(ControlRefused) as err:
        Client(creds).heartbeat({})
    assert err.value.status == 401


# -- failure modes ------------------------------------------------------------------------


class FaultyServer:
    """Answers from a script: each request pops the next (status, body, delay) entry."""

    def __init__(self, script: list[tuple[int, Any, float]]) -> None:
        self.script = list(script)
        self.requests: list[tuple[str, str, dict]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null")
                outer.requests.append((self.command, self.path, dict(self.headers), body))
                status, reply, delay = outer.script.pop(0) if outer.script else (204, None, 0)
                time.sleep(delay)
                if reply == "echo-auth":
                    reply = {"error": f"bad token {self.headers.get('Authorization')}"}
                data = b"" if reply is None else json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def faulty():
    made = []

    def make(*script):
        server = FaultyServer(list(script))
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


@pytest.fixture(autouse=False)
def fast_retries(monkeypatch):
    monkeypatch.setattr(control.defaults, "BACKOFF_FIRST", 0.01)
    monkeypatch.setattr(control.defaults, "BACKOFF_MAX", 0.02)


def creds_for(url: str) -> Credentials:
    return Credentials(url, "demo", "ag-web01", "c.demo.ag-web01.TOPSECRET")


def test_5xx_is_retried_until_it_works(faulty, fast_retries):
    server = faulty((503, {"error": "busy"}, 0), (502, None, 0), (204, None, 0))
    Client(creds_for(server.url)).heartbeat({"a": 1})
    assert len(server.requests) == 3
    method, path, headers, body = server.requests[-1]
    assert (method, path, body) == ("POST", "/components/self/heartbeat", {"status": {"a": 1}})
    assert headers["Authorization"] == "Bearer c.demo.ag-web01.TOPSECRET"


def test_persistent_5xx_is_retryable_unavailability(faulty, fast_retries):
    server = faulty(*[(500, {"error": "boom"}, 0)] * control.defaults.ATTEMPTS)
    with pytest.raises(ControlUnavailable, match="HTTP 500 boom") as err:
        Client(creds_for(server.url)).settings()
    assert err.value.retryable
    assert len(server.requests) == control.defaults.ATTEMPTS


def test_4xx_is_fatal_at_once_and_never_shows_the_token(faulty, fast_retries):
    server = faulty((401, "echo-auth", 0))
    with pytest.raises(ControlRefused) as err:
        Client(creds_for(server.url)).storage_grant()
    assert len(server.requests) == 1
    assert err.value.status == 401 and not err.value.retryable
    assert "TOPSECRET" not in str(err.value)
    assert "bad token Bearer ***" in str(err.value)


def test_registration_is_not_retried_once_it_may_have_arrived(faulty, fast_retries):
    server = faulty((503, {"error": "busy"}, 0), (201, {"component_id": "ag-w", "token": "t"}, 0))
    with pytest.raises(ControlUnavailable, match="503"):
        control.client.register(server.url, "demo", "PASSPHRASE", "agent", "web01")
    assert len(server.requests) == 1


def test_unreachable_and_hung_servers_are_unavailable(faulty, fast_retries, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(ControlUnavailable, match="Connection refused|NewConnectionError"):
        Client(creds_for(closed)).heartbeat({})
    with pytest.raises(ControlUnavailable):
        control.client.register(closed, "demo", "PASSPHRASE", "agent", "web01")  # not sent: retried
    monkeypatch.setattr(control.defaults, "READ_TIMEOUT", 0.3)
    hung = faulty(*[(204, None, 1.0)] * control.defaults.ATTEMPTS)
    with pytest.raises(ControlUnavailable, match="timed out|Timeout"):
        Client(creds_for(hung.url)).heartbeat({})


def test_details_are_sent_as_one_bounded_line(faulty):
    server = faulty()
    client = Client(creds_for(server.url))
    client.command_done("cmd-1", "done", {"tag": {"id": "t-1"}})
    client.command_done("cmd-2", "failed", "x\n" * 2000)
    assert server.requests[0][3] == {"state": "done", "detail": '{"tag": {"id": "t-1"}}'}
    detail = server.requests[1][3]["detail"]
    assert "\n" not in detail and len(detail) == control.defaults.DETAIL_MAX


def test_hooks_and_control_socket_are_never_taken_from_the_server(faulty, tmp_path, caplog):
    """A server (or a stolen operator credential) once made every agent run a shell line as
    root and delete a file of its choosing: only the host sets hooks and the socket."""
    from agent.settings import Settings as AgentSettings

    server = faulty((200, {
        "tenant": "demo", "machine": "web01", "process_server": "127.0.0.1:7443",
        "disks": [{"id": "web01-disk0", "device": "/dev/loop9"}],
        "pre_hook": f"touch {tmp_path}/pwned", "post_hook": "true",
        "control_socket": "/etc/passwd",
    }, 0))  # fmt: skip
    local = {"state_dir": str(tmp_path), "ca": "ca", "cert": "c", "key": "k", "post_hook": "sync"}
    source = SettingsSource(Client(creds_for(server.url)), AgentSettings, local=local)
    settings = source.fetch()
    assert settings.pre_hook is None and settings.control_socket is None
    assert settings.post_hook == "sync"  # the host's own
    assert "ignoring pre_hook from the configuration server" in caplog.text


def test_settings_source_fills_local_keys_and_ignores_unknown_ones(faulty):
    from mastertarget.settings import Settings as MtSettings

    server = faulty(
        (
            200,
            {
                "tenant": "demo",
                "disks": [{"id": "web01-disk0", "target": "/srv/t.img", "size": 9}],
                "storage": {"containers": {}},
                "lease_seconds": 30,
                "state_dir": "/server/side",
            },
            0,
        ),
        (200, {"tenant": "demo", "disks": [{"id": "web01-disk0", "target": 5}]}, 0),
    )
    source = SettingsSource(Client(creds_for(server.url)), MtSettings, local={"state_dir": "/here"})
    settings = source.fetch()
    assert str(settings.state_dir) == "/here"  # local wins
    assert settings.lease_seconds == 30 and str(settings.disks[0].target) == "/srv/t.img"
    with pytest.raises(ConfigError, match=r"disks\[0\]\.target must be a non-empty string") as err:
        source.fetch()
    assert server.url in str(err.value)
