"""The daemons' side of the configuration server's API (docs/api.md).

A component registers once with a one-time passphrase (:func:`register`,
:func:`register_and_save`) and keeps the answer in a credentials file::

    {"server": "https://ferry-cs.example.net", "tenant": "demo",
     "component_id": "ag-web01", "token": "c.demo.ag-web01.…", "ca": "/etc/ferry/cs-ca.pem"}

(mode 0600; ``ca`` is optional and names the CA that the server's TLS
certificate must chain to, else the system's trust store is used).  From
then on a :class:`Client` fetches the component's settings and its storage
grant, sends heartbeats, reports disks, recovery points and the outcome of
commands.  :class:`Heartbeat`, :class:`CommandPoller` and :class:`Reporter`
are the threads every daemon runs in server mode; :class:`SettingsSource`
turns the settings JSON into the daemon's settings dataclass.

Errors: a refusal (4xx) is :class:`ControlRefused`, fatal, with the server's
one-line ``error``; connection failures, timeouts and 5xx are retried with
backoff and then raise :class:`ControlUnavailable`, which is retryable.  The
token and the passphrase never appear in a log line or an exception.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import threading
import time
import typing
import urllib.parse
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import requests

from ferry import __version__, naming
from ferry import settings as ferry_settings
from ferry.durable import fsync_dir, read_json, write_json
from ferry.errors import ConfigError, FerryError, RetryableError, UsageError
from ferry.storage import Message, Storage

log = logging.getLogger("ferry.control")

T = TypeVar("T")

# -- tunables ---------------------------------------------------------------------------

CONNECT_TIMEOUT = 5.0
"""Longest wait for a connection to the configuration server, in seconds."""

READ_TIMEOUT = 30.0
"""Longest wait for the configuration server's answer, in seconds."""

ATTEMPTS = 4
"""Tries of one call when the server cannot be reached or answers 5xx, a count."""

BACKOFF_FIRST = 0.5
"""Pause after the first failed try, in seconds (doubles, with jitter, up to BACKOFF_MAX)."""

BACKOFF_MAX = 8.0
"""Longest pause between tries of one call, in seconds."""

HEARTBEAT_INTERVAL = 15.0
"""Interval between heartbeats, in seconds (the server marks a component lost after 60 s)."""

HEARTBEAT_JITTER = 0.1
"""Heartbeat intervals vary by up to this fraction, so fleets do not beat in step."""

POLL_MIN = 1.0
"""Pause between command queue polls right after a command, in seconds."""

POLL_MAX = 20.0
"""Longest pause between command queue polls when idle, in seconds (the pause doubles)."""

POLL_JITTER = 0.2
"""Command polls vary by up to this fraction of the pause."""

COMMAND_VISIBILITY = 120
"""How long a received command stays hidden from other receivers, in seconds."""

COMMANDS_KEPT = 1000
"""Command ids remembered as done (per component, in ``commands.json``), a count."""

REPORT_INTERVAL = 5.0
"""Interval between disk reports, in seconds."""

REPORT_REFRESH = 60.0
"""A disk whose metrics did not change is reported again after this long, in seconds."""

STARTUP_RETRY_MAX = 60.0
"""Longest pause between attempts to reach the server while a daemon starts, in seconds."""

RECOVERY_POINTS_QUEUED = 10000
"""Recovery points kept while the server cannot be reached, a count (oldest dropped)."""

DETAIL_MAX = 1000
"""Longest command outcome detail the server keeps, in characters (longer is cut)."""

KIND_PREFIX = {"agent": "ag", "process-server": "ps", "master-target": "mt"}
"""Component kinds and the prefix of their ids (``ag-<machine>``, ``ps-<name>``, ``mt-<name>``)."""


# -- errors -----------------------------------------------------------------------------


class ControlRefused(FerryError):
    """the configuration server refused {call}: {message} (HTTP {status})"""

    exit_code = 8

    @property
    def status(self) -> int:
        """The HTTP status of the refusal."""
        return int(self.fields["status"])


