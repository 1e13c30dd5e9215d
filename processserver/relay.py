"""Relays between agents and master targets, which never talk to each other directly.

* Resync: an agent's ``resync`` frame becomes a resync notice on the disk's
  queue; the master target answers in a blob, which is polled for and sent
  back as ``resync-answer`` with the digest map as payload.  Each request
  has its own thread, so the connection keeps flowing meanwhile.
* State: the master target's per-disk state blob is polled for the disks of
  connected agents; a ``resync_required_gen`` in it becomes a
  ``resync-required`` frame to the agent.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from ferry import naming, notice
from ferry.errors import NotFound, StorageUnavailable
from processserver import defaults
from processserver.context import Context
from processserver.health import Backoff

log = logging.getLogger("ferry.processserver.relay")

T = TypeVar("T")


class Link(Protocol):
    """The side of an agent connection a resync relay uses."""

    tenant: str | None
    address: str
    closed: threading.Event

    def send(self, header: dict[str, Any], payload: bytes = b"") -> bool: ...


class Gone(Exception):
    """The connection closed or the server is stopping: the relay has no one to answer."""


class ResyncRelay:
    """Carries one resync request to the master target and its answer back."""

    def __init__(self, ctx: Context, link: Link, disk: str, request_id: str, block_size: int):
        self.ctx = ctx
        self.link = link
        self.tenant = str(link.tenant)
        self.disk = disk
        self.request_id = request_id
        self.block_size = block_size
        self.answer_blob = naming.resync_answer_blob(self.tenant, disk, request_id)
        self.control = naming.control_container(self.tenant, disk)
        self.done = threading.Event()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop relaying (the agent asked again with a new request)."""
        self._cancelled.set()

    def start(self) -> None:
        """Relay in a thread of its own."""
        name = f"resync-{self.disk}-{self.request_id}"[:60]
        threading.Thread(target=self.run, name=name, daemon=True).start()

    def run(self) -> None:
        """Thread body: announce, wait for the answer, forward it."""
        try:
            self._announce()
            answer = self._await_answer()
            self._forward(answer)
        except Gone:
            log.info("dropped resync request %s of %s: superseded, or the agent left",
                     self.request_id, self.disk)  # fmt: skip
        except Exception:  # a bug must not go unseen, nor kill the server
            log.exception("relaying resync request %s of %s failed", self.request_id, self.disk)
        finally:
            self.done.set()

    def _announce(self) -> None:
        """Send the resync notice, unless the master target has answered this request already."""
        if self._patiently("looking for a resync answer", self._answer_exists):
            return  # the agent asked again after a reconnect: the answer stands
        body = notice.resync(self.tenant, self.disk, self.request_id, self.block_size)
        queue = naming.disk_queue(self.tenant, self.disk)
        self._patiently("sending a resync notice", lambda: self.ctx.storage.send(queue, body))
        self.ctx.stats.add(resync_requests=1)
        log.info("relayed resync request %s of %s/%s", self.request_id, self.tenant, self.disk)

    def _answer_exists(self) -> bool:
        return self.ctx.storage.exists(self.control, self.answer_blob)

    def _await_answer(self) -> Any:
        """Poll for the answer blob until it appears (or the agent leaves); None if not JSON."""
        while True:
            try:
                return self._patiently(
                    "reading a resync answer",
                    lambda: self.ctx.storage.get_json(self.control, self.answer_blob),
                )
            except NotFound:
                self._wait(defaults.RESYNC_POLL_INTERVAL)
            except ValueError:
                return None  # reported as unusable by _forward

    def _forward(self, answer: Any) -> None:
        """Send ``resync-answer`` with the digest map (empty when the target is empty)."""
        problem = answer_problem(answer, self.tenant, self.disk, self.request_id)
        if problem:
            log.error(
                "resync answer %s/%s is unusable: %s", self.control, self.answer_blob, problem
            )
            return
        digests = b""
        if not answer["empty"]:
            name = answer["digest_blob"]
            try:
                digests = self._patiently(
                    "reading a digest map", lambda: self.ctx.storage.get(self.control, name)
                )
            except NotFound:
                log.error(
                    "resync answer %s names %s/%s, which is missing",
                    self.answer_blob,
                    self.control,
                    name,
                )
                return
        header = {
            "type": "resync-answer",
            "disk": self.disk,
            "request_id": self.request_id,
            "gen": answer["gen"],
            "block_size": answer["block_size"],
            "target_size": answer["target_size"],
            "digest_blob": answer.get("digest_blob"),
            "empty": answer["empty"],
        }
        if not self.link.send(header, digests):
            raise Gone
        self.ctx.stats.add(resync_answers=1)
        log.info(
            "forwarded the answer to resync request %s (generation %d)",
            self.request_id,
            answer["gen"],
        )

    def _patiently(self, what: str, call: Callable[[], T]) -> T:
        """``call()``, retried through storage outages while the agent is still connected."""
        backoff = Backoff()
        while True:
            self._check_alive()
            try:
                result = call()
            except StorageUnavailable as exc:
                self.ctx.health.failed(what, exc)
                self._wait(backoff.pause())
                continue
            except NotFound:
                self.ctx.health.succeeded()  # storage answered, just not with a blob
                raise
            self.ctx.health.succeeded()
            return result

    def _check_alive(self) -> None:
        if self.link.closed.is_set() or self.ctx.stopping.is_set() or self._cancelled.is_set():
            raise Gone

    def _wait(self, seconds: float) -> None:
        self.link.closed.wait(seconds)
        self._check_alive()


