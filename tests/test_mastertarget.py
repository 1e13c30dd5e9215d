"""The master target against real Azurite, real files and real processes.

The tests play the process server themselves: they build batches, pack them
into segments, upload them to the tenant's segments container and announce them on the
disk's queue, exactly as docs/design.md describes.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import xxhash
from azure.storage.blob import BlobLeaseClient
from support import ROOT, wait_for
from support.master_target import MasterTarget
from support.segments import DISK, SegmentShipper

from ferry import blockio, naming, segment
from ferry.batch import Batch
from ferry.errors import DeviceError
from ferry.storage import Storage
from mastertarget import cutover
from mastertarget import defaults as mt_defaults
from mastertarget.errors import LeaseLost, StateInUse
from mastertarget.main import main
from mastertarget.ownership import Ownership
from mastertarget.service import serve
from mastertarget.settings import DiskSettings, Settings
from mastertarget.status import StatusBoard
from mastertarget.worker import DiskWorker

KiB, MiB = 1 << 10, 1 << 20


# -- playing the process server: support.segments.SegmentShipper ------------------------------


def apply_to(image: bytearray, *batches: Batch) -> bytearray:
    """What a target holds after ``batches`` are applied in the order given."""
    for batch in batches:
        for offset, data, length in batch.pieces():
            image[offset : offset + length] = bytes(length) if data is None else data
    return image


def pattern(seq: int, offset: int, length: int) -> bytes:
    """Distinct, compressible content: every 4 KiB block names its batch and position."""
    out = []
    for block in range(offset // 4096, (offset + length) // 4096):
        out.append((f"{seq:06d}:{block:08d}|".encode() * 256)[:4096])
    return b"".join(out)


# -- in-process workers -----------------------------------------------------------------------


@pytest.fixture
def make_worker(tmp_path, storage, tenant):
    """Factory for a DiskWorker of DISK on ``tmp_path/target.img``; closed at teardown."""
    made = []

    def make(key=None, target=None, **kw) -> DiskWorker:
        settings = Settings(
            tenant=tenant,
            state_dir=tmp_path / "state",
            disks=[DiskSettings(DISK, Path(target or tmp_path / "target.img"))],
            allow_unsealed=key is None,  # the tests of sealing give a key
        )
        board = StatusBoard(settings.state_dir / "status.json")
        worker = DiskWorker(settings, settings.disks[0], storage, key=key, board=board, **kw)
        made.append(worker.open())
        return worker

    yield make
    for worker in made:
        worker.close()


def drain(worker: DiskWorker, rounds: int = 50) -> None:
    """Step until a round finds nothing to do."""
    for _ in range(rounds):
        if not worker.step():
            return
    raise AssertionError("the worker never went idle")


def published(worker: DiskWorker, ps: SegmentShipper, timeout: float = 10.0) -> dict:
    """The state blob once it shows the worker's cursor, stepping as the service does: a new
    applied point may reach it up to STATE_MIN_INTERVAL later."""
    deadline = time.monotonic() + timeout
    while (state := ps.state())["applied_seq"] != worker.cursor.applied_seq:
        assert time.monotonic() < deadline, "the state blob never showed the applied point"
        worker.step()
        time.sleep(0.05)
    return state


def staged_names(worker: DiskWorker) -> list[str]:
    return sorted(p.name for p in worker.staging.directory.iterdir())


def new_generation(ps: SegmentShipper, worker: DiskWorker, block_size: int = 4096) -> dict:
    request = ps.ask_resync(block_size=block_size)
    drain(worker)
    return ps.answer(request)


def read_target(worker: DiskWorker) -> bytes:
    return Path(worker.target.path).read_bytes()


# -- groups, ordering, duplicates --------------------------------------------------------------


def test_group_is_applied_only_when_its_tag_arrives(make_worker, storage, tenant):
    ps = SegmentShipper(storage, tenant, disk_size=1 * MiB)
    worker = make_worker()
    answer = new_generation(ps, worker)
    assert answer["gen"] == 1 and answer["empty"] is True and answer["digest_blob"] is None

    b0 = ps.batch(1, 1, [(512 * KiB, os.urandom(4 * KiB))], tag=True)
    ps.ship(b0)
    drain(worker)
    first_point = apply_to(bytearray(1 * MiB), b0)
    assert read_target(worker) == first_point

    b1 = ps.batch(1, 2, [(0, os.urandom(8 * KiB))])
    b2 = ps.batch(1, 3, [(64 * KiB, os.urandom(4 * KiB)), (0, 4 * KiB)])
    b3 = ps.batch(1, 4, [(1 * MiB - 12 * KiB, os.urandom(12 * KiB))], tag=True)
    ps.ship(b1)
    ps.ship(b2)
    drain(worker)
    assert read_target(worker) == first_point, "batches without their closing tag were applied"
    assert worker.cursor.applied_seq == 1
    assert staged_names(worker) == ["00000001-000000000002.seg", "00000001-000000000003.seg"]

    ps.ship(b3)
    drain(worker)
    expected = apply_to(bytearray(first_point), b1, b2, b3)
    assert read_target(worker) == expected
    cursor = json.loads(worker.cursor_path.read_text())
    assert (cursor["gen"], cursor["applied_seq"], cursor["last_tag"]) == (1, 4, b3.tag)
    assert staged_names(worker) == []
    assert ps.segment_blobs() == []
    assert storage.peek_count(ps.queue) == 0
    state = published(worker, ps)
    assert (state["gen"], state["applied_seq"], state["staged"]) == (1, 4, 0)
    assert state["last_tag"]["t0_wall"] == b3.tag["t0_wall"]
    assert state["resync_required_gen"] is None
    status = json.loads((worker.cursor_path.parent.parent / "status.json").read_text())
    assert status["disks"][DISK]["applied_seq"] == 4


def test_before_its_first_tag_a_target_applies_batches_as_they_arrive(make_worker, storage, tenant):
    ps = SegmentShipper(storage, tenant, disk_size=1 * MiB)
    worker = make_worker()
    new_generation(ps, worker)
    b1 = ps.batch(1, 1, [(0, os.urandom(8 * KiB))])
    b2 = ps.batch(1, 2, [(64 * KiB, os.urandom(4 * KiB))])
    b3 = ps.batch(1, 3, [(128 * KiB, os.urandom(4 * KiB))])
    ps.ship(b1)
    ps.ship(b3)  # early: held until b2 fills the gap
    drain(worker)
    assert read_target(worker)[: 8 * KiB] == b1.payload, (
        "an initial sync needs no tag to be applied"
    )
    assert worker.cursor.applied_seq == 1 and worker.cursor.last_tag is None
    assert staged_names(worker) == ["00000001-000000000003.seg"]
    ps.ship(b2)
    drain(worker)
    assert worker.cursor.applied_seq == 3 and staged_names(worker) == []
    assert read_target(worker) == apply_to(bytearray(1 * MiB), b1, b2, b3)


def test_duplicates_and_out_of_order_notices_apply_once_in_order(make_worker, storage, tenant):
    ps = SegmentShipper(storage, tenant, disk_size=1 * MiB)
    worker = make_worker()
    new_generation(ps, worker)
    # Overlapping extents: any other order than 1, 2, 3 gives different bytes.
    b1 = ps.batch(1, 1, [(0, b"\x01" * 8 * KiB)])
    b2 = ps.batch(1, 2, [(4 * KiB, b"\x02" * 8 * KiB)], tag=True)
    b3 = ps.batch(1, 3, [(8 * KiB, b"\x03" * 8 * KiB)], tag=True)

    ps.ship(b3)
    drain(worker)
    ps.ship(b1)
    drain(worker)
    # Before the first tag batches apply as they come, but never out of order.
    assert worker.cursor.applied_seq == 1 and read_target(worker)[8 * KiB : 16 * KiB] == bytes(
        8 * KiB
    )
    n2 = ps.ship(b2)
    ps.announce(n2)
    drain(worker)

    expected = apply_to(bytearray(1 * MiB), b1, b2, b3)
    assert read_target(worker) == expected
    assert worker.cursor.applied_seq == 3
    assert worker.cursor.bytes_applied == 3 * 8 * KiB, "a batch was applied twice"

    # A process server restarting re-uploads and re-announces: skipped, blob removed.
    ps.ship(b1)
    drain(worker)
    assert read_target(worker) == expected
    assert worker.cursor.bytes_applied == 3 * 8 * KiB
    assert ps.segment_blobs() == [] and storage.peek_count(ps.queue) == 0


def test_a_lost_notice_is_found_by_its_blobs_name(make_worker, storage, tenant, monkeypatch):
    """A notice deleted from the queue (or expired) left the disk waiting on the gap forever
    (found by the fault campaign, bench/faults.py ``frames``)."""
    monkeypatch.setattr(mt_defaults, "GAP_LOOKUP_AFTER", 0.0, raising=False)  # no wait
    ps = SegmentShipper(storage, tenant, disk_size=1 * MiB)
    worker = make_worker()
    new_generation(ps, worker)
    b1 = ps.batch(1, 1, [(0, b"\x01" * 8 * KiB)], tag=True)
    b2 = ps.batch(1, 2, [(4 * KiB, b"\x02" * 8 * KiB)])
    b3 = ps.batch(1, 3, [(8 * KiB, b"\x03" * 8 * KiB)], tag=True)
    ps.ship(b1)
    ps.upload(b2)  # uploaded, but its notice is lost
    ps.ship(b3)
    drain(worker)
    assert worker.cursor.applied_seq == 3, "the disk waits on the lost notice's gap"
    assert read_target(worker) == apply_to(bytearray(1 * MiB), b1, b2, b3)
    assert ps.segment_blobs() == []


def test_a_resync_request_overtaken_by_a_newer_one_is_ignored(make_worker, storage, tenant):
    """A resync request the agent gave up on, delivered after its successor, started a
    generation the agent never used: the disk stalled for good (the fault campaign's soak)."""
    ps = SegmentShipper(storage, tenant, disk_size=1 * MiB)
    worker = make_worker()
    new_generation(ps, worker)
    ps.ask_resync()
    [late] = storage.receive(ps.queue, count=1, visibility=60)  # held up in the queue
    time.sleep(1.5)  # the queue's insertion times count whole seconds
    assert new_generation(ps, worker)["gen"] == 2  # the agent asked again and got gen 2
    b1 = ps.batch(2, 1, [(0, b"\x07" * 4 * KiB)], tag=True)
    ps.ship(b1)
    storage.defer(ps.queue, late, 0)  # the old request arrives at last
    drain(worker)
    assert (worker.cursor.gen, worker.cursor.applied_seq) == (2, 1), "the agent's gen was left"
    assert read_target(worker)[: 4 * KiB] == b"\x07" * 4 * KiB


def test_newer_generation_is_held_until_its_resync(make_worker, storage, tenant):
    ps = SegmentShipper(storage, tenant, disk_size=256 * KiB)
    worker = make_worker()
    new_generation(ps, worker)
    b = ps.batch(2, 1, [(0, b"\x07" * 4 * KiB)], tag=True)
    ps.ship(b)
    drain(worker)
    assert read_target(worker) == b"" and staged_names(worker) == ["00000002-000000000001.seg"]

    assert new_generation(ps, worker)["gen"] == 2
    assert read_target(worker) == apply_to(bytearray(256 * KiB), b)
    assert (worker.cursor.gen, worker.cursor.applied_seq) == (2, 1)


# -- nothing corrupt is ever applied -----------------------------------------------------------

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def _corrupt(ps: SegmentShipper, batch: Batch, kind: str) -> dict:
    if kind == "bit-flip":
        packed, _ = segment.pack(batch, key=ps.key)
        flipped = bytearray(packed)
        flipped[len(flipped) // 2] ^= 0x10
        return ps.upload(batch, data=bytes(flipped))
    if kind == "notice-checksum":
        notice = ps.upload(batch)
        return dict(notice, checksum=xxhash.xxh3_128_hexdigest(b"something else"))
    if kind == "wrong-key":
        return ps.upload(batch, key=OTHER_KEY)
    if kind == "renamed":
        # The segment of another batch, uploaded under this batch's name.
        other = ps.batch(batch.gen, batch.seq + 5, [(0, batch.payload)])
        packed, checksum = segment.pack(other, key=ps.key)
        return dict(ps.upload(batch, data=packed), checksum=checksum)
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "sealed", "why"),
    [
        ("bit-flip", False, "checksum mismatch"),
        ("notice-checksum", False, "checksum differs from the notice"),
        ("wrong-key", True, "not one held here"),
        ("renamed", True, "seq is 6, expected 1"),
    ],
)
def test_corrupt_segment_is_poisoned_and_never_applied(
    make_worker, storage, tenant, kind, sealed, why
):
    ps = SegmentShipper(storage, tenant, disk_size=256 * KiB, key=KEY if sealed else None)
    worker = make_worker(key=KEY if sealed else None)
    new_generation(ps, worker)
    bad = ps.batch(1, 1, [(0, os.urandom(8 * KiB))])
    notice = _corrupt(ps, bad, kind)
    ps.announce(notice)
    ps.ship(ps.batch(1, 2, [(64 * KiB, os.urandom(4 * KiB))], tag=True))
    drain(worker)

    assert ps.poisoned() == [notice]
    assert storage.peek_count(ps.queue) == 0
    assert read_target(worker) == b"", "something of a corrupt group was applied"
    assert staged_names(worker) == ["00000001-000000000002.seg"]
    state = ps.state()
    assert state["resync_required_gen"] == 1 and why in state["reason"]

    # The resync that follows clears the mark and drops the broken generation.
    assert new_generation(ps, worker)["gen"] == 2
    assert ps.state()["resync_required_gen"] is None
    assert staged_names(worker) == []
    assert naming.segment_blob(tenant, DISK, 1, 2) not in ps.segment_blobs()


