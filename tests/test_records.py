"""Ferry's own records after the TLS 1.3 handshake (ferry.records), over real sockets, in both
protocols (AEGIS-256 and AES-256-GCM): frames arrive whole and in order both ways, the keys
are the session's own and change in time, and a record changed, lost, repeated or moved on
the way is refused."""

from __future__ import annotations

import os
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.tls import loopback_pair

from ferry import records, wire
from ferry.errors import ProtocolError

MiB = 1 << 20
PROTOCOLS = list(records.SUITES)


def _switch_both(
    client: ssl.SSLSocket, server: ssl.SSLSocket, protocol: str
) -> tuple[records.RecordSocket, records.RecordSocket]:
    """Both ends export their keys and leave TLS at once (each waits for the other's
    close_notify), as the agent and the process server do after welcome."""
    assert records.offer(client) == records.offer(server) == PROTOCOLS, (
        "this interpreter's ssl layout was not recognised"
    )
    switched: list[records.RecordSocket] = []
    thread = threading.Thread(
        target=lambda: switched.append(records.switch(server, protocol, server_side=True))
    )
    thread.start()
    agent = records.switch(client, protocol, server_side=False)
    thread.join(10)
    return agent, switched[0]


@pytest.fixture(params=PROTOCOLS)
def pair(certs: Path, request) -> Iterator[tuple[records.RecordSocket, records.RecordSocket]]:
    """(agent's end, process server's end) of a loopback connection switched to records."""
    agent, server = _switch_both(*loopback_pair(certs), request.param)
    assert agent.protocol == server.protocol == request.param
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


def test_keys_are_the_sessions_and_the_protocols_own(certs):
    client, server = loopback_pair(certs)
    other_client, other_server = loopback_pair(certs)
    try:
        keys = {p: records.secrets(client, p) for p in PROTOCOLS}
        assert None not in keys.values()
        for protocol, pair in keys.items():
            assert pair == records.secrets(server, protocol)  # both ends export the same
            assert pair[0] != pair[1]  # a key for each direction
            assert pair != records.secrets(other_client, protocol)  # another session, others
        assert len(set(keys.values())) == len(PROTOCOLS)  # each protocol its own label
    finally:
        for sock in (client, server, other_client, other_server):
            sock.close()


def test_the_process_server_takes_the_first_it_runs_of_what_was_offered():
    assert records.choose(["ferry-records-1", "ferry-records-2"]) == "ferry-records-2"
    assert records.choose(["ferry-records-1"]) == "ferry-records-1"  # an earlier agent
    assert records.choose(["ferry-records-9", 3]) is None
    assert records.choose("ferry-records-2") is None  # not a list: not an offer
    assert records.choose(None) is None


def test_tls_older_than_1_3_exports_nothing(certs):
    client, server = loopback_pair(certs, server_max=ssl.TLSVersion.TLSv1_2)
    try:
        assert client.version() == "TLSv1.2"
        assert records.offer(client) == []  # the agent then offers nothing: TLS records
        assert records.secrets(client, records.PROTOCOL) is None
        with pytest.raises(ProtocolError, match="cannot export"):
            records.switch(client, records.PROTOCOL, server_side=False)
    finally:
        client.close()
        server.close()


class _Relay:
    """Two ends with keys of their own, and the records from one to the other through this
    relay (``record`` takes the next one, ``forward`` passes bytes on, mangled or not)."""

    def __init__(self, protocol: str, recv_secret: bytes | None = None) -> None:
        self.left, self._src = socket.socketpair()
        self._dst, self.right = socket.socketpair()
        a, b = os.urandom(32), recv_secret or os.urandom(32)
        self.sender = records.RecordSocket(self.left, send=b, recv=a, protocol=protocol)
        self.receiver = records.RecordSocket(self.right, send=a, recv=b, protocol=protocol)

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

    def end(self) -> None:
        """The receiver's stream ends after what was forwarded."""
        self._dst.shutdown(socket.SHUT_WR)

    def __enter__(self) -> _Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        for sock in (self.left, self.right, self._src, self._dst):
            sock.close()


@pytest.fixture(params=PROTOCOLS)
def relay(request) -> Iterator[_Relay]:
    with _Relay(request.param) as made:
        yield made


@pytest.mark.parametrize("mangle", ["flip", "length", "drop", "duplicate", "swap", "truncate"])
def test_a_record_mangled_on_the_way_is_refused(relay, mangle):
    for i in range(3):  # a frame this short is one record
        wire.send(relay.sender, {"type": "batch", "i": i}, os.urandom(1000))
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
        relay.end()
    assert wire.recv(relay.receiver)[0]["i"] == 0  # the first was untouched
    with pytest.raises(ProtocolError, match="failed authentication|closed mid-record"):
        wire.recv(relay.receiver)
    with pytest.raises(ProtocolError):  # and nothing more is read from a broken stream
        wire.recv(relay.receiver)


def test_a_record_longer_than_allowed_is_refused_before_it_is_read(relay):
    tag = records.SUITES[relay.sender.protocol].tag
    relay.forward((records.RECORD + tag + 1).to_bytes(4, "big"))
    with pytest.raises(ProtocolError, match="sealed record of"):
        wire.recv(relay.receiver)


def test_the_stream_ends_between_records_not_inside_one(relay):
    wire.send(relay.sender, {"type": "ack"})
    relay.forward(relay.record())
    relay.end()
    assert wire.recv(relay.receiver) == ({"type": "ack"}, bytearray())
    assert wire.recv(relay.receiver) is None  # a clean end of stream


def test_keys_change_after_key_records(relay, monkeypatch):
    monkeypatch.setattr(records, "KEY_RECORDS", 3)
    seen = []
    for i in range(10):
        wire.send(relay.sender, {"type": "ack", "i": i})
        seen.append(relay.record())
        relay.forward(seen[-1])
        assert wire.recv(relay.receiver)[0] == {"type": "ack", "i": i}
    assert relay.receiver._recv.key_number == 3 and relay.receiver._recv.record == 1
    # Record 3 is the first under the second key, with the first record's nonce: a
    # receiver on the second key takes it, one still on the first refuses it.
    for key_number, taken in ((1, True), (0, False)):
        with _Relay(relay.sender.protocol, recv_secret=relay.sender._send.secret) as other:
            other.receiver._recv.key_number = key_number
            other.receiver._recv.aead = other.receiver._recv._key()
            other.forward(seen[3])
            if taken:
                assert wire.recv(other.receiver)[0] == {"type": "ack", "i": 3}
            else:
                with pytest.raises(ProtocolError, match="failed authentication"):
                    wire.recv(other.receiver)
