"""Shared helpers for the configuration server's tests: a real Azurite, the real ASGI app.

``api`` (fixture) is the whole configuration server on the session's Azurite,
reached through its ASGI app exactly as uvicorn would call it; its clock can
be moved forward (``api.clock.advance(s)``) to test expiries without waiting.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any
from urllib.parse import urlencode

import pytest

from functions import local
from functions.core import context

ADMIN_KEY = "admin-key-for-tests-" + "x" * 12


class Clock:
    """Real time plus an offset that tests move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class Response:
    """What the ASGI app answered."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status_code = status
        self.headers = headers
        self.content = body

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def __repr__(self) -> str:
        return f"<Response {self.status_code} {self.text[:300]}>"


def call_asgi(app, method: str, path: str, body: bytes = b"", headers=None, query=None):
    """One request through an ASGI app (as a server would make it); returns a Response."""
    raw_headers = [(b"host", b"testserver")]
    for name, value in (headers or {}).items():
        raw_headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
        "query_string": urlencode(query or {}).encode(), "headers": raw_headers,
        "client": ("127.0.0.1", 50000), "server": ("testserver", 80),
    }  # fmt: skip
    sent = {"body": b"", "status": 0, "headers": {}}
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if pending:
            return pending.pop(0)
        await asyncio.sleep(3600)

    async def send(message):
        if message["type"] == "http.response.start":
            sent["status"] = message["status"]
            sent["headers"] = {k.decode(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            sent["body"] += message.get("body", b"")

    asyncio.run(app(scope, receive, send))
    return Response(sent["status"], sent["headers"], sent["body"])


class Api:
    """The configuration server on Azurite, with helpers to act as each kind of caller."""

    def __init__(self, ctx: context.Context, clock: Clock) -> None:
        self.ctx = ctx
        self.clock = clock
        self.app = local.build()

    def request(self, method: str, path: str, token: str | None = None, json_body=None,
                raw: bytes | None = None, query=None, headers=None) -> Response:  # fmt: skip
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["authorization"] = f"Bearer {token}"
        body = raw if raw is not None else b""
        if json_body is not None:
            body = json.dumps(json_body).encode()
            all_headers.setdefault("content-type", "application/json")
        return call_asgi(self.app, method, path, body, all_headers, query)

    def get(self, path: str, token: str | None = None, **kw) -> Response:
        return self.request("GET", path, token, **kw)

    def post(self, path: str, token: str | None = None, body=None, **kw) -> Response:
        return self.request("POST", path, token, json_body=body, **kw)

    # -- scenario helpers ----------------------------------------------------------------

    def tenant(self, name: str | None = None) -> tuple[str, str]:
        """A new tenant: (id, operator token)."""
        tenant = name or "t" + uuid.uuid4().hex[:10]
        answer = self.post("/tenants", ADMIN_KEY, {"tenant": tenant})
        assert answer.status_code == 201, answer
        return tenant, answer.json()["operator_token"]

    def passphrase(self, tenant: str, operator: str, ttl: int | None = None) -> str:
        body = {} if ttl is None else {"ttl_seconds": ttl}
        answer = self.post(f"/tenants/{tenant}/passphrases", operator, body)
        assert answer.status_code == 201, answer
        return answer.json()["passphrase"]

    def register(self, tenant: str, operator: str, kind: str, name: str, **extra) -> str:
        """Register a component; returns its token."""
        body = {"tenant": tenant, "passphrase": self.passphrase(tenant, operator),
                "kind": kind, "name": name, **extra}  # fmt: skip
        answer = self.post("/register", body=body)
        assert answer.status_code == 201, answer
        return answer.json()["token"]

    def estate(self, machine: str = "web01", disks: int = 2) -> Estate:
        """A tenant with an agent (``disks`` disks), a process server and a master target."""
        tenant, operator = self.tenant()
        disk_list = [
            {"id": f"{machine}-disk{i}", "device": f"/dev/sd{chr(98 + i)}", "size": 1 << 30}
            for i in range(disks)
        ]
        agent = self.register(tenant, operator, "agent", machine, disks=disk_list,
                              host="web01.example")  # fmt: skip
        ps = self.register(tenant, operator, "process-server", "ps1", listen="10.0.0.5:7443")
        mt = self.register(tenant, operator, "master-target", "mt1", target_dir="/srv/targets")
        return Estate(tenant, operator, machine, [d["id"] for d in disk_list], agent, ps, mt)

    def protect(self, estate: Estate, key: str = "protect-1") -> dict[str, Any]:
        answer = self.post(
            f"/tenants/{estate.tenant}/machines/{estate.machine}/protect", estate.operator,
            {"idempotency_key": key},
        )  # fmt: skip
        assert answer.status_code == 202, answer
        return answer.json()["job"]

    def reach_recovery_points(self, estate: Estate, gen: int = 1, seq: int = 5) -> None:
        for disk in estate.disks:
            tag = {"id": f"{gen}-{seq}", "kind": "crash", "t0_wall": self.clock() - 2}
            answer = self.post("/components/self/recovery-points", estate.mt,
                               {"disk": disk, "tag": tag, "gen": gen, "seq": seq})  # fmt: skip
            assert answer.status_code == 204, answer


class Estate:
    """One tenant's machine and components, with their credentials."""

    def __init__(self, tenant, operator, machine, disks, agent, ps, mt) -> None:
        self.tenant, self.operator, self.machine, self.disks = tenant, operator, machine, disks
        self.agent, self.ps, self.mt = agent, ps, mt


@pytest.fixture(scope="session")
def server_context(azurite):
    """The configuration server's context on the session's Azurite, with a movable clock."""
    clock = Clock()
    env = {
        "FERRY_STORAGE": azurite.connection_string,
        "FERRY_ADMIN_KEY": ADMIN_KEY,
        "FERRY_AUTH_FAILURES_PER_MINUTE": "1000000",
    }  # the suite fails on purpose often
    ctx = context.from_settings(env, clock=clock)
    yield ctx, clock
    context.use(None)


@pytest.fixture
def api(server_context) -> Api:
    """The server, installed as the process's context, clock reset to real time."""
    ctx, clock = server_context
    clock.offset = 0.0
    context.use(ctx)
    return Api(ctx, clock)


def take_commands(api: Api, tenant: str, component_id: str) -> list[dict[str, Any]]:
    """Every command waiting in a component's queue (received and deleted)."""
    from azure.storage.queue import TextBase64DecodePolicy, TextBase64EncodePolicy

    from ferry import naming

    queue = api.ctx.account.queues.get_queue_client(
        naming.command_queue(tenant, component_id),
        message_encode_policy=TextBase64EncodePolicy(),
        message_decode_policy=TextBase64DecodePolicy(),
    )
    found = []
    for message in queue.receive_messages(max_messages=32, visibility_timeout=30):
        found.append(json.loads(message.content))
        queue.delete_message(message)
    return found
