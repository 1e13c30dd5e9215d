"""An operator of one tenant, calling the configuration server's operator routes."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ferry.control.client import register as register_component
from ferry.control.credentials import Credentials

if TYPE_CHECKING:
    from support.config_server import ConfigServer


class Operator:
    """Calls the operator's routes of one tenant."""

    def __init__(self, server: ConfigServer, tenant: str, token: str) -> None:
        self.server, self.tenant, self.token = server, tenant, token

    def call(self, method: str, path: str, body: Any = None) -> Any:
        return self.server.call(method, f"/tenants/{self.tenant}{path}", self.token, body)

    def passphrase(self) -> str:
        return self.call("POST", "/passphrases", {})["passphrase"]

    def register(self, kind: str, name: str, **extra: Any) -> Credentials:
        return register_component(
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


def agent_disk(tmp_path: Path, name: str = "web01") -> list[dict[str, Any]]:
    """The ``disks`` of an agent registration: one 1 MiB image file under ``tmp_path``."""
    image = tmp_path / f"{name}.img"
    image.write_bytes(b"")
    os.truncate(image, 1 << 20)
    return [{"id": f"{name}-disk0", "device": str(image), "size": 1 << 20}]
