"""The agent in server mode: settings and work from the configuration server.

``python -m agent --server-credentials FILE`` loads the credentials written
at registration, fetches its settings and storage grant, and then runs a
heartbeat, a command poller and a disk reporter (:mod:`ferry.control`).  An
agent whose machine is not protected yet (its settings list no disks or no
process server) only waits for ``protect``.  Commands:

| command | effect |
|---|---|
| ``protect`` | fetch the settings again and (re)start replication with the listed disks |
| ``tag`` | a tag (``args.kind``: crash or app), done once durable at the process server |
| ``pause`` / ``resume`` | stop / restart read passes; tracking goes on, so nothing is lost |
| ``resync`` | a new generation of ``args.disks`` (default: all; compares source and target) |
| ``drain`` | a last tag, durable at the process server, then no more shipping (see below) |
| ``verify`` | an online verify of ``args.disks`` (default: all), ``args.repair`` to mend (agent.verify) |
| ``repair`` | ship ``args.blocks`` (``[first, count]`` runs) of ``args.disk`` again: what a verify found differing |
| ``stop`` | exit cleanly (status 0) |
| ``rotate-credentials`` | switch to the new token in ``args.token`` and save it in the credentials file |

A drain with ``args.final`` (a cutover) marks its tag final: the master
target fences the disks once it has applied it, and ``resume`` is refused;
``resume-replication`` (a cutover that was not committed, sent with the
master target's own) resumes even then.
With ``args.digest`` as well (a cutover the configuration server runs), the
agent then digests each disk (sha256, the source being quiet) and reports
the digests with the tag, for the master target's check of its VHDs.
Pause and drain survive a ``protect`` (which restarts replication) but not
a restart of the agent.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, TypeGuard

from agent import defaults
from agent.session import Session
from agent.settings import Settings
from ferry import __version__
from ferry.control.credentials import Credentials
from ferry.control.daemon import ManagedDaemon, start_up
from ferry.control.errors import CommandFailed
from ferry.control.reporting import Reporter
from ferry.diskio import sha256_of
from ferry.durable import write_json
from ferry.errors import Exit, FerryError
from ferry.process import StopFlag

log = logging.getLogger("ferry.agent")


class ReplicatorDied(FerryError):
    """the replicator thread stopped unexpectedly (its traceback is in the log above)"""

    exit_code = Exit.BUG


def protected(raw: dict[str, Any] | None) -> TypeGuard[dict[str, Any]]:
    """True if the server's settings name disks and a process server to replicate to."""
    return raw is not None and bool(raw.get("disks")) and bool(raw.get("process_server"))


