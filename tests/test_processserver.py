"""The process server as agents and master targets see it.

Real parts only: the server runs as a process (``python -m processserver``),
agents are a tiny mutual-TLS client speaking ``ferry.wire``, storage is the
session's Azurite.  "Storage down" is a connection string naming closed ports.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support import ROOT, wait_for
from support.process_server import (
    DISK,
    Agent,
    ProcessServer,
    agent_context,
    dead_storage,
    legacy_spool_file,
)

from ferry import naming, pki
from ferry.batch import DATA, ZERO, Batch
from ferry.errors import SegmentCorrupt
from ferry.segment import FLAG_AEGIS, FLAG_AES, unpack

DISK_SIZE = 1 << 30


# -- a process server under test (support.process_server) ---------------------------------


@pytest.fixture
def servers(tmp_path, certs, azurite):
    """Factory: ``servers(storage=None, **settings)``; every server is killed at teardown."""
    made: list[ProcessServer] = []

    def make(storage: str | None = None, start: bool = True, **settings) -> ProcessServer:
        base = tmp_path / f"ps{len(made)}"
        base.mkdir()
        server = ProcessServer(base, certs, storage or azurite.connection_string, **settings)
        made.append(server)
        return server.start() if start else server

    yield make
    for server in made:
        server.stop()


@pytest.fixture
def connect(certs):
    """Factory: ``connect(server, tenant, offer_records=False)`` -> an Agent that has said hello
    (its answer in ``welcome``); closed at teardown."""
    agents: list[Agent] = []

    def make(server: ProcessServer, tenant: str, offer_records: bool | list[str] = False) -> Agent:
        agent = Agent(server.port, agent_context(certs))
        agents.append(agent)
        agent.welcome = agent.hello(tenant, offer_records=offer_records)
        assert agent.welcome["type"] == "welcome"
        return agent

    yield make
    for agent in agents:
        agent.close()


def make_batch(tenant: str, seq: int, size: int = 8192, gen: int = 1, tag: bool = False) -> Batch:
    payload = os.urandom(size)
    return Batch(
        tenant=tenant,
        disk=DISK,
        gen=gen,
        seq=seq,
        disk_size=DISK_SIZE,
        extents=[(seq * 1 << 20, size, DATA), (seq * 1 << 20 | 1 << 19, 65536, ZERO)],
        payload=payload,
        tag={"id": f"{gen}-{seq}", "kind": "crash", "t0_mono_ns": seq, "frozen": False}
        if tag
        else None,
    )


def collect_acks(agent: Agent, count: int, timeout: float = 20) -> set[tuple[int, int]]:
    acks = set()
    deadline = time.monotonic() + timeout
    while len(acks) < count:
        frame = agent.recv(max(0.1, deadline - time.monotonic()))
        assert frame is not None, f"connection closed after {len(acks)} acks"
        header = frame[0]
        assert header["type"] == "ack", header
        assert header["disk"] == DISK
        acks.add((header["gen"], header["seq"]))
    return acks


def collect_notices(storage, tenant: str, count: int, timeout: float = 30) -> list[dict]:
    """Read ``count`` notices off the disk's queue (in arrival order)."""
    queue = naming.disk_queue(tenant, DISK)
    notices: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(notices) < count and time.monotonic() < deadline:
        got = storage.receive(queue, 32, visibility=300)
        notices.extend(m.body for m in got)
        if not got:
            time.sleep(0.1)
    assert len(notices) == count, f"{len(notices)} notices of {count}"
    return notices


def verify_uploaded(storage, notices: list[dict], batches: dict, key: bytes | None) -> list[int]:
    """Every notice names a verified segment holding exactly the batch that was sent; the
    segments' flags (ferry.segment: how each was compressed and sealed)."""
    flags = []
    for n in notices:
        batch = batches[(n["gen"], n["seq"])]
        blob = naming.segment_blob(batch.tenant, DISK, batch.gen, batch.seq)
        assert n["type"] == "segment"
        assert (n["tenant"], n["disk"], n["blob"]) == (batch.tenant, DISK, blob)
        assert n["tag"] == (batch.tag["id"] if batch.tag else None)
        data = storage.get(naming.segments_container(batch.tenant, batch.disk), blob)
        assert n["bytes"] == len(data)
        expect = {"tenant": batch.tenant, "disk": DISK, "gen": batch.gen, "seq": batch.seq}
        back = unpack(data, blob, expect, key=key, checksum=n["checksum"])
        assert back.payload == batch.payload
        assert back.extents == batch.extents
        assert back.tag == batch.tag
        flags.append(data[12 + int.from_bytes(data[8:12], "big")])
    return flags