class ControlUnavailable(RetryableError):
    """the configuration server at {server} is unavailable: {problem}"""


class CommandFailed(FerryError):
    """{detail}"""


class CredentialsInvalid(FerryError):
    """credentials file {path}: {problem}"""

    exit_code = 2


# -- credentials ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Credentials:
    """What a component needs to call the configuration server as itself."""

    server: str
    tenant: str
    component_id: str
    token: str = dataclasses.field(repr=False)
    ca: str | None = None

    @property
    def kind(self) -> str | None:
        """The component's kind, from its id's prefix."""
        prefix = self.component_id.split("-", 1)[0]
        return next((k for k, p in KIND_PREFIX.items() if p == prefix), None)

    @property
    def name(self) -> str:
        """The component's name (for an agent: its machine id)."""
        return self.component_id.split("-", 1)[1] if "-" in self.component_id else ""

    @property
    def command_queue(self) -> str:
        """The queue on which this component receives its commands."""
        return naming.command_queue(self.tenant, self.component_id)

    def as_json(self) -> dict[str, Any]:
        """The credentials file's content."""
        out = {
            "server": self.server,
            "tenant": self.tenant,
            "component_id": self.component_id,
            "token": self.token,
        }
        if self.ca:
            out["ca"] = self.ca
        return out

    def save(self, path: str | Path) -> None:
        """Write the credentials file (mode 0600, atomically, fsync'ed)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        data = json.dumps(self.as_json(), indent=1, sort_keys=True).encode() + b"\n"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask or a leftover file said
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)

    @classmethod
    def load(cls, path: str | Path) -> Credentials:
        """Read a credentials file; CredentialsInvalid (never showing the token) if unusable."""
        path = Path(path)
        raw = _read_private(path)
        problem = _credentials_problem(raw)
        if problem:
            raise CredentialsInvalid(path=path, problem=problem)
        ca = raw.get("ca") or None
        if ca is not None and not os.access(ca, os.R_OK):
            raise CredentialsInvalid(path=path, problem=f"cannot read the CA file {ca}")
        return cls(raw["server"].rstrip("/"), raw["tenant"], raw["component_id"], raw["token"], ca)


def _read_private(path: Path) -> Any:
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except FileNotFoundError:
        raise CredentialsInvalid(path=path, problem="file not found (register first)")
    except OSError as exc:
        raise CredentialsInvalid(path=path, problem=exc.strerror or str(exc))
    if mode & 0o007:
        raise CredentialsInvalid(
            path=path, problem=f"other users may access it (mode {mode & 0o777:04o}); chmod 600 it"
        )
    try:
        return json.loads(text)
    except ValueError:
        raise CredentialsInvalid(path=path, problem="not valid JSON")


def _credentials_problem(raw: Any) -> str | None:
    if not isinstance(raw, dict):
        return "must hold a JSON object"
    for key in ("server", "tenant", "component_id", "token"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            return f"missing or empty {key}"
    if not raw["server"].startswith(("http://", "https://")):
        return "server must be an http:// or https:// URL"
    if raw.get("ca") is not None and not isinstance(raw["ca"], str):
        return "ca must be a file name"
    return naming.check_id("tenant", raw["tenant"]) or naming.check_id(
        "component_id", raw["component_id"]
    )


# -- HTTP -------------------------------------------------------------------------------


class _Http:
    """JSON calls to one server with timeouts, retries and secrets kept out of errors."""

    def __init__(
        self, server: str, verify: str | bool, token: str | None = None, secrets: tuple = ()
    ) -> None:
        self.server = server.rstrip("/")
        self.verify = verify
        self._headers = {"User-Agent": f"ferry/{__version__}", "Accept": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._secrets = tuple(s for s in (token, *secrets) if s)
        self._local = threading.local()  # one requests.Session per thread
        self.timeout = (CONNECT_TIMEOUT, READ_TIMEOUT)

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.trust_env = True
        return session

    def call(self, method: str, path: str, body: Any = None, idempotent: bool = True) -> Any:
        """One API call; the answer's JSON (None for 204).

        Retries connection failures, timeouts and 5xx (a non-idempotent call
        only when the request cannot have reached the server).
        """
        what = f"{method} {path}"
        delay = BACKOFF_FIRST
        for attempt in range(1, ATTEMPTS + 1):
            try:
                answer = self._session().request(
                    method,
                    self.server + path,
                    json=body,
                    headers=self._headers,
                    timeout=self.timeout,
                    verify=self.verify,
                    allow_redirects=False,
                )
            except requests.exceptions.SSLError as exc:
                raise ControlUnavailable(server=self.server, problem=self._clean(_reason(exc)))
            except requests.RequestException as exc:
                if attempt == ATTEMPTS or not (idempotent or _not_sent(exc)):
                    raise ControlUnavailable(
                        server=self.server, problem=f"{what}: {self._clean(_reason(exc))}"
                    )
            else:
                if answer.status_code < 500:
                    return self._answer(what, answer)
                if attempt == ATTEMPTS or not idempotent:
                    raise ControlUnavailable(
                        server=self.server,
                        problem=f"{what}: HTTP {answer.status_code} {self._message(answer)}",
                    )
            time.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, BACKOFF_MAX)
        raise AssertionError("unreachable")

    def _answer(self, what: str, answer: requests.Response) -> Any:
        if answer.status_code >= 300:
            raise ControlRefused(
                call=what, message=self._message(answer), status=answer.status_code
            )
        if answer.status_code == 204 or not answer.content:
            return None
        try:
            return answer.json()
        except ValueError:
            raise ControlUnavailable(server=self.server, problem=f"{what}: answer is not JSON")

    def _message(self, answer: requests.Response) -> str:
        try:
            error = answer.json().get("error")
        except (ValueError, AttributeError):
            error = None
        text = str(error) if error else (answer.text.strip().splitlines() or [answer.reason])[0]
        return self._clean(text)[:300]

    def _clean(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def _reason(exc: BaseException) -> str:
    """The innermost useful cause of a requests exception, one line."""
    cause: BaseException | None = exc
    while cause is not None:
        reason = getattr(cause, "reason", None)
        if isinstance(reason, BaseException):
            cause = reason
            continue
        if cause.args and isinstance(cause.args[0], BaseException):
            cause = cause.args[0]
            continue
        break
    text = str(cause or exc).strip().splitlines()
    return f"{type(cause or exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _not_sent(exc: requests.RequestException) -> bool:
    """True if the request cannot have reached the server (safe to retry anything)."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    if not isinstance(exc, requests.exceptions.ConnectionError):
        return False
    text = repr(exc)
    return "NewConnectionError" in text or "NameResolutionError" in text


