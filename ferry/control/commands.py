"""Commands from the component's queue: the journal of what was done and the poller."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ferry.control.client import Client
from ferry.control.defaults import (
    COMMAND_VISIBILITY,
    COMMANDS_KEPT,
    POLL_JITTER,
    POLL_MAX,
    POLL_MIN,
)
from ferry.control.errors import ControlRefused
from ferry.control.threads import Quiet, jittered
from ferry.durable import read_json, write_json
from ferry.errors import FerryError
from ferry.storage import Message, Storage

log = logging.getLogger("ferry.control")


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
        self._quiet = Quiet(f"polling command queue {self.queue}")
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


def rotate_handler(client: Client, path: str | Path | None) -> Handler:
    """The ``rotate-credentials`` command handler: fetch a new token over HTTPS, save, switch.

    The command carries no credential (nothing secret travels through a
    queue); the current token authenticates the request for the new one.
    """

    def rotate(_args: dict[str, Any]) -> str:
        client.rotate(client.new_token(), path)
        return "credentials rotated"

    return rotate