# -- the data path --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sealed", "cipher", "offer", "records"),
    [
        (False, None, False, "tls"),
        (True, None, True, "ferry-records-2"),
        (True, None, ["ferry-records-1"], "ferry-records-1"),
        (True, "aes-256-gcm", True, "ferry-records-1"),
    ],
    ids=["plain-tls", "sealed-records", "sealed-records-of-round-16", "aes-256-gcm"],
)
def test_batches_are_acked_uploaded_and_announced(
    servers, connect, storage, tenant, tmp_path, sealed, cipher, offer, records
):
    """Segments sealed or not; the connection in TLS records (an agent that offers nothing,
    as before 2026-12-05) or in Ferry's own (offered, taken): the first the process server
    runs of those offered, AES-256-GCM's for an agent that knows no other (round sixteen)
    and for every agent of a process server set to ``cipher = "aes-256-gcm"``, which seals
    its segments with AES-256-GCM too (AEGIS-256 otherwise)."""
    key = os.urandom(32) if sealed else None
    settings: dict = {"allow_unsealed": True, **({"cipher": cipher} if cipher else {})}
    if key:
        (tmp_path / "segment.key").write_text(key.hex() + "\n")
        settings["segment_key_file"] = str(tmp_path / "segment.key")
    server = servers(**settings)
    agent = connect(server, tenant, offer_records=offer)
    assert agent.welcome.get("records") == (None if records == "tls" else records)
    said = "in TLS records" if records == "tls" else f"in Ferry's records ({records})"
    wait_for(lambda: said in server.log.read_text(), 10, f"the log saying {said!r}")
    batches = {(1, s): make_batch(tenant, s, tag=s % 3 == 0) for s in range(1, 7)}
    for batch in batches.values():
        agent.send_batch(batch)
    assert collect_acks(agent, len(batches)) == set(batches)

    notices = collect_notices(storage, tenant, len(batches))
    assert sorted((n["gen"], n["seq"]) for n in notices) == sorted(batches)
    flags = verify_uploaded(storage, notices, batches, key)
    sealed_with = {FLAG_AEGIS: "aegis-256", FLAG_AES: "aes-256-gcm", 0: None}
    assert {sealed_with[f & (FLAG_AEGIS | FLAG_AES)] for f in flags} == {
        (cipher or "aegis-256") if key else None
    }
    if key:  # sealed: useless without the key
        blob = notices[0]["blob"]
        with pytest.raises(SegmentCorrupt, match="encrypted"):
            unpack(storage.get(naming.segments_container(tenant, DISK), blob), blob)

    # Uploaded and announced, so nothing is left to spool; the status says what happened.
    wait_for(lambda: not server.spooled(tenant), 10, "an empty spool")
    wait_for(lambda: server.status()["segments_uploaded"] == len(batches), 5, "every upload")
    status = server.status()
    assert status["batches_received"] == len(batches)
    assert status["spool"]["files"] == 0
    assert [(a["cn"], a["tenant"], a["machine"], a["records"]) for a in status["agents"]] == [
        ("agent", tenant, "web01", records)
    ]
    assert server.signal(signal.SIGTERM) == 0


def test_only_clients_with_a_certificate_from_the_ca_get_in(servers, connect, certs, tenant):
    server = servers()
    for who in ("stranger", None):  # another CA's certificate; no certificate at all
        with pytest.raises((ssl.SSLError, OSError, AssertionError)):
            agent = Agent(server.port, agent_context(certs, who))
            try:
                # TLS 1.3 reports the refusal on the first read, not in the handshake.
                agent.hello(tenant)
            finally:
                agent.close()
    agent = connect(server, tenant)
    agent.send_batch(make_batch(tenant, 1))
    assert collect_acks(agent, 1) == {(1, 1)}
    wait_for(lambda: server.status()["connections_refused"] == 2, 5, "two refusals")


