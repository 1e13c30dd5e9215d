"""A daemon in server mode: its start-up and the commands every component answers."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ferry.control.client import Client
from ferry.control.commands import CommandPoller, Handler, rotate_handler
from ferry.control.credentials import Credentials
from ferry.control.defaults import STARTUP_RETRY_MAX
from ferry.control.errors import ControlRefused
from ferry.control.heartbeat import Heartbeat
from ferry.control.settingsource import SettingsSource
from ferry.control.threads import running
from ferry.errors import ConfigError, RetryableError
from ferry.storage import Storage

log = logging.getLogger("ferry.control")
T = TypeVar("T")


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

    kind = ""
    """The component kind (``agent``, ``process-server``, ``master-target``) its credentials are of."""

    shared = True
    """A process server or master target serves many machines: a machine's ``stop`` is not its."""

    server_only: tuple[str, ...] = ("storage_env",)
    """Settings keys dropped from the server's settings: storage comes from the grant."""

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

        def from_server(raw: dict[str, Any]) -> dict[str, Any]:
            raw = {k: v for k, v in raw.items() if k not in self.server_only}
            return adapt(raw) if adapt else raw

        # Any: each subclass knows its own settings dataclass (``schema``).
        self.source: SettingsSource[Any] = SettingsSource(
            self.client, schema, local=local, adapt=from_server
        )

    @classmethod
    def serve(cls, credentials_path: str, local: dict[str, Any], stop: Any, **extra: Any) -> int:
        """Server mode's entry: load the credentials (of :attr:`kind`), run, return the exit status.

        ``extra`` goes to the subclass's constructor.  A token the server no
        longer accepts ends the daemon with ControlRefused (exit 8).
        """
        credentials = load_credentials(credentials_path, cls.kind)
        daemon = cls(credentials, local, stop=stop, credentials_path=credentials_path, **extra)
        try:
            return daemon.run()
        except ControlRefused as exc:
            if exc.status in (401, 403):
                log.error("the configuration server does not accept these credentials any more")
            raise

    def run(self) -> int:
        """Serve until stopped; the exit status (subclasses)."""
        raise NotImplementedError

    def control_threads(
        self, storage: Storage, state_dir: str | Path, *more: Any
    ) -> contextlib.AbstractContextManager:
        """The heartbeat, the command poller and ``more``, running for a ``with`` block."""
        poller = CommandPoller(self.client, storage, state_dir, self.handlers())
        return running(Heartbeat(self.client, self.heartbeat), poller, *more)

    def heartbeat(self) -> dict[str, Any]:
        """The status sent with each heartbeat (subclasses)."""
        raise NotImplementedError

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
