"""A private tracefs instance that reports block-layer writes of chosen devices.

The instance is ``<tracefs>/instances/<name>``: created on start, removed on
close, never the global buffer.  Its clock is ``mono`` (CLOCK_MONOTONIC), so
event times compare with ``time.clock_gettime(CLOCK_MONOTONIC)``.

Events are read as text from ``trace_pipe`` by one thread.  ``mark()`` writes
a marker into the same ordered stream and returns once the reader has
consumed it: every event recorded before the marker has then been handed to
the callbacks.  Lost events are read from ``per_cpu/cpuN/stats``.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ferry.errors import TrackerUnavailable

log = logging.getLogger("ferry.agent.tracefs")

COMPLETE_EVENTS = ("block_rq_complete", "block_bio_complete")
"""Events that mark blocks dirty: a write is dirty once the kernel reports it complete."""
QUEUE_EVENT = "block_bio_queue"
"""Event that reveals a write racing a read pass."""

_EVENT = re.compile(
    rb"^[^\n]*?-\d+ +\[\d+\] +\S+ +(\d+\.\d+): (\w+): "
    rb"(?:(\d+),(\d+) \S+ (?:\([^\n]*?\) )?(\d+) \+ (\d+)|[^\n]*?ferry-mark (\d+))",
    re.MULTILINE,
)
"""One event line: ``task-pid [cpu] flags ts: event: `` then a block event's
``maj,min rwbs [(cmd) ]sector + n`` or a marker's ``ferry-mark N``. Lines that
are neither (other markers, ``CPU:N [LOST M EVENTS]``) do not match."""

IDLE_WAIT = 0.02
"""Seconds the reader lets events gather after a short read (a marker ends the wait)."""

OnComplete = Callable[[int, int, int, float], None]
"""``(dev, first_sector, sectors, ts)`` of a completed write (ts on the trace clock, s)."""
OnQueue = Callable[[int, int, int, float], None]
"""``(dev, first_sector, sectors, time)`` of a queued write."""
OnMark = Callable[[int, float], None]
"""``(marker number, time)`` when a marker is consumed."""


def mount_point(root: str) -> Path:
    """Return a tracefs mount, mounting it at ``root`` if needed."""
    path = Path(root)
    if (path / "instances").is_dir():
        return path
    debug = Path("/sys/kernel/debug/tracing")
    if (debug / "instances").is_dir():
        return debug
    result = subprocess.run(
        ["mount", "-t", "tracefs", "nodev", str(path)], capture_output=True, text=True
    )
    if result.returncode != 0 or not (path / "instances").is_dir():
        raise TrackerUnavailable(
            device="this host", problem=f"cannot mount tracefs at {path}: {result.stderr.strip()}"
        )
    return path


def remove_instance(root: str, name: str) -> None:
    """Remove instance ``name`` if it exists (one a predecessor left and nobody adopted)."""
    try:
        path = mount_point(root) / "instances" / name
    except TrackerUnavailable:
        return  # no tracefs here: nothing of ours can be left in it
    if path.is_dir():
        try:
            (path / "tracing_on").write_text("0")
            path.rmdir()
        except OSError as exc:
            log.warning("could not remove trace instance %s: %s", path, exc)


INSTANCE_PREFIX = "ferry-"
"""Every agent's trace instance is ``ferry-<machine>-<pid of the agent that made it>``."""


def _instances_dir(root: str) -> Path | None:
    """The instances directory of a mounted tracefs, without mounting one."""
    for base in (Path(root), Path("/sys/kernel/debug/tracing")):
        if (base / "instances").is_dir():
            return base / "instances"
    return None


def _pid_of(name: str) -> int | None:
    machine, _, pid = name.removeprefix(INSTANCE_PREFIX).rpartition("-")
    return int(pid) if name.startswith(INSTANCE_PREFIX) and machine and pid.isdigit() else None