def test_an_agent_certificate_speaks_only_for_its_own_tenant_and_machine(
    servers, certs, tenant, tmp_path
):
    """A certificate issued for web01 once claimed machine db02 and got its batches acked."""
    server = servers()
    pki.issue(certs / "ca", tmp_path, "agent-web01", tenants=[tenant], machine="web01")
    pki.issue(certs / "ca", tmp_path, "server-cert", ["localhost"])
    ca = str(certs / "ca" / "ca.pem")

    def hello(name: str, as_tenant: str, machine: str = "web01") -> dict:
        context = pki.client_context(
            ca, str(tmp_path / f"{name}.pem"), str(tmp_path / f"{name}.key")
        )
        agent = Agent(server.port, context)
        try:
            return agent.hello(as_tenant, machine=machine)
        finally:
            agent.close()

    assert hello("agent-web01", tenant)["type"] == "welcome"
    refused = hello("agent-web01", "someone-else")
    assert refused == {
        "type": "error",
        "message": "certificate agent-web01 is not bound to tenant someone-else",
    }
    refused = hello("agent-web01", tenant, machine="db02")
    assert refused["type"] == "error" and "is for machine web01, not db02" in refused["message"]
    # A certificate issued for a server cannot act as an agent: TLS refuses it.
    with pytest.raises((ssl.SSLError, OSError, ConnectionError)):
        hello("server-cert", tenant)


def test_only_the_served_tenant_and_registered_disks_are_spooled(servers, connect, certs, tenant):
    """Agents of another tenant signed by the same CA once had their batches spooled (never
    uploadable, filling the spool for everyone); a machine's unregistered disk was taken too."""
    server = servers(tenant=tenant, agents={"web01": [DISK]})
    agent = connect(server, tenant)
    agent.close()
    for hello in ((f"{tenant}x", (DISK,), "web01"), (tenant, (DISK, "web01-other"), "web01"),
                  (tenant, (DISK,), "db02")):  # fmt: skip
        stranger = Agent(server.port, pki.client_context(
            str(certs / "ca" / "ca.pem"), str(certs / "agent.pem"), str(certs / "agent.key")))  # fmt: skip
        try:
            answer = stranger.hello(hello[0], hello[1], machine=hello[2])
        finally:
            stranger.close()
        assert answer["type"] == "error", hello
    assert not list(Path(server.base, "spool").rglob("*.batch"))


def _bad_payload(tenant: str) -> list:
    batch = make_batch(tenant, 1)
    return [{"type": "batch", "batch": batch.header()}, batch.payload[:-1]]


@pytest.mark.parametrize(
    ("frames", "expected"),
    [
        (lambda t: [({"type": "batch", "batch": {}}, b"")], "expected hello"),
        (lambda t: [({"type": "hello", "tenant": "Bad_T", "machine": "m", "disks": [DISK]}, b"")],
         "tenant 'Bad_T' is not a valid id"),
        (lambda t: [({"type": "hello", "tenant": t, "machine": "m", "disks": "d"}, b"")],
         "disks must be a non-empty list"),
        (lambda t: ["hello", _bad_payload(t)], "payload is 8191 bytes"),
        (lambda t: ["hello", ({"type": "batch", "batch": {"seq": 1}}, b"")], "malformed batch"),
        (lambda t: ["hello", ({"type": "batch", "batch": make_batch("other", 1).header()},
                              make_batch("other", 1).payload)], "batch of tenant 'other'"),
        (lambda t: ["hello", ({"type": "resync", "disk": DISK, "request_id": "../x",
                               "block_size": 4096}, b"")], "request id '../x' is not valid"),
        (lambda t: ["hello", ({"type": "launch"}, b"")], "unexpected frame type 'launch'"),
    ],
    ids=["no-hello", "bad-tenant", "bad-disks", "short-payload", "bad-header", "other-tenant",
         "bad-request-id", "unknown-type"],
)  # fmt: skip
def test_bad_input_gets_an_error_and_the_server_goes_on(
    servers, connect, certs, storage, tenant, frames, expected
):
    server = servers()
    agent = Agent(server.port, agent_context(certs))
    for frame in frames(tenant):
        if frame == "hello":
            assert agent.hello(tenant)["type"] == "welcome"
        else:
            agent.send(*frame)
    reply = agent.recv()
    assert reply is not None and reply[0]["type"] == "error", reply
    assert expected in reply[0]["message"]
    assert agent.recv() is None, "the server closes after an error"
    agent.close()

    good = connect(server, tenant)
    good.send_batch(make_batch(tenant, 2))
    assert collect_acks(good, 1) == {(1, 2)}
    assert server.proc.poll() is None
    assert [n["seq"] for n in collect_notices(storage, tenant, 1)] == [2]
    # Nothing of the refused input was uploaded.
    assert not storage.exists(
        naming.segments_container(tenant, DISK), naming.segment_blob(tenant, DISK, 1, 1)
    )