# -- registration -----------------------------------------------------------------------


def component_id(kind: str, name: str) -> str:
    """The id the server gives component ``name`` of ``kind`` (docs/api.md, "Ids")."""
    return f"{KIND_PREFIX[kind]}-{name}"


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
    if kind not in KIND_PREFIX:
        raise UsageError(detail=f"kind must be one of {', '.join(KIND_PREFIX)}, not {kind!r}")
    problem = naming.check_id("tenant", tenant) or naming.check_id("name", name)
    if problem:
        raise UsageError(detail=problem)
    http = _Http(server, ca or True, secrets=(passphrase,))
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
        self._http = _Http(credentials.server, credentials.ca or True, token=credentials.token)
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

    def rotate(self, token: str, path: str | Path | None) -> None:
        """Switch to a new token (from ``rotate-credentials``), saved in ``path`` first.

        The server accepts a rotated token as soon as it sends it, and the
        old one until the new one is first used: so the new token is saved,
        then used (``GET /components/self``).  Only if the server refuses it
        are the old credentials put back (and ControlRefused raised).
        """
        old = self.credentials
        new = dataclasses.replace(old, token=token)
        if path is not None:
            new.save(path)
        self.credentials = new
        self._http = _Http(new.server, new.ca or True, token=token, secrets=(old.token,))
        try:
            self._http.call("GET", "/components/self")
        except ControlRefused:
            if path is not None:
                old.save(path)
            self.credentials = old
            self._http = _Http(old.server, old.ca or True, token=old.token, secrets=(token,))
            raise
        except ControlUnavailable as exc:  # it is valid all the same; used later
            log.warning("switched to new credentials; could not try them yet: %s", exc)
            return
        log.info("switched to new credentials%s", f"; saved in {path}" if path else "")

    def open_storage(self) -> Storage:
        """Storage limited to this component's grant, renewed through this client."""
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