def test_unsealed_segment_is_rejected_when_a_key_is_set(make_worker, storage, tenant):
    ps = SegmentShipper(storage, tenant, disk_size=256 * KiB)
    worker = make_worker(key=KEY)
    new_generation(ps, worker)
    notice = ps.ship(ps.batch(1, 1, [(0, b"x" * 4096)], tag=True))
    drain(worker)
    assert ps.poisoned() == [notice]
    assert read_target(worker) == b""
    assert "not encrypted" in ps.state()["reason"]


def test_unsealed_segments_are_refused_by_default(make_worker, storage, tenant, tmp_path):
    """Segments were once protected only by a non-cryptographic checksum as deployed."""
    ps = SegmentShipper(storage, tenant, disk_size=256 * KiB)
    settings = Settings(tenant=tenant, state_dir=tmp_path / "plain",
                        disks=[DiskSettings(DISK, tmp_path / "plain.img")])  # fmt: skip
    assert settings.allow_unsealed is False
    worker = DiskWorker(settings, settings.disks[0], storage, key=None).open()
    try:
        new_generation(ps, worker)
        notice = ps.ship(ps.batch(1, 1, [(0, b"x" * 4096)], tag=True))
        drain(worker)
        assert ps.poisoned() == [notice]
        assert "allow_unsealed is off" in ps.state()["reason"]
    finally:
        worker.close()


