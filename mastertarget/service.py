"""Serving every configured disk: one thread per disk, each owning its disk through the lease.

A disk's thread takes the owner lease (or waits for it), opens its
:class:`~mastertarget.worker.DiskWorker` and steps it until asked to stop.
Storage outages are waited out with a growing back-off; any other error ends
the whole process (the first error is reported), because a master target
that silently drops one of its disks would look healthy while replication
had stopped.

:class:`Service` lets disks be added while it serves (server mode: a
``protect`` command); :func:`serve` is the fixed set of a settings file.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from ferry import segment
from ferry.errors import RetryableError
from ferry.storage import Storage
from mastertarget import cursor as cursors
from mastertarget import defaults
from mastertarget.ownership import Ownership
from mastertarget.settings import DiskSettings, Settings
from mastertarget.status import StatusBoard
from mastertarget.worker import DECODED, TRIMMER, DiskWorker

log = logging.getLogger("ferry.mastertarget")


class DiskRunner(threading.Thread):
    """The thread serving one disk; ``error`` holds what ended it abnormally."""

    def __init__(
        self,
        settings: Settings,
        disk: DiskSettings,
        storage: Callable[[], Storage],
        key: segment.Keys,
        board: StatusBoard,
        stop: threading.Event,
        failed: threading.Event,
        wait: bool = False,
        on_applied: Callable[[str, dict[str, Any], int, int], None] | None = None,
    ) -> None:
        super().__init__(name=f"disk-{disk.id}")
        self.settings = settings
        self.disk = disk
        self.storage = storage
        self.on_applied = on_applied
        self.key = key
        self.board = board
        self.stop = stop
        self.failed = failed
        self.wait = wait
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # handed to the main thread, which reports it
            self.error = exc
            self.failed.set()

    def _serve(self) -> None:
        if self._fenced():
            return
        ownership = Ownership(
            self.storage(),
            self.settings.tenant,
            self.disk.id,
            seconds=self.settings.lease_seconds,
            state_dir=self.settings.state_dir / self.disk.id,
        )
        if not self._retrying(lambda: ownership.acquire(self.wait, self.stop)):
            return
        try:
            worker = self._worker(ownership).open()
            try:
                self._loop(worker)
            finally:
                worker.close()
        finally:
            ownership.release()
        if worker.fenced:
            log.info(
                "disk %s is fenced: no longer served; its owner lease is released", self.disk.id
            )

    def _worker(self, ownership: Ownership | None) -> DiskWorker:
        return DiskWorker(
            self.settings,
            self.disk,
            self.storage(),
            key=self.key,
            ownership=ownership,
            board=self.board,
            stop=self.stop,
            on_applied=self.on_applied,
        )

    def _fenced(self) -> bool:
        """True if the disk was fenced before this run: publish its state, never serve it."""
        path = self.settings.state_dir / self.disk.id / "cursor.json"
        if cursors.load(path, self.settings.tenant, self.disk.id).fenced is None:
            return False
        worker = self._worker(None).open()
        try:
            self._retrying(lambda: worker.publish(at_once=True), attempts=3)
            fenced = worker.cursor.fenced or {}
            log.info(
                "disk %s was fenced at tag %s (%s): not serving it",
                self.disk.id,
                (fenced.get("tag") or {}).get("id"),
                fenced.get("reason"),
            )
        finally:
            worker.close()
        return True

    def _loop(self, worker: DiskWorker) -> None:
        c = worker.cursor
        log.info(
            "serving disk %s (target %s, gen %d, applied seq %d, %d staged)",
            self.disk.id,
            self.disk.target,
            c.gen,
            c.applied_seq,
            len(worker.staging),
        )
        if self.on_applied is not None and c.last_tag and c.applied_seq > 0:
            self.on_applied(self.disk.id, c.last_tag, c.gen, c.applied_seq)  # idempotent
        idle = defaults.IDLE_POLL_MIN
        while not self.stop.is_set() and not worker.fenced:
            done = self._retrying(worker.step)
            if TRIMMER.maybe():
                DECODED.release()
            if done:
                idle = defaults.IDLE_POLL_MIN
                if worker.drained:  # the round emptied the queue (DRAINED_POLL)
                    self.stop.wait(defaults.DRAINED_POLL)
            elif done is not None:
                self.stop.wait(idle)
                idle = min(idle * 2, defaults.IDLE_POLL_MAX)
        self._retrying(lambda: worker.publish(at_once=True), attempts=1)
        log.info("stopped serving disk %s", self.disk.id)

    def _retrying(self, call, attempts: int | None = None):
        """Run ``call`` until it does not raise a retryable error; None if stopped first."""
        delay = defaults.IDLE_POLL_MIN
        warned = False
        while attempts is None or attempts > 0:
            try:
                result = call()
                if warned:
                    log.info("disk %s: storage is reachable again", self.disk.id)
                return result
            except RetryableError as exc:
                if not warned:
                    log.warning("disk %s: %s; retrying", self.disk.id, exc)
                    warned = True
            if attempts is not None:
                attempts -= 1
            if self.stop.wait(delay):
                return None
            delay = min(delay * 2, defaults.ERROR_BACKOFF_MAX)
        return None


class Service:
    """Serves disks, one :class:`DiskRunner` each; :meth:`add` more while it runs."""

    def __init__(
        self,
        settings: Settings,
        storage: Callable[[], Storage],
        key: segment.Keys,
        stop: threading.Event,
        wait: bool = False,
        on_applied: Callable[[str, dict[str, Any], int, int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.key = key
        self.stop = stop
        self.wait = wait
        self.on_applied = on_applied
        self.board = StatusBoard(settings.state_dir / "status.json")
        self.failed = threading.Event()
        self.runners: dict[str, DiskRunner] = {}
        self._lock = threading.Lock()

    def add(self, settings: Settings, disk: DiskSettings) -> bool:
        """Start serving ``disk`` (of ``settings``); False if it is served already."""
        with self._lock:
            if disk.id in self.runners or self.stop.is_set():
                return False
            runner = DiskRunner(
                settings,
                disk,
                self.storage,
                self.key,
                self.board,
                self.stop,
                self.failed,
                self.wait,
                self.on_applied,
            )
            self.runners[disk.id] = runner
            runner.start()
            return True

    def serve_again(self, disk_id: str, unfence: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run ``unfence`` while ``disk_id``'s runner is not serving, then serve it again.

        For a disk whose runner ended because it was fenced (a cutover that was
        not committed); a disk still served is left alone (``serving: true``).
        """
        with self._lock:
            runner = self.runners.get(disk_id)
            if runner is None:
                raise KeyError(disk_id)
            if runner.is_alive():
                return {"disk": disk_id, "changed": False, "serving": True}
            done = unfence()
            fresh = DiskRunner(runner.settings, runner.disk, self.storage, self.key, self.board,
                               self.stop, self.failed, self.wait, self.on_applied)  # fmt: skip
            self.runners[disk_id] = fresh
            fresh.start()
        return done | {"serving": True}

    def serving(self) -> list[str]:
        """Ids of the disks served."""
        with self._lock:
            return sorted(self.runners)

    def run(self, until_idle: bool = True) -> int:
        """Serve until ``stop`` (or a disk fails, or with ``until_idle`` no disk is left).

        Raises the first disk's error, if any.
        """
        while not self.stop.is_set() and not self.failed.is_set():
            if until_idle and not any(r.is_alive() for r in self._runners()):
                break
            self.stop.wait(0.2)
        self.stop.set()  # a failed disk stops the others after their group in hand
        for runner in self._runners():
            runner.join(defaults.STOP_JOIN_TIMEOUT)
        errors = [r.error for r in self._runners() if r.error is not None]
        if errors:
            raise errors[0]
        return 0

    def _runners(self) -> list[DiskRunner]:
        with self._lock:
            return list(self.runners.values())


def serve(
    settings: Settings,
    connection_string: str,
    key: segment.Keys,
    stop: threading.Event,
    wait: bool = False,
) -> int:
    """Serve every disk until ``stop`` is set; raise the first disk's error, if any."""
    service = Service(settings, lambda: Storage(connection_string), key, stop, wait)
    for disk in settings.disks:
        service.add(settings, disk)
    return service.run()
