"""Ferry's own records: the agent <-> process server stream after its TLS 1.3 handshake.

TLS authenticates both ends (mutual certificates) and agrees on secrets; its
records are then at most 16 KiB, and through Python's ``ssl`` each costs a copy
into OpenSSL's buffer, a trip through the interpreter and, gathered or not,
memory passes that a 16 MiB batch does not need (``docs/performance.md``,
round sixteen). QUIC (RFC 9001) does the same: TLS for the handshake, its own
packet protection after it. Here, once both ends said so in ``hello`` and
``welcome``:

* both export 64 bytes from the TLS session (RFC 8446 section 7.5, the
  protocol's own label): the first 32 the agent's sending secret, the last
  32 the process server's;
* both close TLS (``close_notify`` each way, ``SSLSocket.unwrap``) and go on
  over the same TCP connection with records of their own::

      length  u32 big-endian   n: ciphertext and tag, tag + 1 to RECORD + tag bytes
      sealed  n bytes          AEAD(key, nonce, plaintext, aad=length)

  where the AEAD is the protocol's: ``ferry-records-2`` AEGIS-256 (a 32-byte
  tag; :mod:`ferry.aegis`), ``ferry-records-1`` AES-256-GCM (16);
* a direction's key is HKDF-Expand(SHA-256) of its secret and the key's
  number; the nonce is the record's number under that key (big endian, the
  AEAD's nonce length), so no nonce repeats under a key; after
  :data:`KEY_RECORDS` records both ends take the next key, as TLS 1.3's key
  update does (at most 64 GiB under one key, 2^32 AES blocks: AES-GCM's
  margin stays near 2^-64; AEGIS-256 needs no such bound and follows the
  same schedule);
* the plaintext is the same byte stream of frames as before (``ferry.wire``).

A record that was changed, dropped, repeated or moved fails authentication
(``ProtocolError``) and the connection is closed; the agent sends again what
was not acknowledged, as after any broken connection. A stream that ends
between records is an end of stream; inside one it is an error. Nothing is
acknowledged on the strength of the channel alone: a batch is acked after it
is spooled, as before.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
import struct
from collections.abc import Callable, Iterable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from ferry import aegis, tlsbuffer
from ferry.errors import ProtocolError


@dataclasses.dataclass(frozen=True)
class Suite:
    """One protocol's exporter label and AEAD."""

    label: bytes
    """The exporter label (RFC 5705: private labels begin with EXPERIMENTAL)."""
    aead: Callable[[bytes], Any]
    """A 32-byte key -> an AEAD with cryptography's ``encrypt_into`` / ``decrypt_into``."""
    nonce: int
    tag: int


SUITES = {
    "ferry-records-2": Suite(
        b"EXPERIMENTAL-ferry-records-2", aegis.AEGIS256, aegis.NONCE, aegis.TAG
    ),
    "ferry-records-1": Suite(b"EXPERIMENTAL-ferry-records-1", AESGCM, 12, 16),
}
"""The protocols, most preferred first: ``hello`` offers them all (``records: [...]``),
``welcome`` names the first of them the process server runs (``records: ...``); agents
and process servers of earlier versions know ``ferry-records-1`` alone."""
PROTOCOL = next(iter(SUITES))
RECORD = 1 << 20
"""Largest plaintext of one record, in bytes."""
KEY_RECORDS = 1 << 16
"""Records sealed under one key (of at most RECORD bytes each: 64 GiB) before the next."""
SMALL = 64 << 10
"""Writes shorter than this are gathered into one record (a frame's header and the like)."""
_LENGTH = struct.Struct(">I")


def offer(sock: ssl.SSLSocket) -> list[str]:
    """The protocols this end can run over ``sock``, most preferred first; none where the
    secrets cannot be had (TLS older than 1.3, or OpenSSL out of reach: ``ferry.tlsbuffer``)."""
    return list(SUITES) if secrets(sock, PROTOCOL) is not None else []


def choose(offered: object, runs: Iterable[str] = SUITES) -> str | None:
    """The protocol a process server that ``runs`` those protocols (most preferred first)
    takes from an agent's offer (``hello``'s ``records``); None for no protocol."""
    if not isinstance(offered, list):
        return None
    return next((name for name in runs if name in offered), None)


def secrets(sock: ssl.SSLSocket, protocol: str) -> tuple[bytes, bytes] | None:
    """(agent's, process server's) sending secrets of ``sock``'s TLS session for
    ``protocol``; None where they cannot be had (see :func:`offer`)."""
    if sock.version() != "TLSv1.3":
        return None
    material = tlsbuffer.export_keying_material(sock, SUITES[protocol].label, 64)
    if material is None:
        return None
    return material[:32], material[32:]


def switch(sock: ssl.SSLSocket, protocol: str, server_side: bool) -> RecordSocket:
    """Close TLS on ``sock`` (both ends do, right after ``welcome``) and go on in
    ``protocol``'s records. ``ProtocolError`` if its secrets cannot be had.

    Nothing may be sent on ``sock`` between ``welcome`` and this call, at either end.
    """
    keys = secrets(sock, protocol)
    if keys is None:
        raise ProtocolError(peer="peer", problem=f"cannot export the secrets of {protocol}")
    timeout = sock.gettimeout()
    sock.unwrap()
    raw = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    raw.settimeout(timeout)
    agent, server = keys
    return RecordSocket(
        raw,
        send=server if server_side else agent,
        recv=agent if server_side else server,
        protocol=protocol,
    )