def test_sealed_segments_with_the_right_key_are_applied(make_worker, storage, tenant):
    ps = SegmentShipper(storage, tenant, disk_size=256 * KiB, key=KEY)
    worker = make_worker(key=KEY)
    new_generation(ps, worker)
    b = ps.batch(1, 1, [(4096, os.urandom(4096))], tag=True)
    ps.ship(b)
    drain(worker)
    assert read_target(worker) == apply_to(bytearray(256 * KiB), b)


def test_missing_blob_is_poisoned_on_the_third_sighting(make_worker, storage, tenant):
    ps = SegmentShipper(storage, tenant, disk_size=256 * KiB)
    worker = make_worker(missing_retry=0)
    new_generation(ps, worker)
    notice = ps.upload(ps.batch(1, 1, [(0, b"y" * 4096)], tag=True))
    storage.delete(naming.segments_container(tenant, DISK), notice["blob"])
    ps.announce(notice)

    worker.step()
    assert ps.poisoned() == [] and storage.peek_count(ps.queue) == 1
    drain(worker)
    assert ps.poisoned() == [notice]
    assert ps.state()["resync_required_gen"] == 1
    assert "blob missing after 3 deliveries" in ps.state()["reason"]


def test_a_round_downloads_its_segments_ahead_and_applies_them_in_order(
    make_worker, storage, tenant, monkeypatch
):
    """The round's downloads overlap (FETCH_AHEAD in flight) while the segments are still
    verified and applied in their order, and a missing blob among them is still noticed."""
    ps = SegmentShipper(storage, tenant, disk_size=1 * MiB)
    worker = make_worker(missing_retry=0)
    new_generation(ps, worker)
    in_flight, most, lock = [0], [0], threading.Lock()
    real_get = storage.get

    def get(container, name):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        try:
            time.sleep(0.05)  # a download that takes time, as a large segment's does
            return real_get(container, name)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(storage, "get", get)
    batches = [ps.batch(1, seq, [(seq * 16 * KiB, os.urandom(16 * KiB))]) for seq in range(1, 9)]
    batches.append(ps.batch(1, 9, [(0, os.urandom(4 * KiB))], tag=True))
    for batch in reversed(batches):  # announced last first: applied in seq order all the same
        ps.ship(batch)
    drain(worker)
    assert most[0] == mt_defaults.FETCH_AHEAD, f"{most[0]} downloads at once"
    assert worker.cursor.applied_seq == 9
    assert read_target(worker) == apply_to(bytearray(1 * MiB), *batches)

    gone = ps.upload(ps.batch(1, 11, [(0, b"y" * 4096)], tag=True))
    storage.delete(naming.segments_container(tenant, DISK), gone["blob"])
    ps.ship(ps.batch(1, 10, [(8192, b"x" * 4096)]))
    ps.announce(gone)
    worker.step()
    assert ps.poisoned() == [] and storage.peek_count(ps.queue) == 1, "the missing blob waits"


