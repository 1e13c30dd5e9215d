"""Ferry's own records after the TLS 1.3 handshake (ferry.records), over real sockets: frames
arrive whole and in order both ways, the keys are the session's own and change in time, and a
record changed, lost, repeated or moved on the way is refused."""

from __future__ import annotations

import os
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry import pki, records, wire
from ferry.errors import ProtocolError

MiB = 1 << 20


def _tls_pair(certs: Path) -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    ca = str(certs / "ca" / "ca.pem")
    server_ctx = pki.server_context(
        ca, str(certs / "process-server.pem"), str(certs / "process-server.key")
    )
    client_ctx = pki.client_context(ca, str(certs / "agent.pem"), str(certs / "agent.key"))
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[ssl.SSLSocket] = []

    def accept() -> None:
        raw, _ = listener.accept()
        accepted.append(server_ctx.wrap_socket(raw, server_side=True))

    thread = threading.Thread(target=accept)
    thread.start()
    client = client_ctx.wrap_socket(
        socket.create_connection(listener.getsockname()), server_hostname="localhost"
    )
    thread.join(10)
    listener.close()
    return client, accepted[0]


def _switch_both(
    client: ssl.SSLSocket, server: ssl.SSLSocket
) -> tuple[records.RecordSocket, records.RecordSocket]:
    """Both ends export their keys and leave TLS at once (each waits for the other's
    close_notify), as the agent and the process server do after welcome."""
    ckeys, skeys = records.secrets(client), records.secrets(server)
    assert ckeys is not None and skeys is not None, (
        "this interpreter's ssl layout was not recognised"
    )
    switched: list[records.RecordSocket] = []
    thread = threading.Thread(target=lambda: switched.append(records.switch(server, skeys, True)))
    thread.start()
    agent = records.switch(client, ckeys, server_side=False)
    thread.join(10)
    return agent, switched[0]


@pytest.fixture
def pair(certs: Path) -> Iterator[tuple[records.RecordSocket, records.RecordSocket]]:
    """(agent's end, process server's end) of a loopback connection switched to records."""
    agent, server = _switch_both(*_tls_pair(certs))
    yield agent, server
    agent.close()
    server.close()


def test_frames_arrive_whole_and_in_order_both_ways(pair):
    agent, server = pair
    sizes = (0, 1, 5000, 65535, 65536, MiB - 1, MiB, MiB + 1, 3 * MiB + 17, 16 * MiB, 17)
    frames = [(i, os.urandom(size)) for i, size in enumerate(sizes)]
    received: list = []
    answers: list = []

    def serve() -> None:  # reads every frame and answers each while the agent still sends
        for _ in frames:
            header, payload = wire.recv(server)
            received.append((header["i"], bytes(payload)))
            wire.send(server, {"type": "ack", "i": header["i"]}, payload[:3])

    def read_answers() -> None:
        answers.extend(wire.recv(agent) for _ in frames)

    threads = [threading.Thread(target=serve), threading.Thread(target=read_answers)]
    for thread in threads:
        thread.start()
    for i, data in frames:
        wire.send(agent, {"type": "batch", "i": i}, data)
    for thread in threads:
        thread.join(60)
    assert received == frames
    assert [(h["i"], bytes(p)) for h, p in answers] == [(i, d[:3]) for i, d in frames]


def test_keys_are_the_sessions_own(certs):
    client, server = _tls_pair(certs)
    other_client, other_server = _tls_pair(certs)
    try:
        keys = records.secrets(client)
        assert keys is not None
        assert keys == records.secrets(server)  # both ends export the same
        assert keys[0] != keys[1]  # a key for each direction
        assert keys != records.secrets(other_client)  # another session, other keys
    finally:
        for sock in (client, server, other_client, other_server):
            sock.close()


def test_tls_older_than_1_3_exports_nothing(certs):
    ca = str(certs / "ca" / "ca.pem")
    server_ctx = pki.server_context(
        ca, str(certs / "process-server.pem"), str(certs / "process-server.key")
    )
    server_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    client_ctx = pki.client_context(ca, str(certs / "agent.pem"), str(certs / "agent.key"))
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[ssl.SSLSocket] = []
    thread = threading.Thread(
        target=lambda: accepted.append(
            server_ctx.wrap_socket(listener.accept()[0], server_side=True)
        )
    )
    thread.start()
    client = client_ctx.wrap_socket(
        socket.create_connection(listener.getsockname()), server_hostname="localhost"
    )
    thread.join(10)
    listener.close()
    try:
        assert client.version() == "TLSv1.2"
        assert records.secrets(client) is None  # the agent then offers nothing: TLS records
    finally:
        client.close()
        accepted[0].close()


