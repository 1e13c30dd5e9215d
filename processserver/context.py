"""What the threads of one process server share: settings, spool, storage, counters."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Protocol

from ferry import memory
from ferry.storage import Storage
from processserver import defaults
from processserver.health import StorageHealth
from processserver.settings import Settings
from processserver.spool import Spool


class Peer(Protocol):
    """What the rest of the server needs of an agent connection."""

    tenant: str | None
    disks: frozenset[str]
    throttled: bool

    def describe(self) -> dict[str, Any]: ...

    def notify_resync_required(self, disk: str, gen: int, reason: str) -> None: ...

    def stop_reading(self) -> None: ...


class Stats:
    """Counters since start, safe to bump from any thread."""

    NAMES = (
        "batches_received",
        "bytes_received",
        "segments_uploaded",
        "bytes_uploaded_raw",
        "bytes_uploaded_compressed",
        "batches_quarantined",
        "resync_requests",
        "resync_answers",
        "connections_refused",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.NAMES, 0)
        self.started = time.time()

    def add(self, **counts: int) -> None:
        """Add to the named counters (``stats.add(batches_received=1, bytes_received=n)``)."""
        with self._lock:
            for name, value in counts.items():
                self._counts[name] += value

    def snapshot(self) -> dict[str, int]:
        """A copy of every counter."""
        with self._lock:
            return dict(self._counts)


class Registry:
    """The live agent connections."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._peers: set[Peer] = set()

    def add(self, peer: Peer) -> None:
        """Register a new connection."""
        with self._cond:
            self._peers.add(peer)

    def discard(self, peer: Peer) -> None:
        """Forget a connection that ended (absent is fine)."""
        with self._cond:
            self._peers.discard(peer)
            self._cond.notify_all()

    def live(self) -> list[Peer]:
        """A copy of the current connections."""
        with self._cond:
            return list(self._peers)

    def __len__(self) -> int:
        with self._cond:
            return len(self._peers)

    def wait_empty(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every connection to end; True if they have."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._peers, timeout)


@dataclasses.dataclass
class Context:
    """The process server's shared state, handed to every thread."""

    settings: Settings
    spool: Spool
    storage: Storage
    segment_key: bytes | None
    stats: Stats = dataclasses.field(default_factory=Stats)
    health: StorageHealth = dataclasses.field(default_factory=StorageHealth)
    peers: Registry = dataclasses.field(default_factory=Registry)
    stopping: threading.Event = dataclasses.field(default_factory=threading.Event)
    trimmer: memory.AfterBurst = dataclasses.field(
        default_factory=lambda: memory.AfterBurst(defaults.TRIM_LARGE, defaults.TRIM_AFTER)
    )