def test_unusable_notices_go_to_the_poison_queue(make_worker, storage, tenant):
    ps = SegmentShipper(storage, tenant, disk_size=256 * KiB)
    worker = make_worker()
    new_generation(ps, worker)
    storage.send_raw(ps.queue, "this is not JSON")
    ps.announce({"type": "gossip", "tenant": tenant, "disk": DISK})
    foreign = ps.upload(ps.batch(1, 1, [(0, b"z" * 4096)], tag=True))
    ps.announce(dict(foreign, disk="otherdisk"))
    drain(worker)
    assert len(ps.poisoned()) == 3
    assert storage.peek_count(ps.queue) == 0
    assert ps.state()["resync_required_gen"] is None

    # A notice of this disk's stream that cannot be used means a batch is lost.
    ps.announce(dict(foreign, blob=f"{tenant}/otherdisk/00000001/000000000001.seg"))
    drain(worker)
    assert ps.state()["resync_required_gen"] == 1
    assert naming.segment_blob(tenant, DISK, 1, 1) in ps.segment_blobs(), "blob was touched"


def test_segment_verified_at_staging_is_applied_from_memory(make_worker, storage, tenant):
    """While it runs, the master target applies the segment it verified, not a re-read file."""
    ps = SegmentShipper(storage, tenant, disk_size=256 * KiB)
    worker = make_worker()
    new_generation(ps, worker)
    b0 = ps.batch(1, 1, [(128 * KiB, os.urandom(4 * KiB))], tag=True)
    ps.ship(b0)
    drain(worker)
    b1 = ps.batch(1, 2, [(0, os.urandom(16 * KiB))])
    ps.ship(b1)
    drain(worker)
    staged = worker.staging.directory / "00000001-000000000002.seg"
    staged.write_bytes(b"garbage")  # what the staging disk holds no longer matters
    ps.ship(ps.batch(1, 3, [(32 * KiB, os.urandom(4 * KiB))], tag=True))
    drain(worker)
    assert worker.cursor.applied_seq == 3
    assert read_target(worker)[: 16 * KiB] == b1.payload


@pytest.mark.parametrize("blob_left", [True, False])
def test_damaged_staged_file_is_fetched_again_or_never_applied(
    make_worker, storage, tenant, blob_left
):
    ps = SegmentShipper(storage, tenant, disk_size=256 * KiB)
    worker = make_worker()
    new_generation(ps, worker)
    b0 = ps.batch(1, 1, [(128 * KiB, os.urandom(4 * KiB))], tag=True)  # a first recovery point
    ps.ship(b0)
    drain(worker)
    b1 = ps.batch(1, 2, [(0, os.urandom(16 * KiB))])
    b2 = ps.batch(1, 3, [(32 * KiB, os.urandom(4 * KiB))], tag=True)
    n1 = ps.ship(b1)
    drain(worker)
    # A restart: what was verified in memory at staging is gone, the staged file serves.
    worker.close()
    worker = make_worker()
    staged = worker.staging.directory / "00000001-000000000002.seg"
    damaged = bytearray(staged.read_bytes())
    damaged[100] ^= 1
    staged.write_bytes(damaged)  # the local disk flipped a bit
    if not blob_left:
        storage.delete(naming.segments_container(tenant, DISK), n1["blob"])
    ps.ship(b2)
    drain(worker)
    if blob_left:
        assert read_target(worker) == apply_to(bytearray(256 * KiB), b0, b1, b2)
        assert worker.cursor.applied_seq == 3
    else:
        assert read_target(worker) == apply_to(bytearray(256 * KiB), b0), "half a group was applied"
        assert worker.cursor.applied_seq == 1
        assert ps.state()["resync_required_gen"] == 1


# -- resync ---------------------------------------------------------------------------------------