def remove_stale_instances(root: str, keep: str | None = None) -> list[str]:
    """Remove the instances of agents that are gone; return their names.

    An agent killed outright (SIGKILL, the OOM killer) whose state directory
    then went too left its instance recording into kernel memory, and no
    stop record names it for a successor to adopt or remove. An instance is
    stale when the process named in it is gone. Never touched: ``keep`` (the
    instance this agent adopts); one whose process exists (a running agent,
    or a reused pid: left rather than guessed at); one a running agent reads
    under a predecessor's name (an adopted instance), which the kernel
    refuses to remove while its files are open (EBUSY). Nothing is written
    into an instance before removing it, so such a refusal leaves its
    tracing exactly as it was.
    """
    instances = _instances_dir(root)
    if instances is None:
        return []
    removed = []
    for path in sorted(instances.glob(f"{INSTANCE_PREFIX}*")):
        pid = _pid_of(path.name)
        if path.name == keep or pid is None or Path(f"/proc/{pid}").exists():
            continue
        try:
            path.rmdir()
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                log.warning("could not remove stale trace instance %s: %s", path, exc)
            continue
        log.info("removed trace instance %s: its agent (pid %d) is gone", path.name, pid)
        removed.append(path.name)
    return removed


class TraceInstance:
    """A private trace instance streaming write events of ``devs`` to callbacks."""

    def __init__(
        self,
        root: str,
        name: str,
        devs: list[int],
        buffer_kb: int,
        on_complete: OnComplete,
        on_queue: OnQueue,
        on_mark: OnMark,
    ) -> None:
        self.path = mount_point(root) / "instances" / name
        self.devs = devs
        self.buffer_kb = buffer_kb
        self.on_complete = on_complete
        self.on_queue = on_queue
        self.on_mark = on_mark
        self._thread: threading.Thread | None = None
        self._stop = False
        self._fd: int | None = None
        self._marker_fd: int | None = None
        self._pending = b""
        self._longest = 4096
        """The longest read of trace_pipe so far, at least a page: what it gives at once
        when it holds more (a page or two, not what was asked for; 8 KiB here)."""
        self._wake = threading.Event()
        """Set when a marker is written: a pass waits for the reader to consume it."""
        self.events = 0

    # -- lifecycle ------------------------------------------------------------------

    def start(self, adopt: bool = False) -> bool:
        """Create and configure the instance, then start the reader thread.

        With ``adopt``, an instance of this name left running by an orderly
        stop (:meth:`detach`) is taken over as it is, if it traces exactly
        what this one would: the events it recorded meanwhile are read
        first.  Returns True if it was adopted.
        """
        if adopt and self._matches():
            self._open()
            log.info("adopted trace instance %s", self.path)
            return True
        try:
            if self.path.exists():
                self._remove()  # a leftover of a killed agent with our name
            self.path.mkdir()
        except OSError as exc:
            raise TrackerUnavailable(
                device="this host", problem=f"cannot create {self.path}: {exc}"
            )
        try:
            self._configure()
        except OSError as exc:
            self.close()
            raise TrackerUnavailable(
                device="this host", problem=f"cannot configure {self.path}: {exc}"
            )
        self._open()
        return False

    def _open(self) -> None:
        self._fd = os.open(self.path / "trace_pipe", os.O_RDONLY)
        self._marker_fd = os.open(self.path / "trace_marker", os.O_WRONLY)
        self._thread = threading.Thread(target=self._read_loop, name="trace-reader", daemon=True)
        self._thread.start()

    def _filter(self) -> str:
        clause = " || ".join(f"dev == {d}" for d in self.devs)
        return f'({clause}) && !(rwbs ~ "R*")'

    def _matches(self) -> bool:
        """True if the instance exists, runs, and traces what this one would."""
        try:
            if self._read("tracing_on") != "1" or "[mono]" not in self._read("trace_clock"):
                return False
            if self._read("options/overwrite") != "0":
                return False
            for event in COMPLETE_EVENTS + (QUEUE_EVENT,):
                base = self.path / "events" / "block" / event
                if not base.exists():
                    continue
                if (
                    self._read(f"{base}/enable") != "1"
                    or self._read(f"{base}/filter") != self._filter()
                ):
                    return False
            return True
        except OSError:
            return False

    def _read(self, rel: str) -> str:
        return (self.path / rel).read_text().strip()

    def _configure(self) -> None:
        self._write("tracing_on", "0")
        self._write("trace_clock", "mono")
        self._write("buffer_size_kb", str(self.buffer_kb))
        # overwrite=0: a full buffer drops new events and counts them, never
        # silently replaces old ones.
        self._write("options/overwrite", "0")
        filt = self._filter()
        for event in (*COMPLETE_EVENTS, QUEUE_EVENT):
            base = f"events/block/{event}"
            if not (self.path / base).exists():
                continue  # e.g. block_bio_complete on kernels without it
            self._write(f"{base}/filter", filt)
            self._write(f"{base}/enable", "1")
        self._write("tracing_on", "1")

    def _write(self, rel: str, value: str) -> None:
        (self.path / rel).write_text(value)

    def detach(self) -> bool:
        """Stop the reader but leave the instance recording, for a successor to adopt.

        Every event the reader consumed has been handed to the callbacks;
        every other one stays in the ring buffer.  False if that cannot be
        promised (the reader did not stop, or held half an event line).
        """
        self._stop = True
        self._wake.set()  # a reader letting events gather
        if self._marker_fd is not None:
            try:
                os.write(self._marker_fd, b"ferry-detach")  # wakes a reader blocked in read
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        clean = self._thread is not None and not self._thread.is_alive() and not self._pending
        for fd in (self._fd, self._marker_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._marker_fd = None
        self._thread = None
        return clean

    def close(self) -> None:
        """Stop the reader and remove the instance."""
        self._stop = True
        self._wake.set()
        if self._marker_fd is not None and self._thread is not None:
            try:
                os.write(self._marker_fd, b"ferry-stop")
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        for fd in (self._fd, self._marker_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._marker_fd = None
        self._remove()

    def _remove(self) -> None:
        try:
            (self.path / "tracing_on").write_text("0")
        except OSError:
            pass
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)  # busy while a reader still has trace_pipe open
        log.warning("could not remove trace instance %s", self.path)

    # -- markers and counters ---------------------------------------------------------

    def write_marker(self, number: int, timeout: float = 10.0) -> None:
        """Write marker ``number`` into the event stream.

        A full ring buffer (overwrite is off) refuses the marker with EBADF
        until the reader has drained it; it is tried again meanwhile.  Events
        were dropped then, and :meth:`lost_events` counts them.
        """
        assert self._marker_fd is not None
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.write(self._marker_fd, b"ferry-mark %d" % number)
                self._wake.set()
                return
            except OSError as exc:
                if exc.errno != errno.EBADF or time.monotonic() > deadline:
                    raise
            time.sleep(0.01)

    def lost_events(self) -> int:
        """Events lost so far in this instance (dropped plus overrun, all CPUs)."""
        total = 0
        for stats in (self.path / "per_cpu").glob("cpu*/stats"):
            try:
                text = stats.read_text()
            except OSError:
                continue
            for line in text.splitlines():
                key, _, value = line.partition(":")
                if key.strip() in ("overrun", "dropped events"):
                    total += int(value.strip() or 0)
        return total

    # -- reader thread ----------------------------------------------------------------

    def _read_loop(self) -> None:
        while not self._stop:
            fd = self._fd
            if fd is None:  # closed
                return
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError as exc:
                log.error("trace pipe read failed: %s", exc)
                return
            if not chunk:
                time.sleep(0.01)
                continue
            self._take(chunk)
            self._longest = max(self._longest, len(chunk))
            if len(chunk) < self._longest // 2:
                # A short read means the stream is not busy: let events gather
                # instead of waking for every few (each wake-up costs the agent
                # more CPU than the events it reads), unless a marker was written
                # meanwhile, which a pass is waiting for.  A read as long as the pipe
                # gives is read on from at once (waiting after those, the reader fell
                # behind at 50 MB/s).
                self._wake.wait(IDLE_WAIT)
                self._wake.clear()

    def _take(self, chunk: bytes) -> None:
        """Feed what ``chunk`` completes; a line cut short waits for the rest of it."""
        data = self._pending + chunk
        cut = data.rfind(b"\n") + 1
        self._pending = data[cut:]
        self._feed(data[:cut])

    def _feed(self, lines: bytes) -> None:
        """Hand the events of whole ``lines`` to the callbacks, in order.

        One regular expression over the whole read (``findall``), not a match
        per line and per field: at 20 MB/s of random writes the reader takes
        two events per write, and handling them was a seventh of the agent's
        CPU (4.6 µs per event to parse that way, 3.0 this way).
        """
        for ts, event, major, minor, sector, n, mark in _EVENT.findall(lines):
            if event == b"tracing_mark_write":
                if mark:
                    self.on_mark(int(mark), float(ts))
                continue
            if not n or n == b"0":
                continue  # not a block event of ours; a flush carries no data
            self.events += 1
            dev = (int(major) << 20) | int(minor)
            if event == b"block_bio_queue":
                self.on_queue(dev, int(sector), int(n), float(ts))
            else:
                self.on_complete(dev, int(sector), int(n), float(ts))
