"""One agent connection: TLS handshake, hello, then batches and resync requests (in
Ferry's own records where the agent offers them: ferry.records).

The connection's own thread reads frames and answers batches; relay threads
write to the same socket, so every write holds ``_send_lock``.  Bad input
gets an ``error`` frame and the connection closes: one agent's mistake never
touches the server or the other agents.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import threading
import time
from typing import Any

from ferry import __version__, pki, records, tlsbuffer, wire
from ferry.batch import Batch
from ferry.errors import ProtocolError
from ferry.naming import REQUEST_ID_RE, check_id
from processserver import defaults
from processserver.context import Context
from processserver.relay import ResyncRelay
from processserver.spool import Spooled, SpoolKey

log = logging.getLogger("ferry.processserver.connection")


"""Resync request ids become part of a blob name (the master target checks the same)."""

SERVER_NAME = f"ferry-process-server/{__version__}"
"""What ``welcome`` says the server is."""


Frame = tuple[dict[str, Any], bytearray]
_END: Any = object()
"""Stands for the end of the stream, met while grouping batches."""


class Rejected(Exception):
    """The agent sent something unacceptable; the message goes back in an ``error`` frame."""


class Connection:
    """Serves one agent until it disconnects or the server stops."""

    def __init__(self, ctx: Context, sock: ssl.SSLSocket, address: tuple) -> None:
        self.ctx = ctx
        self.tls = sock
        """The TLS socket: the handshake, hello, and the certificate's names."""
        self.sock: wire.Conn = sock
        """What frames travel on: ``tls``, or after welcome Ferry's own records (ferry.records)."""
        self.address = f"{address[0]}:{address[1]}"
        self.peer = "unknown"
        self.tenant: str | None = None
        self.machine: str | None = None
        self.disks: frozenset[str] = frozenset()
        self.since = time.time()
        self.throttled = False
        self._full_warned = (
            -defaults.SPOOL_FULL_WARN_EVERY
        )  # monotonic time of the last "filesystem is full"
        self.closed = threading.Event()
        self._send_lock = threading.Lock()
        self._demanded: set[tuple[str, int]] = set()
        self._relays: dict[str, ResyncRelay] = {}

    # -- lifetime --------------------------------------------------------------------------

    def run(self) -> None:
        """Thread body: handshake, hello, frames; always ends with the socket closed."""
        try:
            self._open()
            self._serve()
        except Rejected as exc:
            log.warning("closing %s (%s): %s", self.address, self.peer, exc)
            self.send({"type": "error", "message": str(exc)})
        except ProtocolError as exc:
            log.warning("closing %s (%s): %s", self.address, self.peer, exc)
            self.send({"type": "error", "message": str(exc)})
        except ssl.SSLError as exc:
            self._ssl_failed(exc)
        except OSError as exc:
            log.info("connection %s (%s) ended: %s", self.address, self.peer, exc)
        except Exception:  # a bug: say so, and keep serving everyone else
            log.exception("connection %s (%s) failed", self.address, self.peer)
            self.send({"type": "error", "message": "internal error in the process server"})
        finally:
            self._close()

    def _open(self) -> None:
        """TLS handshake (the client certificate is verified here) and hello, both timed."""
        tls = self.tls
        tls.settimeout(defaults.HANDSHAKE_TIMEOUT)
        tls.do_handshake()
        self.peer = pki.peer_name(tls)
        frame = wire.recv(tls, self.address)  # unbuffered: a read buffer could take bytes past TLS
        if frame is None:
            raise OSError("closed before hello")
        self._hello(frame[0])
        # From here on the agent may be quiet for as long as its disks are.
        self.sock.settimeout(None)

    def _ssl_failed(self, exc: ssl.SSLError) -> None:
        if self.peer == "unknown" and _silent_probe(exc):
            # A port check (or a load balancer) that connects and leaves: not an intruder.
            log.debug("%s closed before the TLS handshake", self.address)
        elif self.peer == "unknown":
            self.ctx.stats.add(connections_refused=1)
            log.warning("refused %s: TLS handshake failed (%s)", self.address, exc.reason or exc)
        else:
            log.info("connection %s (%s) ended: %s", self.address, self.peer, exc)

    def _close(self) -> None:
        self.closed.set()
        self.ctx.peers.discard(self)
        # Not under a relay's write if we can help it; but a write stuck on a
        # peer that stopped reading must not keep this thread forever.
        locked = self._send_lock.acquire(timeout=defaults.HANDSHAKE_TIMEOUT)
        try:
            self.sock.close()
        except OSError:
            pass
        finally:
            if locked:
                self._send_lock.release()
        if self.tenant:
            log.info("agent %s/%s (%s) disconnected", self.tenant, self.machine, self.address)

    def stop_reading(self) -> None:
        """Make the connection's thread stop after the frame in hand (used on shutdown).

        Shuts down only the read side, so the batch being spooled is still
        acknowledged.  ``socket.socket.shutdown`` is called on purpose:
        ``SSLSocket.shutdown`` would also drop the TLS state and break that ack.
        """
        try:
            raw = self.sock.sock if isinstance(self.sock, records.RecordSocket) else self.sock
            socket.socket.shutdown(raw, socket.SHUT_RD)
        except OSError:
            pass

    def describe(self) -> dict[str, Any]:
        """This connection as shown in status.json."""
        return {
            "address": self.address,
            "cn": self.peer,
            "tenant": self.tenant,
            "machine": self.machine,
            "disks": sorted(self.disks),
            "since": self.since,
            "throttled": self.throttled,
            "records": self.sock.protocol if isinstance(self.sock, records.RecordSocket) else "tls",
        }

    # -- writing ---------------------------------------------------------------------------

    def send(self, header: dict[str, Any], payload: bytes = b"") -> bool:
        """Send one frame (from any thread); False if the connection is gone."""
        if self.closed.is_set():
            return False
        try:
            with self._send_lock:
                wire.send(self.sock, header, payload)
            return True
        except (OSError, ValueError) as exc:  # ValueError: the socket was closed meanwhile
            log.debug("cannot send %s to %s: %s", header.get("type"), self.address, exc)
            self.stop_reading()
            return False

    def notify_resync_required(self, disk: str, gen: int, reason: str) -> None:
        """Tell the agent that generation ``gen`` of ``disk`` needs a resync (once per gen)."""
        if (disk, gen) in self._demanded:
            return
        if self.send({"type": "resync-required", "disk": disk, "gen": gen, "reason": reason}):
            self._demanded.add((disk, gen))
            log.warning("told %s/%s that %s gen %d needs a resync: %s",
                        self.tenant, self.machine, disk, gen, reason)  # fmt: skip

    # -- reading ---------------------------------------------------------------------------

    def _serve(self) -> None:
        waiting: Frame | None = None  # a frame read past a group of batches, not handled yet
        while True:
            if waiting is None:
                self._wait_for_room()
                frame = wire.recv(self.sock, self.address)
            else:
                frame, waiting = (None if waiting is _END else waiting), None
            if frame is None:
                return
            header, payload = frame
            if header["type"] == "batch":
                waiting = self._on_batches(self._batch(header, payload))
            elif header["type"] == "resync":
                self._on_resync(header, payload)
            else:
                raise Rejected(f"unexpected frame type {header['type']!r}")

    def _wait_for_room(self) -> None:
        """Backpressure: while the spool is over its limit, read nothing (the agent's sends block)."""
        spool = self.ctx.spool
        if not spool.over_limit():
            return
        used, _ = spool.usage()
        log.warning("throttling %s/%s: the spool holds %d bytes, over its limit of %d; "
                    "waiting for uploads", self.tenant, self.machine, used, spool.limit)  # fmt: skip
        self.throttled = True
        try:
            while not spool.wait_for_room(1.0) and not self.ctx.stopping.is_set():
                pass
        finally:
            self.throttled = False
        if not self.ctx.stopping.is_set():
            log.info("resumed receiving from %s/%s", self.tenant, self.machine)

    def _hello(self, header: dict[str, Any]) -> None:
        if header["type"] != "hello":
            raise Rejected(f"expected hello, got {header['type']!r}")
        tenant, machine, disks = header.get("tenant"), header.get("machine"), header.get("disks")
        problem = check_id("tenant", tenant) or check_id("machine", machine)
        if not isinstance(disks, list) or not disks:
            raise Rejected(problem or "disks must be a non-empty list of disk ids")
        for disk in disks if not problem else []:
            problem = problem or check_id("disk", disk)
        if problem:
            raise Rejected(problem)
        assert isinstance(tenant, str) and isinstance(machine, str)  # check_id said so
        problem = self._identity_problem(tenant, machine, disks)
        if problem:
            raise Rejected(problem)
        self.tenant, self.machine, self.disks = tenant, machine, frozenset(disks)
        offered = header.get("records")
        runs = self.ctx.settings.record_protocols
        taken = records.choose(offered, runs) if records.offer(self.tls) else None
        welcome = {"type": "welcome", "server": SERVER_NAME}
        with self._send_lock:  # nothing else is sent on TLS between welcome and the switch
            wire.send(self.tls, {**welcome, "records": taken} if taken else welcome)
            if taken:
                self.sock = records.switch(self.tls, taken, server_side=True)
            else:
                tlsbuffer.buffer(self.tls, read=defaults.TLS_READ_BUFFER)
        log.info("agent %s/%s (%s, certificate %s) connected with disks %s, in %s",
                 tenant, machine, self.address, self.peer, ", ".join(sorted(disks)),
                 f"Ferry's records ({taken})" if taken else "TLS records")  # fmt: skip

    def _identity_problem(self, tenant: str, machine: str, disks: list[str]) -> str | None:
        """Why this agent may not send for ``tenant``/``machine``/``disks``, or None.

        The tenant and the machine come from the certificate, never from the
        hello alone; the disks from what the configuration server registered
        for the machine (``agents``), when the process server was told.
        """
        bound = pki.peer_tenants(self.tls)
        if not bound:
            return (
                f"certificate {self.peer} is bound to no tenant (issue agent certificates "
                "with their tenant and machine: ferry pki issue --tenant T --machine M)"
            )
        if "*" not in bound and tenant not in bound:
            return f"certificate {self.peer} is not bound to tenant {tenant}"
        settings = self.ctx.settings
        if settings.tenant is not None and tenant != settings.tenant:
            return f"this process server serves tenant {settings.tenant}, not {tenant}"
        machines = pki.peer_machines(self.tls)
        if "*" not in machines and machine not in machines:
            return (
                f"certificate {self.peer} is for machine {', '.join(sorted(machines))}, "
                f"not {machine}"
                if machines
                else f"certificate {self.peer} names no machine (reissue it with --machine)"
            )
        if settings.agents is not None:
            known = settings.agents.get(machine)
            if known is None:
                return f"machine {machine} is not protected through this process server"
            unknown = sorted(set(disks) - set(known))
            if unknown:
                return f"disk(s) {', '.join(unknown)} are not registered for machine {machine}"
        return None

    def _batch(self, header: dict[str, Any], payload: bytearray) -> Batch:
        """The batch of a ``batch`` frame; Rejected if it is malformed or not this agent's."""
        raw = header.get("batch")
        if not isinstance(raw, dict):
            raise Rejected("batch frame without a batch header")
        try:
            batch = Batch.from_header(raw, payload)
        except ValueError as exc:
            raise Rejected(f"malformed batch: {exc}")
        problem = self._batch_problem(batch)
        if problem:
            raise Rejected(problem)
        return batch

    def _on_batches(self, first: Batch) -> Frame | None:
        """Spool ``first`` with the batches already waiting behind it, durably and together
        (group commit), then acknowledge each; return a frame read past the group, if any.

        Only frames already arrived join the group, so a batch never waits for
        another; each ack still follows its batch's fsync (invariant 5).
        """
        group, after = [first], None
        spool = self.ctx.spool
        try:
            while (
                len(group) < defaults.GROUP_BATCHES
                and spool.usage()[0] + sum(len(b.payload) for b in group) <= spool.limit
                and self._frame_waiting()
            ):  # the limit counts the group: still at most one frame is read past it
                frame = wire.recv(self.sock, self.address)
                if frame is None or frame[0]["type"] != "batch":
                    after = _END if frame is None else frame
                    break
                batch = self._batch(*frame)
                if any(SpoolKey.of(b) == SpoolKey.of(batch) for b in group):
                    after = frame  # a resend of one in the group: spooled after it, as sent
                    break
                group.append(batch)
        finally:  # also before a Rejected propagates: what came before it is kept and acked
            self._store(group)
            for batch in group:
                self.ctx.stats.add(batches_received=1, bytes_received=len(batch.payload))
                self.send({"type": "ack", "disk": batch.disk, "gen": batch.gen, "seq": batch.seq})
        return after

    def _frame_waiting(self) -> bool:
        """True if the agent's next frame has begun to arrive (reading it will not wait long)."""
        sock = self.sock
        if isinstance(sock, (ssl.SSLSocket, records.RecordSocket)) and sock.pending():
            return True  # a record opened, not all taken
        if tlsbuffer.pending(sock):
            return True
        return wire.readable(sock)

    def _store(self, batches: list[Batch]) -> None:
        """Pack ``batches`` as segments and spool them; while the spool's filesystem is full,
        wait for room as over the limit.

        Refusing would close the connection, and the agent would send its whole
        window again and again while the disk stays full.
        """
        key, settings = self.ctx.segment_key, self.ctx.settings
        items = [
            Spooled.pack(batch, key, settings.compression_level, settings.cipher)
            for batch in batches
        ]
        full_since = None
        while True:
            try:
                self.ctx.spool.store_group(items)
                break
            except OSError as exc:
                if exc.errno != errno.ENOSPC or self.ctx.stopping.is_set():
                    first, last = batches[0], batches[-1]
                    log.error("cannot spool %s/%s gen %d seq %d-%d: %s", first.tenant, first.disk,
                              first.gen, first.seq, last.seq, exc)  # fmt: skip
                    raise Rejected(
                        "the process server cannot spool the batch; it will be sent again"
                    )
                if full_since is None:
                    full_since = time.monotonic()
                    self.throttled = True
                    self._warn_full()
                self.ctx.stopping.wait(defaults.SPOOL_FULL_RETRY)
        if full_since is not None:
            self.throttled = False
            log.debug("resumed receiving from %s/%s after %.1f s with the spool's filesystem full",
                      self.tenant, self.machine, time.monotonic() - full_since)  # fmt: skip

    def _warn_full(self) -> None:
        """Say the filesystem is full, once a minute at most (it fills and frees by the batch)."""
        now = time.monotonic()
        if now - self._full_warned >= defaults.SPOOL_FULL_WARN_EVERY:
            self._full_warned = now
            log.warning("throttling %s/%s: the spool's filesystem is full; "
                        "waiting for uploads to free space", self.tenant, self.machine)  # fmt: skip

    def _batch_problem(self, batch: Batch) -> str | None:
        """Why a well-formed batch is still not acceptable on this connection, or None."""
        if batch.tenant != self.tenant:
            return f"batch of tenant {batch.tenant!r} on a connection of tenant {self.tenant!r}"
        if batch.disk not in self.disks:
            return f"batch of disk {batch.disk!r}, which the hello did not name"
        tag = batch.tag
        if tag is not None and not (isinstance(tag, dict) and isinstance(tag.get("id"), str)):
            return "a batch's tag must be null or an object with a string id"
        return None

    def _on_resync(self, header: dict[str, Any], _payload: bytearray) -> None:
        disk, request_id = header.get("disk"), header.get("request_id")
        block_size = header.get("block_size")
        if not isinstance(disk, str) or disk not in self.disks:
            raise Rejected(f"resync of disk {disk!r}, which the hello did not name")
        if not isinstance(request_id, str) or not REQUEST_ID_RE.match(request_id):
            raise Rejected(f"resync request id {request_id!r} is not valid")
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise Rejected(f"resync block_size {block_size!r} is not a positive integer")
        self._relay_resync(disk, request_id, block_size)

    def _relay_resync(self, disk: str, request_id: str, block_size: int) -> None:
        """Start relaying a request; it supersedes the disk's previous one (as in the agent).

        So a connection has at most one relay thread per disk, however often it asks.
        """
        previous = self._relays.get(disk)
        if previous is not None and not previous.done.is_set():
            if previous.request_id == request_id:
                return  # asked again: the relay in flight will answer
            previous.cancel()
        relay = ResyncRelay(self.ctx, self, disk, request_id, block_size)
        self._relays[disk] = relay
        relay.start()


def _silent_probe(exc: ssl.SSLError) -> bool:
    """True when the peer closed without sending a byte of TLS."""
    return isinstance(exc, ssl.SSLEOFError) or exc.reason == "UNEXPECTED_EOF_WHILE_READING"