class _Relay:
    """Sealed records from one socket to another, one of them mangled on the way."""

    def __init__(self) -> None:
        self.left, inner_left = socket.socketpair()
        inner_right, self.right = socket.socketpair()
        self.seen: list[bytes] = []
        self._src, self._dst = inner_left, inner_right

    def record(self) -> bytes:
        """The next whole record from the sender (length prefix included)."""
        head = self._read(4)
        return head + self._read(int.from_bytes(head, "big"))

    def _read(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self._src.recv(n - len(out))
            assert chunk, "the sender closed"
            out += chunk
        return out

    def forward(self, data: bytes) -> None:
        self._dst.sendall(data)

    def close(self) -> None:
        for sock in (self.left, self.right, self._src, self._dst):
            sock.close()


def _ends(relay: _Relay) -> tuple[records.RecordSocket, records.RecordSocket]:
    a, b = os.urandom(32), os.urandom(32)
    return records.RecordSocket(relay.left, send=a, recv=b), records.RecordSocket(
        relay.right, send=b, recv=a
    )


@pytest.mark.parametrize("mangle", ["flip", "length", "drop", "duplicate", "swap", "truncate"])
def test_a_record_mangled_on_the_way_is_refused(mangle):
    relay = _Relay()
    sender, receiver = _ends(relay)
    try:
        for i in range(3):  # a frame this short is one record
            wire.send(sender, {"type": "batch", "i": i}, os.urandom(1000))
        first, second, third = relay.record(), relay.record(), relay.record()
        if mangle == "flip":
            second = second[:50] + bytes([second[50] ^ 1]) + second[51:]
        elif mangle == "length":  # a shorter record claimed: its tag is not where it was put
            second = (int.from_bytes(second[:4], "big") - 1).to_bytes(4, "big") + second[4:]
        sent = {
            "flip": [first, second, third],
            "length": [first, second, third],
            "drop": [first, third],
            "duplicate": [first, first, second],
            "swap": [first, third, second],
            "truncate": [first, second[:1000]],
        }[mangle]
        for record in sent:
            relay.forward(record)
        if mangle == "truncate":
            relay._dst.shutdown(socket.SHUT_WR)
        assert wire.recv(receiver)[0]["i"] == 0  # the first was untouched
        with pytest.raises(ProtocolError, match="failed authentication|closed mid-record"):
            wire.recv(receiver)
        with pytest.raises(ProtocolError):  # and nothing more is read from a broken stream
            wire.recv(receiver)
    finally:
        relay.close()


def test_a_record_longer_than_allowed_is_refused_before_it_is_read():
    relay = _Relay()
    _, receiver = _ends(relay)
    try:
        relay.forward((records.RECORD + records.TAG + 1).to_bytes(4, "big"))
        with pytest.raises(ProtocolError, match="sealed record of"):
            wire.recv(receiver)
    finally:
        relay.close()


def test_the_stream_ends_between_records_not_inside_one():
    relay = _Relay()
    sender, receiver = _ends(relay)
    try:
        wire.send(sender, {"type": "ack"})
        relay.forward(relay.record())
        relay._dst.shutdown(socket.SHUT_WR)
        assert wire.recv(receiver) == ({"type": "ack"}, bytearray())
        assert wire.recv(receiver) is None  # a clean end of stream
    finally:
        relay.close()


def test_keys_change_after_key_records(monkeypatch):
    monkeypatch.setattr(records, "KEY_RECORDS", 3)
    relay = _Relay()
    sender, receiver = _ends(relay)
    try:
        seen = []
        for i in range(10):
            wire.send(sender, {"type": "ack", "i": i})
            record = relay.record()
            seen.append(record)
            relay.forward(record)
            assert wire.recv(receiver)[0] == {"type": "ack", "i": i}
        assert receiver._recv.key_number == 3 and receiver._recv.record == 1
        # Record 3 is the first under the second key, with the first record's nonce: a
        # receiver on the second key takes it, one still on the first refuses it.
        for key_number, taken in ((1, True), (0, False)):
            other = _Relay()
            reader = records.RecordSocket(other.right, send=b"x" * 32, recv=sender._send.secret)
            reader._recv.key_number = key_number
            reader._recv.aead = reader._recv._key()
            try:
                other.forward(seen[3])
                if taken:
                    assert wire.recv(reader)[0] == {"type": "ack", "i": 3}
                else:
                    with pytest.raises(ProtocolError, match="failed authentication"):
                        wire.recv(reader)
            finally:
                other.close()
    finally:
        relay.close()