def rotate_handler(client: Client, path: str | Path | None) -> Handler:
    """The ``rotate-credentials`` command handler: the new token is in ``args.token``."""

    def rotate(args: dict[str, Any]) -> str:
        token = args.get("token")
        if not isinstance(token, str) or not token.strip():
            raise CommandFailed(detail="rotate-credentials carried no token")
        client.rotate(token.strip(), path)
        return "credentials rotated"

    return rotate


def _quote(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def _loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


# -- settings ---------------------------------------------------------------------------


class SettingsSource:
    """Builds a daemon's settings dataclass from ``GET /components/self/settings``.

    ``local`` holds what only the host knows (state directory, certificate
    paths) and wins over the server.  Keys the dataclass does not know (a
    newer server, ``storage`` which the grant covers) are dropped and logged
    once; types and ranges are checked as for a TOML file.
    """

    def __init__(
        self,
        client: Client,
        schema: type[T],
        local: dict[str, Any] | None = None,
        adapt: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.client = client
        self.schema = schema
        self.local = dict(local or {})
        self.adapt = adapt
        self._ignored: set[str] = set()

    @property
    def source(self) -> str:
        """How errors name these settings."""
        return f"{self.client.server}/components/self/settings"

    def fetch_raw(self) -> dict[str, Any] | None:
        """The server's settings with the local keys filled in, not yet checked.

        None when the server answers 409: nothing is assigned to this
        component yet (an agent whose machine is not protected, a master
        target without disks); a ``protect`` command will follow.
        """
        try:
            raw = self.client.settings()
        except ControlRefused as exc:
            if exc.status != 409:
                raise
            log.info("%s", exc.fields.get("message"))
            return None
        raw = {**{k: v for k, v in raw.items() if v is not None}, **self.local}
        return self.adapt(raw) if self.adapt else raw

    def build(self, raw: dict[str, Any]) -> T:
        """Check ``raw`` and build the dataclass; ConfigError naming the key on any problem."""
        known = _known_only(raw, self.schema, "", self._dropped)
        return ferry_settings.from_mapping(known, self.schema, source=self.source)

    def fetch(self) -> T:
        """Fetch and build the settings; ControlRefused if nothing is assigned yet."""
        raw = self.fetch_raw()
        if raw is None:
            raise ControlRefused(
                call="GET /components/self/settings", message="nothing assigned yet", status=409
            )
        return self.build(raw)

    def _dropped(self, key: str) -> None:
        if key not in self._ignored:
            self._ignored.add(key)
            log.debug("ignoring setting %s from the configuration server", key)


def _known_only(raw: Any, schema: type, prefix: str, dropped: Callable[[str], None]) -> Any:
    """``raw`` without the keys ``schema`` (and its nested dataclasses) does not declare."""
    if not isinstance(raw, dict):
        return raw
    hints = typing.get_type_hints(schema)
    out = {}
    for key, value in raw.items():
        if key not in hints:
            dropped(f"{prefix}{key}")
            continue
        inner = _dataclass_in(hints[key])
        if inner is not None and isinstance(value, list):
            value = [_known_only(v, inner, f"{prefix}{key}[].", dropped) for v in value]
        elif inner is not None:
            value = _known_only(value, inner, f"{prefix}{key}.", dropped)
        out[key] = value
    return out


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field holds (directly, in a list or optional), if any."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        found = _dataclass_in(arg)
        if found is not None:
            return found
    return None


# -- threads ----------------------------------------------------------------------------


class _Quiet:
    """Logs a failure once when it starts and once when it ends."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.failing = False

    def failed(self, exc: BaseException) -> None:
        if not self.failing:
            if isinstance(exc, FerryError):
                log.warning("%s failed: %s", self.what, exc)
            else:
                log.error("%s failed", self.what, exc_info=exc)
        self.failing = True

    def succeeded(self) -> None:
        if self.failing:
            log.info("%s works again", self.what)
        self.failing = False


def jittered(seconds: float, fraction: float) -> float:
    """``seconds`` varied uniformly by up to ``fraction`` either way."""
    return seconds * random.uniform(1 - fraction, 1 + fraction)


class Heartbeat(threading.Thread):
    """Sends ``status()`` as a heartbeat now and every ``interval`` seconds (with jitter)."""

    def __init__(
        self,
        client: Client,
        status: Callable[[], dict[str, Any]],
        interval: float = HEARTBEAT_INTERVAL,
        jitter: float = HEARTBEAT_JITTER,
    ) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.client = client
        self.status = status
        self.interval = interval
        self.jitter = jitter
        self.halt = threading.Event()
        self.sent = 0
        self._quiet = _Quiet("heartbeat")

    def run(self) -> None:
        while True:
            self.beat()
            if self.halt.wait(jittered(self.interval, self.jitter)):
                return

    def beat(self) -> bool:
        """Send one heartbeat; False (logged once) if it failed."""
        try:
            self.client.heartbeat(self.status())
        except Exception as exc:  # a heartbeat must never end the thread
            self._quiet.failed(exc)
            return False
        self._quiet.succeeded()
        self.sent += 1
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Stop beating (the server marks the component lost after 60 s)."""
        self.halt.set()
        if self.is_alive():
            self.join(timeout)


Handler = Callable[[dict[str, Any]], Any]
"""Runs one command with its ``args``; returns a JSON-able detail; raises to fail it."""


class CommandJournal:
    """``<state_dir>/commands.json``: the ids of commands started, and their outcomes.

    A command id is recorded (fsync'ed) before it runs, so it runs at most
    once even if its message comes back after a crash; an outcome is kept
    until the server has heard it.
    """

    def __init__(self, path: Path, kept: int = COMMANDS_KEPT) -> None:
        self.path = Path(path)
        self.kept = kept
        raw = read_json(self.path, {})
        entries = raw.get("commands") if isinstance(raw, dict) else None
        self.entries: dict[str, dict[str, Any]] = entries if isinstance(entries, dict) else {}

    def get(self, command_id: str) -> dict[str, Any] | None:
        """The record of ``command_id``, or None if it never started here."""
        return self.entries.get(command_id)

    def start(self, command_id: str, kind: str) -> None:
        """Record that ``command_id`` starts now (durably)."""
        self.entries[command_id] = {"type": kind, "state": "running", "at": time.time()}
        self._save()

    def finish(self, command_id: str, state: str, detail: Any) -> None:
        """Record the outcome of ``command_id`` (durably), not yet reported."""
        entry = self.entries.setdefault(command_id, {"at": time.time()})
        entry.update(state=state, detail=detail, reported=False, finished_at=time.time())
        self._save()

    def reported(self, command_id: str) -> None:
        """Record that the server knows the outcome of ``command_id``."""
        entry = self.entries.get(command_id)
        if entry is not None and not entry.get("reported"):
            entry["reported"] = True
            self._save()

    def unreported(self) -> list[tuple[str, dict[str, Any]]]:
        """Finished commands whose outcome the server has not acknowledged."""
        return [
            (cid, e)
            for cid, e in self.entries.items()
            if e.get("state") in ("done", "failed") and not e.get("reported")
        ]

    def interrupted(self) -> list[str]:
        """Commands that were running when a previous process ended."""
        return [cid for cid, e in self.entries.items() if e.get("state") == "running"]

    def _save(self) -> None:
        if len(self.entries) > self.kept:
            oldest = sorted(self.entries, key=lambda c: self.entries[c].get("at", 0))
            for cid in oldest[: len(self.entries) - self.kept]:
                if self.entries[cid].get("reported"):
                    del self.entries[cid]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"commands": self.entries})


