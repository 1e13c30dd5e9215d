"""Framing on the agent <-> process server connection (inside mutual TLS, or Ferry's own
records that follow its handshake: ``ferry.records``).

Each frame is::

    magic  4 bytes  b"FRY1"
    hlen   u32      length of the JSON header
    plen   u32      length of the binary payload
    header hlen     JSON object with at least "type"
    payload plen    raw bytes (a batch's data extents)

Frame types (``header["type"]``):

* agent -> server ``hello``: ``{tenant, machine, disks: [disk ids], records?}``;
  the server answers ``welcome {server, records?}`` or ``error``. ``records``:
  the agent offers ``["ferry-records-1"]`` and the server takes it, and both then
  go on in Ferry's own records (``ferry.records``); without it, in TLS records.
* agent -> server ``batch``: ``{batch: Batch.header()}`` + payload; the server
  answers ``ack {disk, gen, seq}`` only after the batch is durable in its
  spool.  Acks may come in any order.
* agent -> server ``resync``: ``{disk, request_id, block_size}``; the server
  relays it to the master target and answers ``resync-answer {disk,
  request_id, gen, block_size, target_size, digest_blob, empty}`` + payload
  (the digest map: docs/design.md, "Storage layout"; made by
  :func:`ferry.blockio.digest_map`).
* server -> agent ``resync-required {disk, gen, reason}``: the master target
  cannot go on with generation ``gen`` (poisoned segment); the agent MUST
  start a new generation.
* either way ``error {message}``: the peer is about to close.
"""

from __future__ import annotations

import ctypes
import json
import select
import socket
import struct
from typing import Any, Literal, overload

from ferry import tlsbuffer
from ferry.batch import Gathered
from ferry.errors import ProtocolError
from ferry.records import RecordSocket


def _unzeroed_bytearray() -> Any:
    # CPython's C API makes a bytearray without zeroing it when given no source bytes:
    # bytearray(n) zeroes each payload before it is received into, a pass over memory the
    # process server paid for every byte it receives (0.07 CPU s per GiB here).  No library
    # offers this; elsewhere, bytearray(n).
    try:
        make = ctypes.pythonapi.PyByteArray_FromStringAndSize
    except AttributeError:
        return bytearray
    make.restype, make.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_ssize_t]
    return lambda n: make(None, n)


_receive_buffer = _unzeroed_bytearray()
"""``n`` bytes to receive into: every one of them is written before any is read."""

Conn = socket.socket | RecordSocket
"""What frames travel on: a TLS socket, or Ferry's own records after its handshake."""

MAGIC = b"FRY1"
_FRAME = struct.Struct(">4sII")
MAX_HEADER = 1 << 20
"""Largest header accepted, in bytes."""
MAX_PAYLOAD = 256 << 20
"""Largest payload accepted, in bytes."""


def encode(
    header: dict[str, Any], payload: bytes | bytearray | memoryview | Gathered = b""
) -> list[bytes | bytearray | memoryview]:
    """The byte strings of one frame (send them in order)."""
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    parts = payload.parts if isinstance(payload, Gathered) else [payload]
    return [_FRAME.pack(MAGIC, len(hbytes), len(payload)), hbytes, *parts]


def send(
    sock: Conn,
    header: dict[str, Any],
    payload: bytes | bytearray | memoryview | Gathered = b"",
) -> None:
    """Send one frame; the caller serialises writers."""
    for part in encode(header, payload):
        if part:
            sock.sendall(part)
    if isinstance(sock, RecordSocket):
        sock.flush()
    else:
        tlsbuffer.flush(sock)


def readable(sock: Conn, timeout: float = 0.0) -> bool:
    """Whether ``sock`` has bytes to read within ``timeout`` seconds (0: now).

    poll, not select: select refuses a descriptor numbered 1024 or more, and a
    process server serving many agents holds more descriptors than that.
    """
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(int(timeout * 1000)))


def recv(sock: Conn, peer: str = "peer") -> tuple[dict[str, Any], bytearray] | None:
    """Receive one frame; None on a clean end of stream before a frame starts."""
    head = _recv_exact(sock, _FRAME.size, peer, allow_eof=True)
    if head is None:
        return None
    magic, hlen, plen = _FRAME.unpack(head)
    if magic != MAGIC:
        raise ProtocolError(peer=peer, problem="bad frame magic")
    if hlen > MAX_HEADER or plen > MAX_PAYLOAD:
        raise ProtocolError(peer=peer, problem=f"frame too large ({hlen}+{plen} bytes)")
    hbytes = _recv_exact(sock, hlen, peer)
    payload = _recv_exact(sock, plen, peer) if plen else bytearray()
    try:
        header = json.loads(hbytes)
    except ValueError:
        raise ProtocolError(peer=peer, problem="frame header is not JSON")
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError(peer=peer, problem="frame header lacks a type")
    return header, payload


@overload
def _recv_exact(sock: Conn, n: int, peer: str, allow_eof: Literal[False] = False) -> bytearray: ...
@overload
def _recv_exact(sock: Conn, n: int, peer: str, allow_eof: bool) -> bytearray | None: ...
def _recv_exact(sock: Conn, n: int, peer: str, allow_eof: bool = False) -> bytearray | None:
    """``n`` bytes, received in place (a payload is not copied again); None only if
    ``allow_eof`` and the stream ends before the first."""
    buf: bytearray = _receive_buffer(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            if got == 0 and allow_eof:
                return None
            raise ProtocolError(peer=peer, problem="connection closed mid-frame")
        got += k
    return buf