def answer_problem(answer: Any, tenant: str, disk: str, request_id: str) -> str | None:
    """What is wrong with a resync answer blob's content, or None."""
    if not isinstance(answer, dict):
        return "not a JSON object"
    if answer.get("request_id") != request_id:
        return f"it answers request {answer.get('request_id')!r}"
    for field in ("gen", "block_size", "target_size"):
        value = answer.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"{field} is {value!r}"
    if not isinstance(answer.get("empty"), bool):
        return f"empty is {answer.get('empty')!r}"
    blob = answer.get("digest_blob")
    # The name is followed, so it must stay inside this disk's own control blobs.
    if not answer["empty"] and not (isinstance(blob, str) and blob.startswith(f"{tenant}/{disk}/")):
        return f"digest_blob is {blob!r}"
    return None


class StateRelay:
    """Polls the state blobs of connected disks and relays resync demands to their agents."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def run(self) -> None:
        """Thread body: poll every ``state_poll_interval`` seconds until the server stops."""
        while not self.ctx.stopping.wait(self.ctx.settings.state_poll_interval):
            try:
                self.poll()
            except Exception:  # keep relaying; a bug is logged with its traceback
                log.exception("polling disk states failed")

    def poll(self) -> None:
        """Read each connected disk's state once and tell its agents what they must know."""
        for (tenant, disk), peers in self._subscriptions().items():
            if self.ctx.stopping.is_set():
                return
            state = self._read(tenant, disk)
            gen = state.get("resync_required_gen") if isinstance(state, dict) else None
            if isinstance(gen, int) and not isinstance(gen, bool):
                reason = str(state.get("reason") or "the master target requires a resync")
                for peer in peers:
                    peer.notify_resync_required(disk, gen, reason)
            for gen in self._quarantined_gens(tenant, disk):
                # An acknowledged batch that cannot be uploaded leaves a gap the
                # master target would wait on forever: only a resync closes it.
                for peer in peers:
                    peer.notify_resync_required(disk, gen, "a spooled batch was unreadable")

    def _quarantined_gens(self, tenant: str, disk: str) -> set[int]:
        """Generations of ``disk`` with a batch in quarantine (kept on disk across restarts)."""
        gens = set()
        for path in (self.ctx.spool.quarantine_dir / tenant / disk).glob("*.batch"):
            head = path.name.partition("-")[0]
            if head.isdigit():
                gens.add(int(head))
        return gens

    def _subscriptions(self) -> dict[tuple[str, str], list]:
        """``(tenant, disk)`` -> the connections of agents that protect it."""
        out: dict[tuple[str, str], list] = defaultdict(list)
        for peer in self.ctx.peers.live():
            if peer.tenant is not None:
                for disk in peer.disks:
                    out[(peer.tenant, disk)].append(peer)
        return out

    def _read(self, tenant: str, disk: str) -> Any:
        """The disk's state blob as JSON; None if absent, unreadable or storage is down."""
        name = naming.disk_state_blob(tenant, disk)
        control = naming.control_container(tenant, disk)
        try:
            state = self.ctx.storage.get_json(control, name)
        except NotFound:
            state = None
        except StorageUnavailable as exc:
            self.ctx.health.failed("reading disk states", exc)
            return None
        except ValueError:
            log.warning("state blob %s/%s is not JSON; ignoring it", control, name)
            state = None
        self.ctx.health.succeeded()
        return state