class CommandPoller(threading.Thread):
    """Receives this component's commands from its queue and runs each one at most once.

    Order per command: record its id as started (fsync) → delete the message
    → run the handler → record the outcome → report it.  A duplicate
    delivery of a known id is deleted and its outcome reported again; a
    command interrupted by a crash is reported ``failed``, never rerun.
    Polls back off from ``poll_min`` to ``poll_max`` seconds while idle.
    Handlers run in this thread, one at a time, in the order received.
    """

    def __init__(
        self,
        client: Client,
        storage: Storage,
        state_dir: str | Path,
        handlers: dict[str, Handler],
        queue: str | None = None,
        poll_min: float = POLL_MIN,
        poll_max: float = POLL_MAX,
        jitter: float = POLL_JITTER,
        visibility: int = COMMAND_VISIBILITY,
    ) -> None:
        super().__init__(name="commands", daemon=True)
        self.client = client
        self.storage = storage
        self.queue = queue or client.credentials.command_queue
        self.handlers = handlers
        self.journal = CommandJournal(Path(state_dir) / "commands.json")
        self.poll_min, self.poll_max, self.jitter = poll_min, poll_max, jitter
        self.visibility = visibility
        self.halt = threading.Event()
        self.wake = threading.Event()
        self.handled = 0
        self._quiet = _Quiet(f"polling command queue {self.queue}")
        for cid in self.journal.interrupted():
            self.journal.finish(
                cid, "failed", "interrupted: the component stopped while running it"
            )

    def run(self) -> None:
        delay = self.poll_min
        while not self.halt.is_set():
            if self.poll_once():
                delay = self.poll_min
                continue
            self.wake.wait(jittered(delay, self.jitter))
            self.wake.clear()
            delay = min(delay * 2, self.poll_max)

    def poll_once(self) -> int:
        """Report pending outcomes, then receive and run what is queued; return commands seen."""
        self._report_pending()
        try:
            messages = self.storage.receive(self.queue, count=8, visibility=self.visibility)
            self._quiet.succeeded()
        except Exception as exc:  # storage or grant trouble: try again at the next poll
            self._quiet.failed(exc)
            return 0
        for message in messages:
            if self.halt.is_set():
                break  # left in the queue: it comes back after its visibility timeout
            self.handle(message)
        return len(messages)

    def handle(self, message: Message) -> None:
        """Run (or recognise) one command message."""
        body = message.body
        cid, kind = body.get("id"), body.get("type")
        if not isinstance(cid, str) or not cid or not isinstance(kind, str):
            log.error("deleting command message %s: it has no id or type", message.id)
            self._delete_message(message)
            return
        if self.journal.get(cid) is not None:
            log.info("command %s (%s) was seen before; not running it again", cid, kind)
            self._delete_message(message)
            self._report_pending()
            return
        self.journal.start(cid, kind)
        self._delete_message(message)
        state, detail = self._run(cid, kind, body.get("args") or {})
        self.journal.finish(cid, state, detail)
        self.handled += 1
        self._report(cid, self.journal.get(cid) or {})

    def _run(self, cid: str, kind: str, args: Any) -> tuple[str, Any]:
        handler = self.handlers.get(kind)
        if handler is None:
            log.warning("command %s: this component does not support %r", cid, kind)
            return "failed", f"{kind} is not supported by this component"
        if not isinstance(args, dict):
            return "failed", "args must be a JSON object"
        log.info("running command %s (%s)", cid, kind)
        try:
            detail = handler(args)
        except FerryError as exc:
            log.warning("command %s (%s) failed: %s", cid, kind, exc)
            return "failed", str(exc)
        except Exception as exc:  # a bug: the traceback is logged, the server hears one line
            log.exception("command %s (%s) failed", cid, kind)
            return "failed", f"{type(exc).__name__}: {exc}".splitlines()[0]
        log.info("command %s (%s) done", cid, kind)
        return "done", detail

    def _delete_message(self, message: Message) -> None:
        try:
            self.storage.delete_message(self.queue, message)
        except Exception as exc:  # it comes back; the journal recognises it
            log.warning("cannot delete command message %s yet: %s", message.id, exc)

    def _report_pending(self) -> None:
        for cid, entry in self.journal.unreported():
            if not self._report(cid, entry):
                return

    def _report(self, cid: str, entry: dict[str, Any]) -> bool:
        try:
            self.client.command_done(cid, entry["state"], entry.get("detail"))
        except ControlRefused as exc:  # the server will never take it: stop trying
            log.warning("the server refused the outcome of command %s: %s", cid, exc)
        except Exception as exc:
            log.warning("cannot report command %s yet: %s", cid, exc)
            return False
        self.journal.reported(cid)
        return True

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the command in hand (its outcome is reported first)."""
        self.halt.set()
        self.wake.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)


class Reporter(threading.Thread):
    """Reports disk metrics every ``interval`` seconds and every queued recovery point.

    ``metrics()`` returns ``{disk: {field: value}}``; a disk is reported when
    its metrics changed or ``refresh`` seconds passed.  Recovery points are
    sent oldest first and kept (up to RECOVERY_POINTS_QUEUED) while the
    server cannot be reached.
    """

    def __init__(
        self,
        client: Client,
        metrics: Callable[[], dict[str, dict[str, Any]]] | None = None,
        interval: float = REPORT_INTERVAL,
        refresh: float = REPORT_REFRESH,
    ) -> None:
        super().__init__(name="reporter", daemon=True)
        self.client = client
        self.metrics = metrics
        self.interval = interval
        self.refresh = refresh
        self.halt = threading.Event()
        self.wake = threading.Event()
        self._points: deque[dict[str, Any]] = deque(maxlen=RECOVERY_POINTS_QUEUED)
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, str]] = {}
        self._quiet = _Quiet("reporting to the configuration server")
        self.points_sent = 0

    def recovery_point(self, disk: str, tag: dict[str, Any], gen: int, seq: int) -> None:
        """Queue a recovery point for sending (never blocks)."""
        with self._lock:
            self._points.append({"disk": disk, "tag": tag, "gen": gen, "seq": seq})
        self.wake.set()

    def run(self) -> None:
        while not self.halt.is_set():
            self.flush()
            self.wake.wait(self.interval)
            self.wake.clear()
        self.flush()

    def flush(self) -> None:
        """Send queued recovery points and due disk reports now."""
        try:
            self._send_points()
            self._send_metrics()
        except Exception as exc:  # kept for the next round
            self._quiet.failed(exc)
            return
        self._quiet.succeeded()

    def _send_points(self) -> None:
        while True:
            with self._lock:
                if not self._points:
                    return
                point = self._points[0]
            try:
                self.client.recovery_point(**point)
            except ControlRefused as exc:  # never accepted: do not block the others
                log.warning("the server refused recovery point %s: %s", point["tag"], exc)
            with self._lock:
                if self._points and self._points[0] is point:
                    self._points.popleft()
            self.points_sent += 1

    def _send_metrics(self) -> None:
        if self.metrics is None:
            return
        now = time.monotonic()
        for disk, values in self.metrics().items():
            text = json.dumps(values, sort_keys=True, default=str)
            then, before = self._last.get(disk, (float("-inf"), ""))
            if text == before and now - then < self.refresh:
                continue
            try:
                self.client.report_disk(disk, values)
            except ControlRefused as exc:
                log.warning("the server refused the report of disk %s: %s", disk, exc)
            self._last[disk] = (now, text)

    def stop(self, timeout: float = 10.0) -> None:
        """Send what is queued (one try) and stop."""
        self.halt.set()
        self.wake.set()
        if self.is_alive():
            self.join(timeout)


def patiently(call: Callable[[], T], stop: threading.Event, what: str) -> T | None:
    """``call()`` until it raises no retryable error; None if ``stop`` is set first.

    The first failure is logged; fatal errors (e.g. a refused token) propagate.
    """
    delay, warned = 1.0, False
    while not stop.is_set():
        try:
            result = call()
        except RetryableError as exc:
            if not warned:
                log.warning("%s: %s; retrying", what, exc)
                warned = True
        else:
            if warned:
                log.info("%s: done", what)
            return result
        stop.wait(delay)
        delay = min(delay * 2, STARTUP_RETRY_MAX)
    return None


COMPONENT_NAMES = {"agent": "an agent", "process-server": "a process server",
                   "master-target": "a master target"}  # fmt: skip


def load_credentials(path: str, kind: str) -> Credentials:
    """The credentials at ``path``; ConfigError if they are another kind of component's."""
    credentials = Credentials.load(path)
    if credentials.kind not in (None, kind):
        raise ConfigError(
            path=path,
            problem=f"these are the credentials of {credentials.component_id}, "
            f"not {COMPONENT_NAMES.get(kind, kind)}",
        )
    return credentials