def test_garbage_on_the_wire_is_refused(servers, connect, certs, tenant):
    server = servers()
    agent = Agent(server.port, agent_context(certs))
    agent.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = agent.recv()
    assert reply is not None and reply[0]["type"] == "error"
    assert "bad frame magic" in reply[0]["message"]
    agent.close()
    assert connect(server, tenant) is not None


# -- durability and backpressure ------------------------------------------------------------


def test_acked_batches_survive_sigkill_while_storage_is_down(
    servers, connect, azurite, storage, tenant
):
    server = servers(storage=dead_storage())
    agent = connect(server, tenant)
    batches = {(1, s): make_batch(tenant, s, tag=s == 5) for s in range(1, 6)}
    for batch in batches.values():
        agent.send_batch(batch)
    assert collect_acks(agent, len(batches)) == set(batches)
    assert server.signal(signal.SIGKILL) == -signal.SIGKILL
    assert len(server.spooled(tenant)) == len(batches)
    spool_dir = server.state_dir / "spool" / tenant / DISK
    for (gen, seq), batch in batches.items():
        # What was acknowledged is on disk as the very segment its upload sends: sealed.
        spooled = (spool_dir / f"{gen:08d}-{seq:012d}.batch").read_bytes()
        assert unpack(spooled, "spooled", key=server.segment_key) == batch
        assert bytes(batch.payload[:64]) not in spooled  # the data is not on disk in the clear
    # A write the crash interrupted (never acknowledged) must not be uploaded.
    leftover = spool_dir / ".00000001-000000000099.batch.tmp7"
    leftover.write_bytes(b"half a batch")
    # A batch spooled raw by an earlier version is packed and uploaded like the others.
    legacy = make_batch(tenant, 6)
    (spool_dir / "00000001-000000000006.batch").write_bytes(legacy_spool_file(legacy))
    batches[(1, 6)] = legacy

    server.start(storage=azurite.connection_string)
    notices = collect_notices(storage, tenant, len(batches))
    assert sorted((n["gen"], n["seq"]) for n in notices) == sorted(batches)
    verify_uploaded(storage, notices, batches, server.segment_key)
    wait_for(lambda: not server.spooled(tenant), 10, lambda: str(server.spooled(tenant)))
    assert not storage.exists(
        naming.segments_container(tenant, DISK), naming.segment_blob(tenant, DISK, 1, 99)
    )


def test_full_spool_stalls_the_agent_instead_of_failing(servers, certs, azurite, storage, tenant):
    size = 64 << 10
    server = servers(storage=dead_storage(), spool_limit_bytes=3 * size)
    agent = Agent(server.port, agent_context(certs))
    agent.hello(tenant)
    batches = {(1, s): make_batch(tenant, s, size=size) for s in range(1, 25)}

    def send_all(agent: Agent) -> None:
        try:
            for batch in sorted(batches.values(), key=lambda b: b.seq):
                agent.send_batch(batch)
        except OSError:
            pass  # the server was killed under a blocked send

    threading.Thread(target=send_all, args=(agent,), daemon=True).start()
    acked: set[tuple[int, int]] = set()
    while True:  # acks come until the spool is over its limit, then stop
        try:
            acked |= collect_acks(agent, 1, timeout=2)
        except TimeoutError:
            break
    assert 3 <= len(acked) <= 5, "the server reads one frame past the limit, then waits"
    assert server.proc.poll() is None
    wait_for(lambda: server.status()["throttling"], 5, "throttling")
    assert "throttling" in server.tail()

    # Storage comes back (a restart with the real one); the agent reconnects and resends.
    server.signal(signal.SIGKILL)
    agent.close()
    server.start(storage=azurite.connection_string)
    agent = Agent(server.port, agent_context(certs))
    assert agent.hello(tenant)["type"] == "welcome"
    missing = [b for k, b in sorted(batches.items()) if k not in acked]
    threading.Thread(target=lambda: [agent.send_batch(b) for b in missing], daemon=True).start()
    assert collect_acks(agent, len(missing), timeout=60) == {(b.gen, b.seq) for b in missing}
    notices = collect_notices(storage, tenant, len(batches))
    assert sorted((n["gen"], n["seq"]) for n in notices) == sorted(batches)
    verify_uploaded(storage, notices, batches, server.segment_key)
    agent.close()