def test_resync_answers_with_the_targets_digest_map(make_worker, storage, tenant):
    ps = SegmentShipper(storage, tenant, disk_size=512 * KiB)
    worker = make_worker()
    first = new_generation(ps, worker)
    assert first == {
        "request_id": first["request_id"],
        "gen": 1,
        "block_size": 4096,
        "target_size": 0,
        "digest_blob": None,
        "empty": True,
    }
    g1 = ps.batch(1, 1, [(8 * KiB, os.urandom(20 * KiB))], tag=True)
    ps.ship(g1)
    ps.ship(ps.batch(1, 2, [(0, b"\xff" * 4 * KiB)]))  # an unfinished group
    drain(worker)
    assert staged_names(worker) == ["00000001-000000000002.seg"]

    request = ps.ask_resync(block_size=8192)
    drain(worker)
    answer = ps.answer(request)
    assert (answer["gen"], answer["empty"], answer["target_size"]) == (2, False, 512 * KiB)
    assert answer["digest_blob"] == naming.digest_blob(tenant, DISK, 2)
    expected_map, _ = blockio.digest_map(worker.target.path, 8192)
    assert (
        storage.get(naming.control_container(tenant, DISK), answer["digest_blob"]) == expected_map
    )
    assert staged_names(worker) == [] and ps.segment_blobs() == []
    assert worker.cursor.last_tag == g1.tag, "the target still sits on the last tag"

    # The same request again is answered already; an old generation is skipped.
    ps.ask_resync(request_id=request)
    old = ps.ship(ps.batch(1, 3, [(0, b"\xee" * 4 * KiB)], tag=True))
    drain(worker)
    assert worker.cursor.gen == 2
    assert old["blob"] not in ps.segment_blobs()
    assert read_target(worker) == apply_to(bytearray(512 * KiB), g1)

    g2 = ps.batch(2, 1, [(0, b"\x11" * 4 * KiB)], tag=True)
    ps.ship(g2)
    drain(worker)
    assert read_target(worker) == apply_to(bytearray(512 * KiB), g1, g2)
    assert (worker.cursor.gen, worker.cursor.applied_seq) == (2, 1)

    # The next generation's map replaces this one's.
    assert new_generation(ps, worker)["gen"] == 3
    maps = storage.list(naming.control_container(tenant, DISK), f"{tenant}/{DISK}/digests/")
    assert maps == [naming.digest_blob(tenant, DISK, 3)]


def test_resync_interrupted_before_its_answer_reuses_the_generation(make_worker, storage, tenant):
    ps = SegmentShipper(storage, tenant, disk_size=256 * KiB)
    worker = make_worker()
    request = ps.ask_resync()
    drain(worker)
    # As if the master target had crashed after the cursor, before the answer.
    storage.delete(
        naming.control_container(tenant, DISK), naming.resync_answer_blob(tenant, DISK, request)
    )
    ps.ask_resync(request_id=request)
    drain(worker)
    assert ps.answer(request)["gen"] == 1 and worker.cursor.gen == 1


# -- ownership ------------------------------------------------------------------------------------


def test_lost_lease_stops_applying_at_once(make_worker, storage, tenant):
    ps = SegmentShipper(storage, tenant, disk_size=256 * KiB)
    ownership = Ownership(storage, tenant, DISK, seconds=15, renew_every=0.2)
    assert ownership.acquire()
    try:
        worker = make_worker(ownership=ownership)
        new_generation(ps, worker)
        first = ps.batch(1, 1, [(8192, b"z" * 4096)], tag=True)  # a first recovery point
        ps.ship(first)
        ps.ship(ps.batch(1, 2, [(0, b"a" * 4096)]))
        drain(worker)
        at_first = apply_to(bytearray(256 * KiB), first)

        blob = storage.blobs.get_blob_client(
            naming.control_container(tenant, DISK), naming.lease_blob(tenant, DISK)
        )
        BlobLeaseClient(blob).break_lease(lease_break_period=0)
        with storage.lease(
            naming.control_container(tenant, DISK), naming.lease_blob(tenant, DISK), DISK, 15
        ):
            deadline = time.monotonic() + 10
            while not ownership.lost and time.monotonic() < deadline:
                time.sleep(0.05)
            ps.ship(ps.batch(1, 3, [(0, b"b" * 4096)], tag=True))
            with pytest.raises(LeaseLost, match=f"lost the owner lease of disk {DISK}"):
                worker.step()
        assert read_target(worker) == at_first and worker.cursor.applied_seq == 1
        assert storage.peek_count(ps.queue) == 1, "a notice was taken without the lease"
    finally:
        ownership.release()


def test_state_directory_serves_one_process_at_a_time(storage, tenant, tmp_path):
    mine = Ownership(storage, tenant, DISK, seconds=15, state_dir=tmp_path / DISK)
    other = Ownership(storage, tenant, DISK, seconds=15, state_dir=tmp_path / DISK)
    assert mine.acquire()
    try:
        with pytest.raises(StateInUse, match="is in use by another master target process"):
            other.acquire()
    finally:
        mine.release()
        other.release()


# -- fence (cutover) and hold (test failover) ------------------------------------------------------


def _fence_record(storage: Storage, tenant: str, tag: dict) -> None:
    record = {"tenant": tenant, "disk": DISK, "tag": tag, "reason": "cutover", "fenced_at": 1.0}
    storage.put_json(
        naming.control_container(tenant, DISK), naming.fence_blob(tenant, DISK), record
    )


def _at_a_first_tag(make_worker, storage, tenant) -> tuple[SegmentShipper, DiskWorker, Batch]:
    """A worker whose target sits on a first tag (batch ``b1``, returned)."""
    ps = SegmentShipper(storage, tenant, disk_size=256 * KiB)
    worker = make_worker()
    new_generation(ps, worker)
    b1 = ps.batch(1, 1, [(0, b"a" * 4096)], tag=True)
    ps.ship(b1)
    drain(worker)
    return ps, worker, b1


