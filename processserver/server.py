"""The process server: listener, connection threads, uploaders, relays, status.

Start-up order matters: bind first (a port in use is an operator error, found
before anything else happens), then index the spool a previous run left
(before any agent can add to it), then accept.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from pathlib import Path

from ferry import pki
from ferry.errors import ConfigError, Exit, FerryError
from ferry.storage import Storage
from processserver import defaults
from processserver.connection import Connection
from processserver.context import Context
from processserver.relay import StateRelay
from processserver.settings import Settings
from processserver.spool import Spool
from processserver.status import StatusWriter
from processserver.uploader import Uploader

log = logging.getLogger("ferry.processserver")


class ListenError(FerryError):
    """cannot listen on {address}: {problem}"""

    exit_code = Exit.CANNOT_LISTEN


def tls_context(settings: Settings, source: str) -> ssl.SSLContext:
    """The mutual-TLS server context; ConfigError if the CA, certificate or key cannot be used."""
    try:
        context = pki.server_context(settings.ca, settings.cert, settings.key)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(
            path=source,
            problem=f"cannot use ca {settings.ca}, cert {settings.cert} and key {settings.key} "
            f"({getattr(exc, 'reason', None) or exc})",
        )
    # No TLS 1.3 session tickets.  They arrive after the handshake, and a client
    # that reads them in one thread while it writes in another (as agents do)
    # can corrupt its OpenSSL state (seen here as bad record MACs).  Agents
    # reconnect rarely, so resumption is worth nothing to give up.
    context.num_tickets = 0
    return context


class Server:
    """One process server; ``start`` it, then ``stop`` it."""

    def __init__(
        self, settings: Settings, storage: Storage, tls: ssl.SSLContext, key: bytes | None
    ) -> None:
        self.settings = settings
        self.tls = tls
        spool = Spool(
            settings.spool_dir,
            settings.spool_limit_bytes,
            Path(settings.state_dir) / "quarantine",
        )
        self.ctx = Context(settings=settings, spool=spool, storage=storage, segment_key=key)
        self.uploader = Uploader(self.ctx)
        self.status = StatusWriter(self.ctx, settings.status_path)
        self._listener: socket.socket | None = None
        self._accepting: threading.Thread | None = None

    def start(self) -> None:
        """Bind, recover the spool, start every thread; ListenError if the address is taken."""
        self._listener = self._bind()
        found = self.ctx.spool.recover()
        if found:
            log.info("found %d spooled batches from a previous run; uploading them", found)
        self.uploader.start()
        self._spawn("state-relay", StateRelay(self.ctx).run)
        self._spawn("status", self.status.run)
        self._accepting = self._spawn("accept", self._accept_loop)
        host, port = self._listener.getsockname()[:2]
        log.info("listening on %s:%d", host, port)

    def _bind(self) -> socket.socket:
        host, port = self.settings.address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            listener = socket.create_server((host, port), family=family, backlog=128)
        except OSError as exc:
            raise ListenError(address=self.settings.listen, problem=exc.strerror or str(exc))
        listener.settimeout(defaults.ACCEPT_POLL)  # so the loop notices a stop
        return listener

    def _spawn(self, name: str, target) -> threading.Thread:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        return thread

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self.ctx.stopping.is_set():
            try:
                raw, address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self.ctx.stopping.is_set():
                    return
                log.error("accept failed: %s", exc)  # e.g. out of file descriptors
                time.sleep(defaults.ACCEPT_POLL)
                continue
            self._admit(raw, address)

    def _admit(self, raw: socket.socket, address: tuple) -> None:
        """Hand a new TCP connection to a thread of its own (TLS happens there, not here)."""
        if len(self.ctx.peers) >= defaults.MAX_CONNECTIONS:
            log.warning("refused %s: already serving %d agents", address, defaults.MAX_CONNECTIONS)
            raw.close()
            return
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = self.tls.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        conn = Connection(self.ctx, sock, address)
        self.ctx.peers.add(conn)
        threading.Thread(target=conn.run, name=f"conn-{conn.address}", daemon=True).start()

    def stop(self, grace: float = defaults.STOP_GRACE) -> None:
        """Stop accepting, let batches and uploads in hand finish for up to ``grace`` seconds."""
        deadline = time.monotonic() + grace
        self.ctx.stopping.set()
        if self._accepting is not None:
            # Closed only once the accept loop has left it: no connection is
            # admitted behind our back, and no thread polls a reused descriptor.
            self._accepting.join(2 * defaults.ACCEPT_POLL)
        if self._listener is not None:
            self._listener.close()
        for conn in self.ctx.peers.live():
            conn.stop_reading()
        if not self.ctx.peers.wait_empty(max(0.0, deadline - time.monotonic())):
            log.warning("stopping with %d connections still busy", len(self.ctx.peers))
        if not self.uploader.join(max(0.0, deadline - time.monotonic())):
            log.warning("stopping with uploads in progress; they resume at the next start")
        self.status.write()
        spooled, _ = self.ctx.spool.usage()
        log.info("stopped; %d bytes remain spooled", spooled)
