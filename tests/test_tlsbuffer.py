"""OpenSSL's buffering BIO under real TLS sockets (ferry.tlsbuffer): frames arrive whole,
a frame leaves only when flushed, and a read buffer's bytes are seen as waiting."""

from __future__ import annotations

import os
import resource
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.tls import loopback_pair

from ferry import pki, tlsbuffer, wire


@pytest.fixture
def pair(certs: Path) -> Iterator[tuple[ssl.SSLSocket, ssl.SSLSocket]]:
    """A connected (client, server) pair over loopback TCP with the deployment's mTLS."""
    client, server = loopback_pair(certs)
    yield client, server
    client.close()
    server.close()


def _readable(sock: ssl.SSLSocket, timeout: float) -> bool:
    return wire.readable(sock, timeout)


def test_buffered_frames_arrive_whole_and_in_order(pair):
    client, server = pair
    assert tlsbuffer.buffer(client, write=1 << 20), (
        "this interpreter's ssl layout was not recognised"
    )
    assert tlsbuffer.buffer(server, read=256 << 10)
    frames = [
        (i, os.urandom(size)) for i, size in enumerate((0, 1, 5000, 16384, 300_000, 3 << 20, 17))
    ]
    received: list[tuple[dict, bytearray]] = []
    reader = threading.Thread(target=lambda: received.extend(wire.recv(server) for _ in frames))  # type: ignore[misc]
    reader.start()
    for i, data in frames:
        wire.send(client, {"type": "batch", "i": i}, data)
    reader.join(30)
    assert [(h["i"], bytes(p)) for h, p in received] == [(i, d) for i, d in frames]
    # The other way round (the server's writes are not buffered, the client's reads not).
    wire.send(server, {"type": "ack"})
    assert wire.recv(client) == ({"type": "ack"}, bytearray())


def test_a_frame_leaves_when_flushed(pair):
    """The write buffer holds records until the frame is whole: proof that it is in place."""
    client, server = pair
    assert tlsbuffer.buffer(client, write=1 << 20)
    client.sendall(b"x" * 1000)  # less than the buffer: held
    assert not _readable(server, 0.3)
    tlsbuffer.flush(client)
    assert _readable(server, 5)
    assert server.recv(2000) == b"x" * 1000


def test_bytes_held_by_the_read_buffer_count_as_waiting(pair):
    """Frames read from the socket into the buffer are not in the socket any more: a
    receiver that asks whether more is waiting (the process server's group commit) must
    hear it from tlsbuffer.pending."""
    client, server = pair
    assert tlsbuffer.buffer(server, read=256 << 10)
    for i in range(3):  # a record each, all in the server's socket before it reads
        client.sendall(b"".join(wire.encode({"type": "batch", "i": i}, b"y" * 100)))
    assert _readable(server, 5)
    assert wire.recv(server)[0] == {"type": "batch", "i": 0}
    assert not _readable(server, 0) and server.pending() == 0
    assert tlsbuffer.pending(server) > 0
    assert [wire.recv(server)[0]["i"] for _ in range(2)] == [1, 2]
    assert tlsbuffer.pending(server) == 0


def test_unknown_sockets_are_left_as_they_were(certs):
    """A socket without a connection (no SSL yet) is refused, and flush and pending do nothing."""
    ctx = pki.client_context(
        str(certs / "ca" / "ca.pem"), str(certs / "agent.pem"), str(certs / "agent.key")
    )
    raw = socket.socket()
    sock = ctx.wrap_socket(raw, server_hostname="localhost", do_handshake_on_connect=False)
    try:
        assert not tlsbuffer.buffer(sock, write=1 << 20)
        tlsbuffer.flush(sock)
        assert tlsbuffer.pending(sock) == 0
    finally:
        sock.close()


def test_a_closed_socket_is_not_flushed_into_another(pair):
    """After close the descriptor's number may belong to a new socket: flush refuses."""
    client, server = pair
    assert tlsbuffer.buffer(client, write=1 << 20)
    client.sendall(b"held")
    client.close()
    other_a, other_b = socket.socketpair()
    try:
        with pytest.raises(OSError):
            tlsbuffer.flush(client)
        other_a.setblocking(False)
        with pytest.raises(BlockingIOError):
            other_a.recv(10)
    finally:
        other_a.close()
        other_b.close()


def test_readiness_is_seen_on_a_descriptor_above_1024(pair):
    # A process server serving many agents holds more than 1024 descriptors; select()
    # refuses those (its group commit asked it whether the next frame had begun).
    client, server = pair

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(2048, hard), hard))
    high = socket.socket(fileno=os.dup2(server.fileno(), 1500))
    try:
        assert not wire.readable(high)
        client.sendall(b"x")
        assert wire.readable(high, 5.0)
    finally:
        high.detach()
        os.close(1500)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
