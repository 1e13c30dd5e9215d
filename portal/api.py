"""The configuration server's operator API for one tenant, as the portal uses it.

Every call goes through :class:`ferry.control.transport.Transport` (timeouts,
retries, the token scrubbed from any error) with the operator's token; the
portal never reads storage.  Calls block, so pages await them in a worker
thread (:meth:`Api.call`).
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any
from urllib.parse import quote, urlencode

from starlette.concurrency import run_in_threadpool

from ferry.control.transport import Transport


class Api:
    """One tenant's view of the configuration server."""

    def __init__(self, server: str, verify: str | bool, tenant: str, token: str) -> None:
        self.tenant = tenant
        self.token_digest = hashlib.sha256(token.encode()).hexdigest()
        self._base = f"/tenants/{quote(tenant, safe='')}"
        self._http = Transport(server, verify, token)

    async def call(self, method: str, path: str, body: Any = None, idempotent: bool = True):
        """One call under the tenant's prefix, in a worker thread; the answer's JSON."""
        return await run_in_threadpool(self._http.call, method, self._base + path, body, idempotent)

    async def status(self) -> dict[str, Any]:
        return await self.call("GET", "/status")

    async def jobs(self, machine: str | None = None) -> list[dict[str, Any]]:
        query = f"?{urlencode({'machine': machine})}" if machine else ""
        return (await self.call("GET", f"/jobs{query}"))["jobs"]

    async def job(self, job_id: str) -> dict[str, Any]:
        return await self.call("GET", f"/jobs/{quote(job_id, safe='')}")

    async def command(self, command_id: str) -> dict[str, Any]:
        return (await self.call("GET", f"/commands/{quote(command_id, safe='')}"))["command"]

    async def alerts(self) -> list[dict[str, Any]]:
        return (await self.call("GET", "/alerts"))["alerts"]

    async def recovery_points(
        self, machine: str, limit: int, since: float | None = None, every: int | None = None
    ) -> dict[str, Any]:
        """A machine's points, newest first; ``since``/``every``: a window, thinned (api.md)."""
        query: dict[str, Any] = {"machine": machine, "limit": limit}
        if since is not None:
            query["since"] = f"{max(0.0, since):.3f}"
        if every:
            query["every"] = every
        return await self.call("GET", f"/recovery-points?{urlencode(query)}")

    async def passphrase(self, ttl_seconds: int, kind: str, name: str) -> dict[str, Any]:
        """A one-time passphrase that registers only the component ``kind`` ``name``."""
        body = {"ttl_seconds": ttl_seconds, "kind": kind, "name": name}
        return await self.call("POST", "/passphrases", body, False)

    async def protect(self, machine: str, key: str, **choices: Any) -> dict[str, Any]:
        """Protect a machine; ``choices``: process_server, master_target, rpo_threshold_s."""
        body: dict[str, Any] = {"idempotency_key": key}
        body.update({k: v for k, v in choices.items() if v})
        return (await self.call("POST", f"/machines/{quote(machine)}/protect", body))["job"]

    async def failover(self, machine: str, kind: str, key: str) -> dict[str, Any]:
        """Open a cutover or test failover that the configuration server runs to its end."""
        body = {"idempotency_key": key, "drive": True}
        return (await self.call("POST", f"/machines/{quote(machine)}/{kind}", body))["job"]

    async def cleanup(self, job_id: str) -> dict[str, Any]:
        return (await self.call("POST", f"/jobs/{quote(job_id, safe='')}/cleanup"))["job"]

    async def acknowledge(self, alert_id: str, by: str) -> dict[str, Any]:
        path = f"/alerts/{quote(alert_id, safe='')}/acknowledge"
        return (await self.call("POST", path, {"by": by}))["alert"]


def new_key() -> str:
    """A fresh idempotency key for a form (the same form posted twice asks once)."""
    return f"portal-{uuid.uuid4().hex}"
