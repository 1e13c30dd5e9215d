"""Registration and the component's API: settings, storage grant, heartbeats, reports."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ferry import naming, tokens
from ferry.control.credentials import Credentials
from ferry.control.defaults import DETAIL_MAX
from ferry.control.errors import ControlRefused, ControlUnavailable, CredentialsInvalid
from ferry.control.transport import Transport
from ferry.errors import UsageError

if TYPE_CHECKING:  # the storage SDK loads only when a daemon opens its storage
    from ferry.storage import Storage

log = logging.getLogger("ferry.control")


# -- registration -----------------------------------------------------------------------


def component_id(kind: str, name: str) -> str:
    """The id the server gives component ``name`` of ``kind`` (docs/api.md, "Ids")."""
    return f"{naming.KIND_PREFIX[kind]}-{name}"


def register(
    server: str,
    tenant: str,
    passphrase: str,
    kind: str,
    name: str,
    ca: str | None = None,
    **extra: Any,
) -> Credentials:
    """Register a component with a one-time passphrase; return its credentials.

    ``extra`` goes into the request as is: ``host``, and for an agent its
    ``disks`` (``[{"id", "device", "size"}]``).  The passphrase is used up
    by the server, so this call is never retried once it may have arrived.
    """
    if kind not in naming.KIND_PREFIX:
        raise UsageError(
            detail=f"kind must be one of {', '.join(naming.KIND_PREFIX)}, not {kind!r}"
        )
    problem = naming.check_id("tenant", tenant) or naming.check_id("name", name)
    if problem:
        raise UsageError(detail=problem)
    http = Transport(server, ca or True, secrets=(passphrase,))
    body = {"tenant": tenant, "passphrase": passphrase, "kind": kind, "name": name, **extra}
    answer = http.call("POST", "/register", body, idempotent=False)
    try:
        token, cid = str(answer["token"]), str(answer["component_id"])
    except (KeyError, TypeError):
        raise ControlUnavailable(server=http.server, problem="POST /register: incomplete answer")
    return Credentials(http.server, tenant, cid, token, ca)


def register_and_save(
    server: str,
    tenant: str,
    passphrase: str,
    kind: str,
    name: str,
    out_path: str | Path,
    ca: str | None = None,
    **extra: Any,
) -> Credentials:
    """Register (see :func:`register`) and write the credentials file ``out_path`` (0600).

    Idempotent for Ansible: if ``out_path`` already holds credentials of the
    same server, tenant and component, they are returned and nothing is
    sent (the passphrase stays unused).  Credentials of another component
    there are an error; remove the file to register again.  The file's
    directory is checked before the passphrase is spent.
    """
    out_path = Path(out_path)
    if out_path.exists():
        held = Credentials.load(out_path)
        wanted = (server.rstrip("/"), tenant, component_id(kind, name))
        if (held.server, held.tenant, held.component_id) == wanted:
            return held
        raise CredentialsInvalid(
            path=out_path,
            problem=f"holds the credentials of {held.component_id} at {held.server} "
            f"(tenant {held.tenant}); remove it to register again",
        )
    if not os.access(out_path.parent, os.W_OK | os.X_OK):
        raise CredentialsInvalid(path=out_path, problem="its directory is missing or not writable")
    credentials = register(server, tenant, passphrase, kind, name, ca=ca, **extra)
    credentials.save(out_path)
    log.info("registered %s with %s; credentials in %s", credentials.component_id, server, out_path)
    return credentials


# -- the component's API ----------------------------------------------------------------


class Client:
    """Calls ``/components/self/...`` as the component the credentials name."""

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials
        self._http = Transport(credentials.server, credentials.ca or True, token=credentials.token)
        if credentials.server.startswith("http://") and not _loopback(credentials.server):
            log.warning(
                "the configuration server %s is plain HTTP: the token travels in clear",
                credentials.server,
            )

    @property
    def server(self) -> str:
        """The server's base URL."""
        return self._http.server

    def component(self) -> dict[str, Any]:
        """The server's record of this component."""
        return self._http.call("GET", "/components/self")

    def settings(self) -> dict[str, Any]:
        """The daemon's settings as JSON (the keys of its TOML settings, plus ``storage``)."""
        answer = self._http.call("GET", "/components/self/settings")
        if not isinstance(answer, dict):
            raise ControlUnavailable(server=self.server, problem="settings are not a JSON object")
        return answer

    def storage_grant(self) -> dict[str, Any]:
        """The SAS grant: ``{blob_endpoint, queue_endpoint, expires_at, containers, queues}``."""
        answer = self._http.call("GET", "/components/self/storage")
        if not isinstance(answer, dict):
            raise ControlUnavailable(server=self.server, problem="grant is not a JSON object")
        return answer

    def heartbeat(self, status: dict[str, Any]) -> None:
        """Say that this component is alive, with its status."""
        self._http.call("POST", "/components/self/heartbeat", {"status": status})

    def report_disk(self, disk: str, metrics: dict[str, Any]) -> None:
        """Report one disk's replication metrics (the fields this component knows)."""
        if metrics.get("last_tag") is not None:
            metrics = {**metrics, "last_tag": compact_tag(metrics["last_tag"])}
        self._http.call("POST", f"/components/self/disks/{_quote(disk)}/report", metrics)

    def recovery_point(self, disk: str, tag: dict[str, Any], gen: int, seq: int) -> None:
        """Record an applied tag of ``disk`` as a recovery point (idempotent per disk and tag)."""
        body = {"disk": disk, "tag": compact_tag(tag), "gen": gen, "seq": seq}
        self._http.call("POST", "/components/self/recovery-points", body)

    def command_done(self, command_id: str, state: str, detail: Any = None) -> None:
        """Report the outcome (``done`` or ``failed``) of a command.

        ``detail`` is one line of text; anything else is sent as compact JSON.
        """
        if state not in ("done", "failed"):
            raise ValueError(f"state must be done or failed, not {state!r}")
        body: dict[str, Any] = {"state": state}
        if detail is not None:
            body["detail"] = detail_text(detail)
        self._http.call("POST", f"/components/self/commands/{_quote(command_id)}", body)

    def new_token(self) -> str:
        """A new token for this component, asked for with the current one (rotation).

        Never idempotent (each call makes another pending token), so never retried blindly.
        """
        answer = self._http.call("POST", "/components/self/credentials", {}, idempotent=False)
        token = answer.get("token") if isinstance(answer, dict) else None
        claimed = tokens.claim(token) if isinstance(token, str) else None
        if claimed is None or claimed.kind != "component":
            raise ControlUnavailable(
                server=self.credentials.server, problem="no token in the answer"
            )
        assert isinstance(token, str)  # claim() took it
        return token

    def rotate(self, token: str, path: str | Path | None) -> None:
        """Switch to a new token (from :meth:`new_token`), saved in ``path`` first.

        The server accepts a new token as soon as it sends it, and the
        old one until the new one is first used: so the new token is saved,
        then used (``GET /components/self``).  Only if the server refuses it
        are the old credentials put back (and ControlRefused raised).
        """
        old = self.credentials
        new = dataclasses.replace(old, token=token)
        if path is not None:
            new.save(path)
        self.credentials = new
        self._http = Transport(new.server, new.ca or True, token=token, secrets=(old.token,))
        try:
            self._http.call("GET", "/components/self")
        except ControlRefused:
            if path is not None:
                old.save(path)
            self.credentials = old
            self._http = Transport(old.server, old.ca or True, token=old.token, secrets=(token,))
            raise
        except ControlUnavailable as exc:  # it is valid all the same; used later
            log.warning("switched to new credentials; could not try them yet: %s", exc)
            return
        log.info("switched to new credentials%s", f"; saved in {path}" if path else "")

    def open_storage(self) -> Storage:
        """Storage limited to this component's grant, renewed through this client."""
        from ferry.storage import Storage

        return Storage.from_grant(self.storage_grant(), renew=self.storage_grant)


def detail_text(detail: Any) -> str:
    """A command outcome's detail as the server keeps it: text of at most DETAIL_MAX chars."""
    text = detail if isinstance(detail, str) else json.dumps(detail, sort_keys=True, default=str)
    text = " ".join(text.split())
    return text if len(text) <= DETAIL_MAX else text[: DETAIL_MAX - 1] + "…"


TAG_JSON_MAX = 1800
"""A tag sent to the server is cut to its identity (no disk list) above this many JSON chars."""


def compact_tag(tag: dict[str, Any] | None) -> dict[str, Any] | None:
    """``tag`` as the server keeps it: within its size limit (the disk list goes first)."""
    if tag is None or len(json.dumps(tag, default=str)) <= TAG_JSON_MAX:
        return tag
    return {k: v for k, v in tag.items() if k != "disks"}


def _quote(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def _loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")
