"""Ownership of a disk through the blob lease ``<tenant>/<disk>/owner.lease`` (control container).

Exactly one master target owns a disk (invariant 9).  The lease is renewed
by a background thread well within its duration; :meth:`Ownership.check`
raises :class:`LeaseLost` as soon as the lease was lost *or* has gone
unrenewed for longer than is safe, so a stuck renewal also stops the writes.

A master target that crashed leaves its lease held until it runs out (up to
``lease_seconds``).  So that a restart does not have to wait for it, the
lease id is kept in ``<state_dir>/<disk>/lease.json`` and the disk's state
directory is locked (``flock``) while it is served: holding the lock proves
that no live process of this host serves the disk from this state, so a
lease that still carries our saved id belongs to a dead predecessor and may
be released and taken again.  A lease with any other id is someone else's.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from pathlib import Path

from ferry import durable, naming
from ferry.errors import LeaseHeld, RetryableError
from ferry.storage import Lease, Storage
from mastertarget import defaults, layout
from mastertarget.errors import LeaseLost, StateInUse

log = logging.getLogger("ferry.mastertarget")


def try_lock_state(lock: Path) -> int | None:
    """Take a disk's state lock (``layout.state_lock_path``) without waiting.

    The descriptor that holds it, or None while another process holds it.
    Closing the descriptor drops the lock. Whoever serves the disk holds it
    for as long as it serves it; whoever changes the disk's state while
    nothing serves it (an operator's resume after a cutover) holds it meanwhile.
    """
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class Ownership:
    """The owner lease of one disk, held and renewed in the background."""

    def __init__(
        self,
        storage: Storage,
        tenant: str,
        disk: str,
        seconds: int = defaults.LEASE_SECONDS,
        renew_every: float = defaults.LEASE_RENEW_EVERY,
        state_dir: Path | None = None,
    ) -> None:
        self.storage = storage
        self.disk = disk
        self.blob = naming.lease_blob(tenant, disk)
        self.container = naming.control_container(tenant, disk)
        self.seconds = seconds
        self.renew_every = min(renew_every, seconds / 3)
        self.state_dir = Path(state_dir) if state_dir else None
        self._stack = contextlib.ExitStack()
        self._lease: Lease | None = None
        self._renewed = 0.0
        self._lost: str | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._locked = False

    def acquire(self, wait: bool = False, stop: threading.Event | None = None) -> bool:
        """Take the lease and start renewing it; True once held.

        Raises LeaseHeld if another master target holds it, unless ``wait``:
        then it retries (logging once) until it gets the lease or ``stop`` is
        set, in which case it returns False.  Raises StateInUse if another
        process of this host serves the disk from the same state directory.
        """
        stop = stop or threading.Event()
        self._lock_state()
        logged = False
        reclaimable = True
        while not stop.is_set():
            try:
                self._take()
                return True
            except LeaseHeld as exc:
                if reclaimable and self._reclaim():
                    reclaimable = False  # retry at once, but only once
                    continue
                if not wait:
                    raise
                if not logged:
                    log.info("%s; waiting for it", _first_clause(exc))
                    logged = True
            stop.wait(defaults.LEASE_RETRY_EVERY)
        return False

    def _lock_state(self) -> None:
        if self.state_dir is None or self._locked:
            return
        fd = try_lock_state(self.state_dir / layout.STATE_LOCK)
        if fd is None:
            raise StateInUse(path=self.state_dir)
        self._stack.callback(os.close, fd)  # closing the descriptor drops the lock
        self._locked = True

    def _reclaim(self) -> bool:
        """Release a lease left by a dead predecessor with this state; True if done."""
        saved = durable.read_json(_lease_file(self.state_dir)) if self.state_dir else None
        if not isinstance(saved, dict) or not isinstance(saved.get("lease_id"), str):
            return False
        if not self.storage.release_lease(self.container, self.blob, saved["lease_id"]):
            return False  # the lease carries another id: a live owner elsewhere
        log.info("disk %s: released the owner lease left by a previous run", self.disk)
        return True

    def _take(self) -> None:
        lease = self._stack.enter_context(
            self.storage.lease(self.container, self.blob, self.disk, self.seconds)
        )
        self._lease = lease
        self._renewed = time.monotonic()
        if self.state_dir is not None:
            durable.write_json(_lease_file(self.state_dir), {"lease_id": lease.id})
        self._thread = threading.Thread(
            target=self._renew_loop, args=(lease,), name=f"lease-{self.disk}", daemon=True
        )
        self._thread.start()

    def _renew_loop(self, lease: Lease) -> None:
        delay = self.renew_every
        while not self._done.wait(delay):
            try:
                lease.renew()
                self._renewed = time.monotonic()
                delay = self.renew_every
            except RetryableError as exc:
                # Storage may come back before the lease runs out; check() keeps
                # the writes safe meanwhile by looking at the renewal's age.
                log.warning("cannot renew the owner lease of disk %s yet: %s", self.disk, exc)
                delay = defaults.LEASE_RETRY_AFTER_ERROR
            except Exception as exc:  # any refusal means another owner may exist
                self._lost = _describe(exc)
                return

    def check(self) -> None:
        """Raise LeaseLost unless the lease is held and was renewed recently enough."""
        if self._lost is not None:
            raise LeaseLost(disk=self.disk, problem=self._lost)
        age = time.monotonic() - self._renewed
        if age > max(self.seconds - defaults.LEASE_MARGIN, self.seconds / 2):
            raise LeaseLost(disk=self.disk, problem=f"not renewed for {age:.0f} s")

    @property
    def lost(self) -> bool:
        """True once the lease is known to be lost."""
        try:
            self.check()
        except LeaseLost:
            return True
        return False

    def release(self) -> None:
        """Stop renewing, give the lease up and unlock the state; safe to call twice."""
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._stack.close()
        self._locked = False


def _first_clause(exc: Exception) -> str:
    # LeaseHeld's message ends with advice for the command line ("or run with
    # --wait"), which makes no sense once we are waiting.
    return str(exc).split(";")[0]


def _describe(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _lease_file(state_dir: Path) -> Path:
    """Where the id of the lease taken with this state is kept."""
    return state_dir / "lease.json"