def test_final_tag_fences_the_disk_and_nothing_after_it_is_applied(make_worker, storage, tenant):
    ps = SegmentShipper(storage, tenant, disk_size=256 * KiB)
    worker = make_worker()
    new_generation(ps, worker)
    b1 = ps.batch(1, 1, [(0, b"a" * 4096)], tag=True)
    b2 = ps.batch(1, 2, [(4096, b"b" * 4096)], tag=True)
    b2.tag["final"] = True
    after = [ps.batch(1, 3, [(0, b"X" * 4096)]), ps.batch(1, 4, [(8192, b"Y" * 4096)], tag=True)]
    for batch in (b1, b2, *after):
        ps.ship(batch)
    drain(worker)

    at_final = apply_to(bytearray(256 * KiB), b1, b2)
    assert read_target(worker) == at_final, "a batch sent after the final tag was applied"
    cursor = json.loads(worker.cursor_path.read_text())
    assert (cursor["applied_seq"], cursor["fenced"]["tag"]["id"]) == (2, b2.tag["id"])
    assert ps.state()["fenced"]["reason"] == "final tag (cutover)"
    assert worker.step() == 0  # no longer served
    assert staged_names(worker) == ["00000001-000000000003.seg", "00000001-000000000004.seg"]

    worker.close()
    again = make_worker()  # a restart remembers the fence
    assert again.fenced and again.step() == 0
    assert read_target(again) == at_final


def test_fence_record_stops_the_disk_at_its_tag(make_worker, storage, tenant):
    ps = SegmentShipper(storage, tenant, disk_size=256 * KiB)
    worker = make_worker()
    new_generation(ps, worker)
    b1 = ps.batch(1, 1, [(0, b"a" * 4096)], tag=True)
    b2 = ps.batch(1, 2, [(0, b"b" * 4096)], tag=True)
    _fence_record(storage, tenant, b1.tag)
    worker._check_fence(force=True)
    assert worker.fence["tag"]["id"] == b1.tag["id"] and not worker.fenced
    ps.ship(b1)
    ps.ship(b2)
    drain(worker)
    assert read_target(worker) == apply_to(bytearray(256 * KiB), b1)
    assert worker.cursor.fenced["reason"] == "cutover"


def test_a_group_newer_than_the_fence_tag_is_refused(make_worker, storage, tenant):
    ps, worker, b1 = _at_a_first_tag(make_worker, storage, tenant)
    lost = ps.batch(1, 2, [(0, b"L" * 4096)], tag=True)  # the fence's tag, never shipped
    lost.tag["id"] = "web01-final"
    newer = ps.batch(1, 2, [(0, b"N" * 4096)], tag=True)
    _fence_record(storage, tenant, lost.tag)
    worker._check_fence(force=True)
    ps.ship(newer)
    drain(worker)
    assert read_target(worker) == apply_to(bytearray(256 * KiB), b1)
    assert worker.cursor.applied_seq == 1
    assert "never arrived" in worker.cursor.fenced["reason"]


def test_a_held_master_target_stages_but_applies_only_after_the_hold(make_worker, storage, tenant):
    ps, worker, b1 = _at_a_first_tag(make_worker, storage, tenant)
    b2 = ps.batch(1, 2, [(0, b"b" * 4096)], tag=True)
    state_dir = worker.directory.parent
    with cutover.hold_applying(state_dir, DISK, "a test"):
        ps.ship(b2)
        drain(worker)
        assert read_target(worker) == apply_to(bytearray(256 * KiB), b1)
        assert staged_names(worker) == ["00000001-000000000002.seg"]
        assert storage.peek_count(ps.queue) == 0, "receiving stopped during the hold"
        assert worker.state()["held"] is True
    drain(worker)
    assert read_target(worker) == apply_to(bytearray(256 * KiB), b1, b2)
    assert worker.state()["held"] is False


def test_a_fenced_disk_is_not_served_and_its_lease_is_free(azurite, storage, tenant, tmp_path):
    ps = SegmentShipper(storage, tenant, disk_size=256 * KiB)
    settings = Settings(
        tenant=tenant,
        state_dir=tmp_path / "state",
        disks=[DiskSettings(DISK, tmp_path / "target.img")],
        lease_seconds=15,
        allow_unsealed=True,
    )
    final = ps.batch(1, 1, [(0, b"f" * 4096)], tag=True)
    final.tag["final"] = True
    ps.ask_resync()
    ps.ship(final)
    ps.ship(ps.batch(1, 2, [(0, b"X" * 4096)], tag=True))

    def serve_until_fenced() -> None:
        stop = threading.Event()
        timer = threading.Timer(60, stop.set)  # a hung service fails the test, not the suite
        timer.start()
        try:
            assert serve(settings, azurite.connection_string, None, stop) == 0
            assert not timer.finished.is_set(), "the fenced disk was still served after 60 s"
        finally:
            timer.cancel()

    serve_until_fenced()
    assert (tmp_path / "target.img").read_bytes()[:8192] == b"f" * 4096 + bytes(4096)
    with storage.lease(
        naming.control_container(tenant, DISK), naming.lease_blob(tenant, DISK), DISK, 15
    ):
        pass  # released: another master target, or the cutover, may take the disk
    serve_until_fenced()  # a restart does not serve it either


# -- the real process -------------------------------------------------------------------------------


def write_config(path: Path, tenant: str, state_dir: Path, target: Path) -> Path:
    path.write_text(
        f'tenant = "{tenant}"\nstate_dir = "{state_dir}"\nlease_seconds = 15\n'
        f"allow_unsealed = true\n\n"  # this module's process server sends plain segments
        f'[[disks]]\nid = "{DISK}"\ntarget = "{target}"\n'
    )
    return path