@pytest.mark.root
def test_a_full_spool_filesystem_stalls_the_agent_instead_of_refusing(
    servers, certs, azurite, storage, tenant
):
    # Far below the spool limit, the filesystem under the spool fills: the
    # server must wait for room (as over the limit), not refuse the batch and
    # drop the connection, which made the agent resend its window in a loop.
    size = 64 << 10
    server = servers(storage=dead_storage(), start=False)
    server.state_dir.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(server.state_dir)], check=True
    )
    try:
        server.start()
        agent = Agent(server.port, agent_context(certs))
        agent.hello(tenant)
        batches = {(1, s): make_batch(tenant, s, size=size) for s in range(1, 25)}
        sender = threading.Thread(
            target=lambda: [agent.send_batch(b) for b in batches.values()], daemon=True
        )
        sender.start()
        acked: set[tuple[int, int]] = set()
        while True:
            try:
                acked |= collect_acks(agent, 1, timeout=3)  # fails if the server hangs up
            except TimeoutError:
                break
        assert 5 <= len(acked) < len(batches), len(acked)
        wait_for(lambda: "spool's filesystem is full" in server.tail(), 5, server.tail)
        spool = server.state_dir / "spool" / tenant / DISK
        assert not list(spool.glob(".*tmp*")), "a failed write left its partial copy"
        # Storage comes back: the server drains, and the waiting batches go through.
        server.signal(signal.SIGKILL)
        agent.close()
        server.start(storage=azurite.connection_string)
        agent = Agent(server.port, agent_context(certs))
        assert agent.hello(tenant)["type"] == "welcome"
        missing = [b for k, b in sorted(batches.items()) if k not in acked]
        threading.Thread(target=lambda: [agent.send_batch(b) for b in missing], daemon=True).start()
        assert collect_acks(agent, len(missing), timeout=60) == {(b.gen, b.seq) for b in missing}
        notices = collect_notices(storage, tenant, len(batches))
        verify_uploaded(storage, notices, batches, server.segment_key)
        agent.close()
    finally:
        server.stop()
        subprocess.run(["umount", "-l", str(server.state_dir)], capture_output=True)


def test_a_damaged_spool_file_is_set_aside_and_the_rest_uploaded(servers, connect, storage, tenant):
    server = servers(start=False)
    spool_dir = server.state_dir / "spool" / tenant / DISK
    spool_dir.mkdir(parents=True)
    (spool_dir / "00000001-000000000001.batch").write_bytes(b"\0\0\0\x05{bad}")
    server.start()
    agent = connect(server, tenant)
    agent.send_batch(make_batch(tenant, 2))
    assert collect_acks(agent, 1) == {(1, 2)}
    assert [n["seq"] for n in collect_notices(storage, tenant, 1)] == [2]
    assert (
        server.state_dir / "quarantine" / tenant / DISK / "00000001-000000000001.batch"
    ).exists()
    wait_for(lambda: server.status()["batches_quarantined"] == 1, 5, "a quarantined batch")
    assert "needs a resync" in server.tail()
    # The agent is told, so that a resync closes the gap (it once waited forever).
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        frame = agent.recv(timeout=2)
        if frame and frame[0]["type"] == "resync-required":
            assert (frame[0]["disk"], frame[0]["gen"]) == (DISK, 1)
            assert "unreadable" in frame[0]["reason"]
            break
    else:
        raise AssertionError("no resync-required frame for the quarantined batch")


# -- relays -------------------------------------------------------------------------------