def start_up(
    client: Client, source: SettingsSource, stop: threading.Event
) -> tuple[Storage, dict[str, Any] | None] | None:
    """A daemon's first contact: its storage grant and raw settings, each fetched patiently.

    None if ``stop`` was set first (the daemon then exits 0).
    """
    storage = patiently(client.open_storage, stop, "fetching the storage grant")
    if storage is None:
        return None
    fetched = patiently(lambda: [source.fetch_raw()], stop, "fetching the settings")
    if fetched is None:
        return None
    return storage, fetched[0]


class ManagedDaemon:
    """What every daemon run by the configuration server has: its credentials, client,
    settings source and stop flag, and the commands every component answers (``stop``,
    ``rotate-credentials``).  Subclasses add theirs in :meth:`commands`.
    """

    shared = True
    """A process server or master target serves many machines: a machine's ``stop`` is not its."""

    def __init__(
        self,
        credentials: Credentials,
        local: dict[str, Any],
        stop: Any,
        credentials_path: str | None,
        schema: type,
        adapt: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.credentials = credentials
        self.credentials_path = credentials_path
        self.client = Client(credentials)
        self.stop = stop
        self.source = SettingsSource(self.client, schema, local=local, adapt=adapt)

    def commands(self) -> dict[str, Handler]:
        """The daemon's own command handlers, by command type."""
        return {}

    def handlers(self) -> dict[str, Handler]:
        """Every command handler of ``CommandPoller``, by command type."""
        return {
            **self.commands(),
            "stop": self.cmd_stop,
            "rotate-credentials": rotate_handler(self.client, self.credentials_path),
        }

    def cmd_stop(self, args: dict[str, Any]) -> str:
        """Exit cleanly (after the work in hand) once this command is reported."""
        machine = args.get("machine")
        if machine and self.shared:
            return f"still serving other machines; the agent of {machine} stops itself"
        self.stop.event.set()
        return "stopping"


@contextlib.contextmanager
def running(*threads: Any):
    """Start ``threads`` and stop them (in reverse order) on exit."""
    started = []
    try:
        for thread in threads:
            thread.start()
            started.append(thread)
        yield
    finally:
        for thread in reversed(started):
            thread.stop()