class ManagedAgent(ManagedDaemon):
    """Runs sessions as the configuration server directs."""

    kind = "agent"
    shared = False  # a machine's stop is the agent's own

    def __init__(
        self,
        credentials: Credentials,
        local: dict[str, Any],
        stop: StopFlag,
        credentials_path: str | None = None,
    ) -> None:
        super().__init__(credentials, local, stop, credentials_path, Settings, self._adapt)
        self.state_dir = Path(local["state_dir"])
        self.session: Session | None = None
        self.paused = False
        self.drained: dict[str, Any] | None = None
        self.last_error: str | None = None
        self._lock = threading.RLock()
        self._shipped: dict[str, tuple[float, int]] = {}
        self._durable: dict[str, dict[str, Any]] = {}

    def _adapt(self, raw: dict[str, Any]) -> dict[str, Any]:
        raw.setdefault("tenant", self.credentials.tenant)
        raw.setdefault("machine", self.credentials.name)
        return raw

    # -- life ---------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until a stop (signal or ``stop`` command); returns the exit status."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        event = self.stop.event
        started = start_up(self.client, self.source, event)
        if started is None:
            return 0
        storage, raw = started
        try:
            self._apply(raw)
        except FerryError:
            pass  # logged; reported in heartbeats; a protect may fix it
        try:
            with self.control_threads(storage, self.state_dir, Reporter(self.client, self.metrics)):
                while not event.wait(defaults.STATUS_INTERVAL):
                    self._write_status()
        finally:
            self._replace(None)
        return 0

    def _write_status(self) -> None:
        with self._lock:
            session = self.session
        if session is not None and not session.alive:
            # A bug (its traceback is in the log): exit, and let the service manager restart us.
            raise ReplicatorDied()
        status = session.status() if session else {"disks": []}
        write_json(self.state_dir / "status.json", {**status, **self._state()}, durable=False)

    def _state(self) -> dict[str, Any]:
        if self.session is None:
            state = "waiting-for-protect"
        elif self.drained is not None:
            state = "drained"
        elif self.paused:
            state = "paused"
        else:
            state = "replicating"
        return {"state": state, "last_error": self.last_error}

    # -- settings -------------------------------------------------------------------------

    def _apply(self, raw: dict[str, Any] | None) -> str:
        """Replicate what ``raw`` (the server's settings) says; return what was done."""
        if not protected(raw):
            self._replace(None)
            log.info("no disks are protected for this machine yet; waiting for protect")
            return "no disks to protect; waiting"
        settings = self.source.build(raw)
        with self._lock:
            if self.session is not None and self.session.settings == settings:
                self.last_error = None
                return "already protecting " + ", ".join(d.id for d in settings.disks)
        self._replace(settings)
        return "protecting " + ", ".join(d.id for d in settings.disks)

    def _replace(self, settings: Settings | None) -> None:
        """Close the current session and start one with ``settings`` (none if None)."""
        with self._lock:
            old, self.session = self.session, None
            if old is not None:
                # Tracking is handed over to the next session, or to the next
                # start when stopping; not when the machine is unprotected.
                old.close(hand_over=settings is not None or self.stop.event.is_set())
            self._durable.clear()
            self._shipped.clear()
            if settings is None:
                return
            try:
                session = Session(settings)
            except FerryError as exc:  # e.g. a listed device is missing: tell the server
                self.last_error = str(exc)
                log.error("cannot protect %s: %s", [d.id for d in settings.disks], exc)
                raise
            if self.paused:
                session.replicator.paused.set()
            self.session = session.start()
            self.last_error = None

    def _current(self) -> Session:
        with self._lock:
            if self.session is None:
                raise CommandFailed(detail="this machine is not protected yet (no disks)")
            return self.session

    # -- commands -------------------------------------------------------------------------

    def commands(self) -> dict[str, Any]:
        """The agent's own command handlers (stop and rotate-credentials are ManagedDaemon's)."""
        return {
            "protect": self.cmd_protect,
            "tag": self.cmd_tag,
            "pause": self.cmd_pause,
            "resume": self.cmd_resume,
            "resume-replication": self.cmd_resume_replication,
            "resync": self.cmd_resync,
            "drain": self.cmd_drain,
            "verify": self.cmd_verify,
            "repair": self.cmd_repair,
        }

    def cmd_protect(self, _args: dict[str, Any]) -> str:
        """Fetch the settings again and replicate what they list."""
        return self._apply(self.source.fetch_raw())

    def cmd_tag(self, args: dict[str, Any]) -> dict[str, Any]:
        """A tag, durable at the process server."""
        kind = str(args.get("kind") or "crash")
        tag = self._current().replicator.tag(
            kind, float(args.get("timeout") or defaults.TAG_TIMEOUT)
        )
        return {"tag": tag}

    def cmd_pause(self, _args: dict[str, Any]) -> str:
        """Stop read passes (tracking continues)."""
        with self._lock:
            self.paused = True
            if self.session is not None:
                self.session.replicator.paused.set()
        return "paused"

    def cmd_resume(self, _args: dict[str, Any]) -> str:
        """Run read passes again (after a pause or a drain that was not final)."""
        drained = self.drained or {}
        if drained.get("final"):
            raise CommandFailed(
                detail=f"drained for cutover at final tag {drained.get('id')}: the master target "
                "has fenced the disks; protect the machine afresh to replicate it again"
            )
        with self._lock:
            self.paused = False
            self.drained = None
            if self.session is not None:
                self.session.replicator.paused.clear()
        return "resumed"

    def cmd_resume_replication(self, _args: dict[str, Any]) -> str:
        """Read passes again after a cutover that was not committed (even after a final drain).

        The master target lifts the disks' fence on the same command; batches
        after the final tag continue its sequence, and tracking never stopped
        (a restarted agent resyncs whatever it cannot vouch for, as always).
        """
        with self._lock:
            drained = self.drained or {}
            self.paused = False
            self.drained = None
            if self.session is not None:
                self.session.replicator.paused.clear()
        if drained.get("final"):
            return f"replicating again after final tag {drained.get('id')}"
        return "replicating"

    def cmd_resync(self, args: dict[str, Any]) -> str:
        """Start a new generation of ``args.disks`` (every disk if absent)."""
        session = self._current()
        protected = set(session.replicator.disks)
        wanted = args.get("disks")
        if wanted is None:
            disks = sorted(protected)
        elif isinstance(wanted, list):
            disks = sorted(protected & {str(d) for d in wanted})
        else:
            raise CommandFailed(detail="args.disks must be a list of disk ids")
        if not disks:
            raise CommandFailed(detail=f"none of {wanted} is protected here")
        session.replicator.request_resync("requested by the configuration server", disks)
        return "resync of " + ", ".join(disks) + " requested"

    def cmd_drain(self, args: dict[str, Any]) -> dict[str, Any]:
        """A last tag, durable at the process server; then nothing more is shipped.

        ``args.final`` (a cutover) marks the tag final: the master target fences
        the disks once it has applied it, and a ``resume`` cannot undo that.
        """
        if self.drained is not None:
            return {"tag": self.drained, "already": True}
        session = self._current()
        kind = str(args.get("kind") or "crash")
        timeout = float(args.get("timeout") or defaults.TAG_TIMEOUT)
        final = bool(args.get("final"))
        tag = session.replicator.tag(kind, timeout, pause_after=True, final=final)
        with self._lock:
            self.paused = True
            self.drained = tag
        log.info("drained: tag %s is durable at the process server; shipping stopped", tag["id"])
        if final and args.get("digest"):
            return {"tag": _short_tag(tag), "digests": self._digests(session)}
        return {"tag": tag}

    def cmd_verify(self, args: dict[str, Any]) -> dict[str, Any]:
        """Start an online verify; done once it started (the master target reports results)."""
        disks = args.get("disks")
        if disks is not None and not (
            isinstance(disks, list) and all(isinstance(d, str) for d in disks)
        ):
            raise CommandFailed(detail="args.disks must be a list of disk ids")
        verify_id = args.get("verify_id")
        try:
            return self._current().replicator.start_verify(
                disks, repair=bool(args.get("repair")),
                verify_id=verify_id if isinstance(verify_id, str) else None,
            )  # fmt: skip
        except FerryError as exc:
            raise CommandFailed(detail=str(exc.fields.get("problem", exc)))

    def cmd_repair(self, args: dict[str, Any]) -> str:
        """Ship the blocks a verify found differing again (marked dirty: the next pass)."""
        blocks = args.get("blocks")
        if not isinstance(blocks, list) or not all(
            isinstance(b, list) and len(b) == 2 and all(isinstance(x, int) and x >= 0 for x in b)
            for b in blocks
        ):  # fmt: skip
            raise CommandFailed(detail="args.blocks must be [[first, count], ...]")
        try:
            n = self._current().replicator.repair_blocks(str(args.get("disk")), blocks)
        except FerryError as exc:
            raise CommandFailed(detail=str(exc.fields.get("problem", exc)))
        return f"{n} block(s) of {args.get('disk')} will be shipped again"

    def _digests(self, session: Session) -> dict[str, dict[str, Any]]:
        """Each disk's sha256 and size as it stands now (a cutover: the source is quiet).

        The master target checks its VHDs against these: a source written
        after the final tag does not match, and the cutover says so.
        """
        out = {}
        for disk in session.replicator.disks.values():
            size = disk.track.size
            out[disk.id] = {"size": size, "sha256": sha256_of(disk.track.device, size)}
        log.info("digested %d disk(s) after the final tag", len(out))
        return out

    # -- reports --------------------------------------------------------------------------

    def heartbeat(self) -> dict[str, Any]:
        """The status sent with each heartbeat."""
        out: dict[str, Any] = {"version": __version__, **self._state()}
        session = self.session
        if session is not None:
            status = session.status()
            out.update(
                tracker=status["tracker"],
                connected=status["connected"],
                shipper_error=status["last_error"] or None,
                disks=[
                    {"disk": d["disk"], "phase": d["phase"], "gen": d["gen"]}
                    | ({"problem": d["problem"]} if d.get("problem") else {})
                    for d in status["disks"]
                ],
            )
        return out

    def metrics(self) -> dict[str, dict[str, Any]]:
        """Per disk: phase, gen, bytes_to_go, backlog, throughput, rpo_s, last_tag."""
        session = self.session
        if session is None:
            return {}
        now, wall = time.monotonic(), time.time()
        state = self._state()["state"]
        out = {}
        for d in session.status()["disks"]:
            disk = d["disk"]
            durable = self._durable_tag(session, d)
            out[disk] = {
                "phase": state if state in ("paused", "drained") else d["phase"],
                "gen": d["gen"],
                "bytes_to_go": d["bytes_to_go"],
                "backlog": d["backlog_batches"],
                "throughput": self._throughput(disk, d["bytes_shipped"], now),
                "rpo_s": round(wall - durable["t0_wall"], 1) if durable else None,
                "last_tag": durable,
            }
        return out

    def _durable_tag(self, session: Session, disk: dict[str, Any]) -> dict[str, Any] | None:
        """The disk's newest tag acknowledged by the process server (its RPO is measured there)."""
        tag = disk.get("last_tag")
        if tag and session.shipper.wait_acked(disk["disk"], tag["gen"], tag["seq"], 0):
            self._durable[disk["disk"]] = {k: v for k, v in tag.items() if k != "disks"}
        return self._durable.get(disk["disk"])

    def _throughput(self, disk: str, shipped: int, now: float) -> float:
        then, before = self._shipped.get(disk, (now, shipped))
        self._shipped[disk] = (now, shipped)
        return round((shipped - before) / (now - then), 1) if now > then else 0.0


def run(credentials_path: str, local: dict[str, Any], stop: StopFlag) -> int:
    """Server mode's entry: load the credentials and serve (see the module docstring)."""
    return ManagedAgent.serve(credentials_path, local, stop)


def _short_tag(tag: dict[str, Any]) -> dict[str, Any]:
    """A tag without its disk list (the outcome's detail has room for the digests)."""
    return {k: v for k, v in tag.items() if k != "disks"}