def test_second_master_target_for_a_disk_is_refused(azurite, tenant, tmp_path):
    conn = azurite.connection_string
    first = write_config(tmp_path / "a.toml", tenant, tmp_path / "a", tmp_path / "a.img")
    second = write_config(tmp_path / "b.toml", tenant, tmp_path / "b", tmp_path / "b.img")
    daemons = [MasterTarget(first, conn, tmp_path / "a.log")]
    try:
        owner = daemons[0]
        owner.wait_for_log(f"serving disk {DISK}")
        refused = subprocess.run(
            [sys.executable, "-m", "mastertarget", "--config", str(second)],
            cwd=ROOT, env=dict(os.environ, FERRY_STORAGE=conn),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert refused.returncode == 6
        assert refused.stderr.splitlines() == [
            f"master-target: error: disk {DISK} is owned by another master target (lease on "
            f"{naming.control_container(tenant, DISK)}/{naming.lease_blob(tenant, DISK)} is held); "
            "stop it first or run with --wait"
        ]
        waiter = MasterTarget(second, conn, tmp_path / "b.log", "--wait")
        daemons.append(waiter)
        waiter.wait_for_log("waiting for it")
        assert owner.stop() == 0
        waiter.wait_for_log(f"serving disk {DISK}")
        assert waiter.stop() == 0
    finally:
        for daemon in daemons:
            daemon.kill()


def _cursor(state_dir: Path) -> dict:
    path = state_dir / DISK / "cursor.json"
    return json.loads(path.read_text()) if path.exists() else {}


def test_killed_master_target_replays_the_group_and_converges(azurite, storage, tenant, tmp_path):
    disk_size, piece = 128 * MiB, 4 * MiB
    state_dir, target = tmp_path / "state", tmp_path / "target.img"
    staging = state_dir / DISK / "staging"
    config = write_config(tmp_path / "mt.toml", tenant, state_dir, target)
    ps = SegmentShipper(storage, tenant, disk_size)
    model = bytearray(disk_size)
    daemons = [MasterTarget(config, azurite.connection_string, tmp_path / "mt1.log")]
    try:
        request = ps.ask_resync()
        answer = naming.resync_answer_blob(tenant, DISK, request)
        wait_for(
            lambda: storage.exists(naming.control_container(tenant, DISK), answer),
            30,
            "the resync answer",
        )
        first = ps.batch(1, 1, [(0, pattern(1, 0, 8 * MiB))], tag=True)
        ps.ship(first)
        apply_to(model, first)
        wait_for(lambda: _cursor(state_dir).get("applied_seq") == 1, 30, "group 1")

        # A large group whose tag comes last; everything before it gets staged.
        group = [
            ps.batch(
                1, seq, [(seq * piece, pattern(seq, seq * piece, piece)), (seq * 4096, 4096)],
                tag=seq == 25,
            )
            for seq in range(2, 26)
        ]  # fmt: skip
        notices = [ps.upload(b) for b in group]
        apply_to(model, *group)
        for notice in notices[:-1]:
            ps.announce(notice)
        wait_for(lambda: len(list(staging.glob("*.seg"))) == 23, 30, "staging")
        wait_for(lambda: storage.peek_count(ps.queue) == 0, 30, "notices deleted")
        assert daemons[-1].stop(signal.SIGKILL) == -signal.SIGKILL

        # Restart, let the tag arrive, and kill again as soon as the target is written.
        daemons.append(MasterTarget(config, azurite.connection_string, tmp_path / "mt2.log"))
        daemons[-1].wait_for_log("serving disk")
        before = target.stat().st_mtime_ns
        ps.announce(notices[-1])
        deadline = time.monotonic() + 30
        while target.stat().st_mtime_ns == before and time.monotonic() < deadline:
            pass  # spin: the apply takes well under a second
        daemons[-1].kill()
        assert _cursor(state_dir)["applied_seq"] == 1, "the kill came after the apply"
        # The tag's segment, applied in the round that received it, was staged in memory only
        # and went with the process; its notice is still in the queue (hidden for 30 s).
        assert len(list(staging.glob("*.seg"))) == 23
        assert _digest(target) != hashlib.sha256(model).hexdigest(), "not killed mid-group"

        daemons.append(MasterTarget(config, azurite.connection_string, tmp_path / "mt3.log"))
        # At once, not after the notice's visibility timeout: the group's missing segment
        # is fetched by its blob's name.
        wait_for(lambda: _cursor(state_dir).get("applied_seq") == 25, 20, "the replay")
        assert "to replay the group a crash interrupted" in (tmp_path / "mt3.log").read_text()
        assert _cursor(state_dir)["last_tag"] == group[-1].tag
        assert _digest(target) == hashlib.sha256(model).hexdigest()
        assert list(staging.glob("*.seg")) == []
        wait_for(lambda: ps.segment_blobs() == [], 10, "blobs deleted")
        assert daemons[-1].stop() == 0
    finally:
        for daemon in daemons:
            daemon.kill()


def test_sigterm_finishes_the_group_in_hand(azurite, storage, tenant, tmp_path):
    disk_size, piece = 64 * MiB, 4 * MiB
    state_dir, target = tmp_path / "state", tmp_path / "target.img"
    config = write_config(tmp_path / "mt.toml", tenant, state_dir, target)
    ps = SegmentShipper(storage, tenant, disk_size)
    daemon = MasterTarget(config, azurite.connection_string, tmp_path / "mt.log")
    try:
        request = ps.ask_resync()
        answer = naming.resync_answer_blob(tenant, DISK, request)
        wait_for(
            lambda: storage.exists(naming.control_container(tenant, DISK), answer),
            30,
            "the resync answer",
        )
        first = ps.batch(1, 1, [(0, pattern(1, 0, piece))], tag=True)  # a first recovery point
        ps.ship(first)
        wait_for(lambda: _cursor(state_dir).get("applied_seq") == 1, 30, "group 1")
        group = [
            ps.batch(1, seq, [(seq * piece, pattern(seq, seq * piece, piece))], tag=seq == 15)
            for seq in range(2, 16)
        ]
        notices = [ps.upload(b) for b in group]
        for notice in notices[:-1]:
            ps.announce(notice)
        staging = state_dir / DISK / "staging"
        wait_for(lambda: len(list(staging.glob("*.seg"))) == 13, 30, "staging")
        before = target.stat().st_mtime_ns
        ps.announce(notices[-1])
        deadline = time.monotonic() + 30
        while target.stat().st_mtime_ns == before and time.monotonic() < deadline:
            pass
        assert daemon.stop(signal.SIGTERM) == 0
        assert _cursor(state_dir)["applied_seq"] == 15
        assert (
            _digest(target)
            == hashlib.sha256(apply_to(bytearray(disk_size), first, *group)).hexdigest()
        )
        assert "stopped serving disk" in daemon.output()
    finally:
        daemon.kill()


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


# -- settings and operator errors -----------------------------------------------------------------


def test_malformed_settings_file_gives_one_line(tmp_path):
    config = tmp_path / "mt.toml"
    config.write_text('tenant = "demo"\nstate_dir = [\n')
    result = subprocess.run(
        [sys.executable, "-m", "mastertarget", "--config", str(config)],
        cwd=ROOT, env=dict(os.environ, FERRY_STORAGE="UseDevelopmentStorage=true"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"master-target: error: invalid settings in {config}: not valid TOML"
    )


GOOD = '{tenant}state_dir = "{state}"\n{extra}\n[[disks]]\nid = "{disk}"\ntarget = "{target}"\n'


@pytest.mark.parametrize(
    ("tenant_line", "extra", "disk", "env", "problem"),
    [
        ('tenant = "demo"\n', "colour = 1", DISK, True, "unknown key colour"),
        ('tenant = "demo"\n', "", "Disk_0", True, "disks[0].id 'Disk_0' is not a valid id"),
        ("", "", DISK, True, "missing required key tenant"),
        ('tenant = "demo"\n', "lease_seconds = 5", DISK, True, "lease_seconds must be between"),
        ('tenant = "demo"\n', 'storage_env = "NO_SUCH_VAR"', DISK, True, "NO_SUCH_VAR"),
        ('tenant = "demo"\n', "", DISK, False, "FERRY_STORAGE (storage_env) is not set"),
        ('tenant = "demo"\n', 'segment_key_file = "/nonexistent"', DISK, True, "segment key"),
    ],
)
def test_bad_settings_are_one_line_and_exit_2(
    tmp_path, capsys, monkeypatch, tenant_line, extra, disk, env, problem
):
    config = tmp_path / "mt.toml"
    config.write_text(
        GOOD.format(
            tenant=tenant_line, state=tmp_path, extra=extra, disk=disk, target=tmp_path / "t"
        )
    )
    if env:
        monkeypatch.setenv("FERRY_STORAGE", "UseDevelopmentStorage=true")
    else:
        monkeypatch.delenv("FERRY_STORAGE", raising=False)
    assert main(["--config", str(config)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("master-target: error: invalid settings in")
    assert problem in lines[0]


# -- block device targets (root) ------------------------------------------------------------------


@pytest.mark.root
def test_block_device_target(make_worker, storage, tenant, loopdisk):
    device = loopdisk(size=4 * MiB, fs=False).device
    ps = SegmentShipper(storage, tenant, disk_size=4 * MiB)
    worker = make_worker(target=device)
    assert new_generation(ps, worker)["empty"] is True
    b = ps.batch(1, 1, [(1 * MiB, os.urandom(64 * KiB)), (3 * MiB, 4 * KiB)], tag=True)
    ps.ship(b)
    drain(worker)
    with open(device, "rb") as f:
        assert f.read() == apply_to(bytearray(4 * MiB), b)
    answer = new_generation(ps, worker)
    assert (
        storage.get(naming.control_container(tenant, DISK), answer["digest_blob"])
        == blockio.digest_map(device, 4096)[0]
    )

    too_big = SegmentShipper(storage, tenant, disk_size=8 * MiB)
    too_big.ship(too_big.batch(2, 1, [(5 * MiB, b"q" * 4096)], tag=True))
    with pytest.raises(DeviceError, match="device holds 4194304 bytes"):
        drain(worker)


def test_a_copy_is_refused_while_a_group_may_be_half_applied(
    make_worker, storage, tenant, tmp_path, monkeypatch
):
    """A test failover once copied a torn target, labelled with the cursor's tag, after the
    master target died in the middle of a group: nothing durable said a group was in progress."""
    ps = SegmentShipper(storage, tenant, disk_size=256 * KiB)
    worker = make_worker()
    new_generation(ps, worker)
    first = ps.batch(1, 1, [(0, b"a" * 8192)], tag=True)
    ps.ship(first)
    drain(worker)
    ps.ship(ps.batch(1, 2, [(0, b"b" * 4096)]))
    ps.ship(ps.batch(1, 3, [(8192, b"c" * 4096)], tag=True))
    writes = []

    def dies_after_one_batch(batch, check=None):
        if writes:
            raise KeyboardInterrupt("killed in the middle of the group")  # as kill -9 would
        writes.append(batch.seq)
        return type(worker.target).write_batch(worker.target, batch, check=check)

    monkeypatch.setattr(worker.target, "write_batch", dies_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        drain(worker)
    assert read_target(worker)[:4] == b"bbbb"  # torn: batch 2 of the group without batch 3
    state = worker.directory.parent
    with pytest.raises(cutover.CutoverError, match="between two tags"):
        cutover.clone_at_tag(state, DISK, worker.target.path, tmp_path / "copy.img", 256 * KiB)
    worker.close()
    restarted = make_worker()  # the restart replays the group
    drain(restarted)
    assert not (state / DISK / "applying.json").exists()
    clone = cutover.clone_at_tag(state, DISK, restarted.target.path, tmp_path / "copy.img",
                                 256 * KiB)  # fmt: skip
    assert clone["tag"]["id"] == restarted.cursor.last_tag["id"]
    assert (tmp_path / "copy.img").read_bytes() == read_target(restarted)
