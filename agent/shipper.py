"""The agent's connection to its process server (mutual TLS, then Ferry's own records where
the process server takes them: ferry.wire, ferry.records).

``send_batch`` blocks while ``window`` batches are unacknowledged: that is
the agent's backpressure, and why its memory stays bounded when the process
server or the cloud is slow (the dirty map grows instead).  A lost connection
is re-established with backoff, and every unacknowledged batch is sent again,
unchanged and in order, before any new one.  Resync answers and resync demands arrive as events
in ``inbox``.
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from agent import defaults
from ferry import pki, records, tlsbuffer, wire
from ferry.batch import Batch, Payload
from ferry.errors import FerryError

log = logging.getLogger("ferry.agent.shipper")


class Shipper:
    """Sends batches to the process server and tracks their acknowledgements."""

    def __init__(
        self,
        address: tuple[str, int],
        server_name: str,
        ca: str,
        cert: str,
        key: str,
        hello: dict[str, Any],
        window: int,
    ) -> None:
        self.address = address
        self.server_name = server_name
        self.context = pki.client_context(ca, cert, key)
        self.hello = hello
        self.window = window
        self.inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        self.on_inbox: Callable[[], None] = lambda: None
        """Called after each event is put in ``inbox`` (the replicator wakes to take it)."""
        self._cv = threading.Condition()
        self._unacked: dict[tuple[str, int, int], Batch] = {}
        self._requests: dict[str, dict[str, Any]] = {}
        self._sock: wire.Conn | None = None
        self._send_lock = threading.Lock()
        self._stop = False
        self.connected = False
        self.last_error = ""
        self.bytes_sent = 0
        self.bytes_resent = 0
        """Payload bytes sent again after a reconnection (batches not acknowledged before)."""
        self.batches_acked = 0
        self._thread = threading.Thread(target=self._run, name="shipper", daemon=True)

    def start(self) -> None:
        """Connect in the background (and keep reconnecting)."""
        self._thread.start()

    def interrupt(self) -> None:
        """Drop the connection (it reconnects): unblocks a send the peer stopped reading."""
        self._lost("interrupted by the agent's stop")

    def close(self) -> None:
        """Close the connection and stop reconnecting."""
        self._stop = True
        with self._cv:
            self._cv.notify_all()
        self._drop_socket()
        self._thread.join(timeout=5)

    # -- what the agent calls -------------------------------------------------------

    def send_batch(self, batch: Batch, stop: threading.Event | None = None) -> bool:
        """Queue ``batch`` for sending; blocks while the window is full.

        Once ``stop`` is set the batch is queued whatever the window: an orderly
        stop keeps every unacknowledged batch for the next start (agent.session),
        and a replicator held here (the network gone first, as at a reboot)
        would outlive the stop.  Returns False if the shipper is closed.
        """
        key = (batch.disk, batch.gen, batch.seq)
        with self._cv:
            while len(self._unacked) >= self.window and not (stop is not None and stop.is_set()):
                if self._stop:
                    return False
                self._cv.wait(0.2)
            self._unacked[key] = batch
        self._try_send({"type": "batch", "batch": batch.header()}, batch.payload)
        return True

    def preload(self, batches: list[Batch]) -> None:
        """Take over batches a previous run sent and never saw acknowledged (before start).

        They are sent first, with their seqs, when the connection is up; the
        process server takes a re-sent seq as the one it may already hold.
        """
        with self._cv:
            for batch in batches:
                self._unacked[(batch.disk, batch.gen, batch.seq)] = batch

    def pending(self, disk: str, gen: int | None) -> list[Batch]:
        """``disk``'s unacknowledged batches of generation ``gen``, in seq order."""
        with self._cv:
            mine = [b for (d, g, _), b in self._unacked.items() if d == disk and g == gen]
        return sorted(mine, key=lambda b: b.seq)

    def request_resync(self, disk: str, request_id: str, block_size: int) -> None:
        """Ask the master target (through the process server) to start a new generation."""
        frame = {"type": "resync", "disk": disk, "request_id": request_id, "block_size": block_size}
        with self._cv:
            self._requests[disk] = frame
        self._try_send(frame)

    def forget_disk(self, disk: str, before_gen: int | None = None) -> None:
        """Drop unacknowledged batches of ``disk`` older than ``before_gen`` (all if None)."""
        with self._cv:
            for key in [k for k in self._unacked if k[0] == disk]:
                if before_gen is None or key[1] < before_gen:
                    del self._unacked[key]
            self._cv.notify_all()

    def unacked(self, disk: str | None = None) -> int:
        """Batches sent but not yet acknowledged (for one disk, or all)."""
        with self._cv:
            return sum(1 for k in self._unacked if disk is None or k[0] == disk)

    def wait_acked(self, disk: str, gen: int | None, seq: int, timeout: float) -> bool:
        """Wait until batch ``(disk, gen, seq)`` is acknowledged; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while (disk, gen, seq) in self._unacked:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop:
                    return False
                self._cv.wait(min(left, 0.2))
            return True

    # -- connection -------------------------------------------------------------------

    def _try_send(self, header: dict[str, Any], payload: Payload = b"", sock: Any = None) -> bool:
        """Send a frame on ``sock`` (default: the open connection); False if it failed."""
        if sock is None:
            sock = self._sock
        if sock is None:
            return False  # sent on reconnect
        try:
            with self._send_lock:
                wire.send(sock, header, payload)
            if header["type"] == "batch":
                self.bytes_sent += len(payload)
            return True
        except (OSError, ssl.SSLError) as exc:
            self._lost(f"send failed: {exc}")
            return False

    def _lost(self, why: str) -> None:
        if self.connected:
            log.warning("lost the process server at %s:%d (%s); reconnecting", *self.address, why)
        self.last_error = why
        self._drop_socket()

    def _drop_socket(self) -> None:
        sock, self._sock = self._sock, None
        self.connected = False
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _run(self) -> None:
        pause = defaults.RECONNECT_MIN
        while not self._stop:
            try:
                sock = self._connect()
            except (OSError, ssl.SSLError, FerryError) as exc:
                if self.last_error != str(exc):
                    log.warning("cannot reach the process server at %s:%d: %s", *self.address, exc)
                self.last_error = str(exc)
                time.sleep(pause)
                pause = min(pause * 2, defaults.RECONNECT_MAX)
                continue
            pause = defaults.RECONNECT_MIN
            self.last_error = ""
            log.info("connected to the process server at %s:%d", *self.address)
            if self._resend(sock):
                self._receive(sock)
            else:
                sock.close()

    def _connect(self) -> wire.Conn:
        """Connect, shake hands, say hello; the connection in Ferry's own records where the
        process server takes them (``ferry.records``), else in TLS records, gathered."""
        raw = socket.create_connection(self.address, timeout=10)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = self.context.wrap_socket(raw, server_hostname=self.server_name)
        sock.settimeout(None)
        offered = records.offer(sock)
        offer = {"records": offered} if offered else {}
        try:
            wire.send(sock, {"type": "hello", **self.hello, **offer})
            reply = wire.recv(sock, "process server")
            if reply is None or reply[0].get("type") != "welcome":
                message = reply[0].get("message", reply[0]) if reply else "closed the connection"
                raise FerryError(detail=f"process server refused hello: {message}")
            taken = reply[0].get("records")
            if taken is None:
                tlsbuffer.buffer(sock, write=defaults.TLS_WRITE_BUFFER)
                return sock
            if taken not in offered:
                raise FerryError(
                    detail=f"process server answered with records {taken!r}, not offered"
                )
            return records.switch(sock, taken, server_side=False)
        except BaseException:
            sock.close()
            raise

    def _resend(self, sock: wire.Conn) -> bool:
        """Send the pending requests and every unacknowledged batch, then open for new ones.

        What is queued meanwhile waits for this loop (the socket is not yet
        ``_sock``), so the old batches go first, in order; one queued just as
        the socket opens may go twice (a resend, harmless).  False if a send failed.
        """
        sent: set[Any] = set()
        while True:
            with self._cv:
                frames: list[tuple[dict[str, Any], Payload]] = [
                    (f, b"") for f in self._requests.values() if id(f) not in sent
                ]
                batches = sorted(
                    (b for k, b in self._unacked.items() if k not in sent),
                    key=lambda b: (b.disk, b.gen, b.seq),
                )
                if (not frames and not batches) or self._stop:
                    self._sock = sock
                    self.connected = True
                    return True
            frames += [({"type": "batch", "batch": b.header()}, b.payload) for b in batches]
            for header, payload in frames:
                if not self._try_send(header, payload, sock):
                    return False
                if header["type"] == "batch":
                    self.bytes_resent += len(payload)
                    key = header["batch"]
                    sent.add((key["disk"], key["gen"], key["seq"]))
                else:
                    sent.add(id(header))  # the request's own frame, as kept in _requests

    def _receive(self, sock: wire.Conn) -> None:
        while not self._stop:
            try:
                frame = wire.recv(sock, "process server")
            except (OSError, ssl.SSLError, FerryError) as exc:
                self._lost(str(exc))
                return
            if frame is None:
                self._lost("connection closed")
                return
            self._handle(frame[0], frame[1])

    def _handle(self, header: dict[str, Any], payload: bytearray) -> None:
        kind = header["type"]
        if kind == "ack":
            # As the peer sent them: a key that matches nothing acknowledges nothing.
            key: tuple[Any, Any, Any] = (header.get("disk"), header.get("gen"), header.get("seq"))
            with self._cv:
                if self._unacked.pop(key, None) is not None:
                    self.batches_acked += 1
                self._cv.notify_all()
        elif kind == "resync-answer":
            with self._cv:
                disk: Any = header.get("disk")  # as the peer sent it
                pending = self._requests.get(disk)
                if pending and pending["request_id"] == header.get("request_id"):
                    del self._requests[header["disk"]]
            self.inbox.put({**header, "digests": payload})
            self.on_inbox()
        elif kind == "resync-required":
            self.inbox.put(header)
            self.on_inbox()
        elif kind == "error":
            log.error("process server reported: %s", header.get("message"))
        else:
            log.warning("ignoring unknown frame type %r from the process server", kind)