def test_resync_is_relayed_to_the_master_target_and_answered(servers, connect, storage, tenant):
    server = servers()
    agent = connect(server, tenant)
    agent.send({"type": "resync", "disk": DISK, "request_id": "req-1", "block_size": 65536})
    (notice,) = collect_notices(storage, tenant, 1)
    assert notice == {"type": "resync", "tenant": tenant, "disk": DISK,
                      "request_id": "req-1", "block_size": 65536}  # fmt: skip

    # While the master target thinks, batches keep flowing.
    agent.send_batch(make_batch(tenant, 1))
    assert collect_acks(agent, 1) == {(1, 1)}

    # Playing the master target: a digest map and the answer naming it.
    digests = os.urandom(16 * 40)
    digest_blob = naming.digest_blob(tenant, DISK, 2)
    storage.put(naming.control_container(tenant, DISK), digest_blob, digests)
    answer = {"request_id": "req-1", "gen": 2, "block_size": 65536, "target_size": 40 * 65536,
              "digest_blob": digest_blob, "empty": False}  # fmt: skip
    storage.put_json(
        naming.control_container(tenant, DISK),
        naming.resync_answer_blob(tenant, DISK, "req-1"),
        answer,
    )
    header, payload = agent.recv(15)
    assert header["type"] == "resync-answer", header
    assert {k: header[k] for k in ("disk", "request_id", "gen", "block_size", "target_size")} == {
        "disk": DISK, "request_id": "req-1", "gen": 2, "block_size": 65536,
        "target_size": 40 * 65536,
    }  # fmt: skip
    assert header["empty"] is False
    assert payload == digests

    # An empty target: no map, an empty payload.
    empty = {**answer, "request_id": "req-2", "gen": 3, "digest_blob": None, "empty": True}
    storage.put_json(
        naming.control_container(tenant, DISK),
        naming.resync_answer_blob(tenant, DISK, "req-2"),
        empty,
    )
    agent.send({"type": "resync", "disk": DISK, "request_id": "req-2", "block_size": 65536})
    header, payload = agent.recv(15)
    assert (header["type"], header["request_id"], header["gen"], header["empty"]) == (
        "resync-answer", "req-2", 3, True,
    )  # fmt: skip
    assert payload == b""


def test_resync_required_is_relayed_once_per_generation(servers, connect, storage, tenant):
    server = servers(state_poll_interval=0.2)
    agent = connect(server, tenant)
    state_blob = naming.disk_state_blob(tenant, DISK)
    state = {"tenant": tenant, "disk": DISK, "gen": 3, "applied_seq": 4,
             "resync_required_gen": 3, "reason": "segment gen 3 seq 5: checksum mismatch"}  # fmt: skip
    storage.put_json(naming.control_container(tenant, DISK), state_blob, state)
    header, _ = agent.recv(10)
    assert header == {"type": "resync-required", "disk": DISK, "gen": 3,
                      "reason": "segment gen 3 seq 5: checksum mismatch"}  # fmt: skip
    with pytest.raises(TimeoutError):
        agent.recv(1.0)  # polled five times more, said once

    storage.put_json(
        naming.control_container(tenant, DISK),
        state_blob,
        {**state, "resync_required_gen": 4, "reason": "x"},
    )
    header, _ = agent.recv(10)
    assert (header["type"], header["gen"], header["reason"]) == ("resync-required", 4, "x")


# -- operator errors ------------------------------------------------------------------------


def run_server(config: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "processserver", "--config", str(config)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), "FERRY_STORAGE": dead_storage(), **(env or {})},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"speed": 3}, "unknown key speed"),
        ({"upload_threads": "four"}, "upload_threads must be an integer"),
        ({"listen": "nowhere"}, "listen must be host:port"),
        ({"compression_level": 99}, "compression_level must be -7 to -1 (fast) or 1 to 22"),
        ({"cipher": "rot13"}, "cipher must be aegis-256 or aes-256-gcm, not 'rot13'"),
        ({"storage_env": "FERRY_TEST_NOT_SET"}, "environment variable FERRY_TEST_NOT_SET"),
        ({"cert": "/nonexistent/ps.pem"}, "cert: cannot read /nonexistent/ps.pem"),
        ({"segment_key_file": "/nonexistent/key"}, "cannot read the segment key"),
        ({"segment_key_file": __file__}, "cannot read the segment key"),
        ({"cert": __file__}, "cannot use ca /"),
    ],
)
def test_bad_settings_give_one_line_and_a_nonzero_exit(servers, change, expected):
    server = servers(start=False, **change)
    result = run_server(server.config)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("process-server: error: "), lines[0]
    assert expected in lines[0]


def test_port_in_use_gives_one_line(servers):
    server = servers(start=False)
    with socket.create_server(("127.0.0.1", server.port)):
        result = run_server(server.config)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("process-server: error: cannot listen on 127.0.0.1:"), lines


def test_unusable_state_dir_gives_one_line(servers, tmp_path):
    (tmp_path / "plain-file").write_text("")
    server = servers(start=False, state_dir=str(tmp_path / "plain-file" / "state"))
    result = run_server(server.config)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("process-server: error: cannot use the spool"), lines