class _Direction:
    """One direction's keys and record numbers."""

    def __init__(self, secret: bytes, suite: Suite) -> None:
        self.secret = secret
        self.suite = suite
        self.key_number = 0
        self.record = 0
        self.aead = self._key()

    def _key(self) -> Any:
        info = b"ferry records key " + self.key_number.to_bytes(8, "big")
        return self.suite.aead(HKDFExpand(hashes.SHA256(), 32, info).derive(self.secret))

    def nonce(self) -> bytes:
        """This record's nonce (its number under the key); the next call gives the next's."""
        nonce = self.record.to_bytes(self.suite.nonce, "big")
        self.record += 1
        return nonce

    def advance(self) -> None:
        """After a record: take the next key once this one sealed KEY_RECORDS."""
        if self.record >= KEY_RECORDS:
            self.key_number += 1
            self.record = 0
            self.aead = self._key()


class RecordSocket:
    """A TCP socket carrying sealed records; the socket methods ``ferry.wire`` and the
    connections use. Writers are serialised by the caller (as on an ``SSLSocket``);
    one reader and one writer may work at once."""

    def __init__(
        self, sock: socket.socket, send: bytes, recv: bytes, protocol: str = PROTOCOL
    ) -> None:
        self.sock = sock
        self.protocol = protocol
        suite = SUITES[protocol]
        self._tag = suite.tag
        self._send = _Direction(send, suite)
        self._recv = _Direction(recv, suite)
        self._out = bytearray()
        self._sealed = bytearray(_LENGTH.size + RECORD + suite.tag)
        self._sealed_view = memoryview(self._sealed)
        self._in = bytearray(RECORD + suite.tag)
        self._in_view = memoryview(self._in)
        self._length = bytearray(_LENGTH.size)
        self._plain: memoryview | None = None  # a record opened here, read in parts
        self._left = memoryview(b"")
        self._broken: str | None = None

    # -- the socket's own ------------------------------------------------------------------

    def fileno(self) -> int:
        return self.sock.fileno()

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self.sock.gettimeout()

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def close(self) -> None:
        self.sock.close()

    def __repr__(self) -> str:
        return f"<RecordSocket {self.protocol} {self.sock!r}>"

    # -- writing ---------------------------------------------------------------------------

    def sendall(self, data: Any) -> None:
        """Send ``data``: short writes wait for :meth:`flush` (or a long write after them)."""
        view = memoryview(data).cast("B")
        if len(view) < SMALL:
            if len(self._out) + len(view) > RECORD:
                self.flush()
            self._out += view
            return
        self.flush()
        for at in range(0, len(view), RECORD):
            self._seal(view[at : at + RECORD])

    def flush(self) -> None:
        """Send what short writes left waiting."""
        if self._out:
            out, self._out = self._out, bytearray()
            self._seal(memoryview(out))

    def _seal(self, plain: memoryview) -> None:
        n = len(plain) + self._tag
        sealed = self._sealed_view
        _LENGTH.pack_into(sealed, 0, n)
        end = _LENGTH.size + n
        self._send.aead.encrypt_into(
            self._send.nonce(), plain, sealed[: _LENGTH.size], sealed[_LENGTH.size : end]
        )
        self._send.advance()
        self.sock.sendall(sealed[:end])

    # -- reading ---------------------------------------------------------------------------

    def pending(self) -> int:
        """Bytes of an opened record not yet taken (the socket may hold more)."""
        return len(self._left)

    def recv_into(self, buffer: Any, nbytes: int = 0) -> int:
        """Up to ``nbytes`` (default: all ``buffer`` holds) from the stream; 0 at its end."""
        view = memoryview(buffer).cast("B")
        want = min(nbytes or len(view), len(view))
        if self._left:
            k = min(want, len(self._left))
            view[:k] = self._left[:k]
            self._left = self._left[k:]
            return k
        if self._broken:
            raise ProtocolError(peer=self._peer(), problem=self._broken)
        try:
            return self._next_record(view, want)
        except BaseException as exc:  # the stream is out of step now: no read may follow
            self._broken = str(exc) or type(exc).__name__
            raise

    def _next_record(self, view: memoryview, want: int) -> int:
        if not self._fill(memoryview(self._length), at_start=True):
            return 0
        n = _LENGTH.unpack(self._length)[0]
        if not self._tag < n <= RECORD + self._tag:
            raise ProtocolError(peer=self._peer(), problem=f"sealed record of {n} bytes")
        sealed = self._in_view[:n]
        self._fill(sealed, at_start=False)
        size = n - self._tag
        if want >= size:  # straight into the caller's buffer: a payload is not copied again
            self._open(sealed, view[:size])
            return size
        if self._plain is None:
            self._plain = memoryview(bytearray(RECORD))
        self._open(sealed, self._plain[:size])
        view[:want] = self._plain[:want]
        self._left = self._plain[want:size]
        return want

    def _fill(self, view: memoryview, at_start: bool) -> bool:
        """Fill ``view`` from the socket; False if the stream ended before its first byte
        and ``at_start``."""
        got = 0
        while got < len(view):
            k = self.sock.recv_into(view[got:])
            if k == 0:
                if got == 0 and at_start:
                    return False
                raise ProtocolError(peer=self._peer(), problem="connection closed mid-record")
            got += k
        return True

    def _open(self, sealed: memoryview, into: memoryview) -> None:
        try:
            self._recv.aead.decrypt_into(self._recv.nonce(), sealed, self._length, into)
        except InvalidTag:
            raise ProtocolError(
                peer=self._peer(),
                problem="a sealed record failed authentication (changed, lost, repeated or out of order)",
            ) from None
        self._recv.advance()

    def _peer(self) -> str:
        try:
            name = self.sock.getpeername()
        except OSError:
            return "peer"
        return f"{name[0]}:{name[1]}" if isinstance(name, tuple) else "peer"
