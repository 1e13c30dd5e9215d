"""The process server's spool and upload budget, in-process on a real filesystem."""

from __future__ import annotations

import os
import threading
import time

import pytest
from support.process_server import legacy_spool_file

from ferry import segment
from ferry.batch import DATA, Batch
from processserver.spool import Spool, Spooled, SpoolKey
from processserver.uploader import TokenBucket

KEY = os.urandom(segment.KEY_BYTES)


def batch(disk: str, gen: int, seq: int, size: int = 4096) -> Batch:
    return Batch("acme", disk, gen, seq, 1 << 30, [(seq * 8192, size, DATA)], os.urandom(size))


def item(disk: str, gen: int, seq: int, size: int = 4096) -> Spooled:
    """A batch packed as the connection packs it before spooling."""
    return Spooled.pack(batch(disk, gen, seq, size), KEY, 1)


@pytest.fixture
def spool(tmp_path) -> Spool:
    s = Spool(tmp_path / "spool", limit=1 << 20, quarantine=tmp_path / "quarantine")
    s.recover()
    return s


def claim_all(spool: Spool) -> list[tuple[str, int, int]]:
    out = []
    while (key := spool.claim(0.05)) is not None:
        out.append((key.disk, key.gen, key.seq))
    return out


def test_a_stored_batch_is_its_segment_and_reads_back_whole(spool):
    data = bytes(32 * 1024) + os.urandom(32 * 1024)  # half compresses away
    sent = Batch("acme", "d1", 2, 9, 1 << 30, [(0, len(data), DATA)], data)
    key = spool.store(Spooled.pack(sent, KEY, 1))
    assert spool.path(key).name == "00000002-000000000009.batch"
    data = spool.path(key).read_bytes()
    # The file is what the master target will download: compressed, sealed, checked.
    assert segment.unpack(data, "s", key=KEY) == sent
    assert len(data) < 40 * 1024 and spool.usage() == (len(data), 1)


def test_a_group_is_spooled_together_and_a_failure_leaves_no_partial_file(spool):
    group = [batch("d1", 1, s) for s in (1, 2, 3)]
    spool.store_group([Spooled.pack(b, KEY, 1) for b in group])
    back = [spool.path(SpoolKey.of(b)).read_bytes() for b in group]
    assert [segment.unpack(data, "s", key=KEY) for data in back] == group
    assert spool.usage()[1] == 3

    # The group's last file cannot take its name (a directory is in the way): the call fails,
    # no temporary is left, and nothing of the group is queued for upload.
    spool.path(SpoolKey("acme", "d2", 1, 3)).mkdir(parents=True)
    with pytest.raises(OSError):
        spool.store_group([item("d2", 1, s) for s in (1, 2, 3)])
    assert not [p for p in (spool.root / "acme" / "d2").iterdir() if p.name.startswith(".")]
    assert spool.usage()[1] == 3
    assert claim_all(spool) == [("d1", 1, 1), ("d1", 1, 2), ("d1", 1, 3)]


def test_the_longest_waiting_disk_goes_first_in_sequence_order(spool):
    # a's seq 3 came first (its 1 and 2 were resent later); b waited next; then a's gen 2.
    for disk, gen, seq in [("a", 1, 3), ("b", 1, 1), ("a", 2, 1), ("a", 1, 1), ("a", 1, 2)]:
        spool.store(item(disk, gen, seq))
    assert claim_all(spool) == [("a", 1, 1), ("a", 1, 2), ("a", 1, 3), ("b", 1, 1), ("a", 2, 1)]


def test_a_batch_is_never_handed_to_two_uploaders(spool):
    spool.store(item("a", 1, 1))
    got = []
    threads = [threading.Thread(target=lambda: got.append(spool.claim(0.3))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [key for key in got if key] == [SpoolKey("acme", "a", 1, 1)]


def test_a_resend_during_upload_is_uploaded_again_not_deleted(spool):
    key = spool.store(item("a", 1, 1))
    assert spool.claim(0.1) == key
    spool.store(item("a", 1, 1))  # the agent reconnected and resent it, and was acked
    spool.finish(key)
    assert spool.path(key).exists(), "an acknowledged file was deleted unseen"
    assert spool.claim(0.1) == key
    spool.finish(key)
    assert not spool.path(key).exists()
    assert spool.usage() == (0, 0)


def test_a_batch_claimed_soon_after_its_write_is_uploaded_from_memory(tmp_path):
    # Held: the batch comes back as written, even though its file is then damaged (the
    # uploader does not read it back); beyond the memory budget the file is read.
    spool = Spool(tmp_path / "spool", limit=1 << 20, quarantine=tmp_path / "q", held=6000)
    spool.recover()
    first, second = item("a", 1, 1), item("a", 1, 2)
    spool.store_group([first, second])
    for b in (first, second):
        spool.path(b.key).write_bytes(b"\0\0\0\x05{bad}")
    assert spool.load(spool.claim(0.1)) == first
    with pytest.raises(ValueError):
        spool.load(spool.claim(0.1))  # over the budget: read from its (damaged) file


def test_a_resend_after_a_claim_is_uploaded_as_resent_and_memory_is_released(spool):
    key = spool.store(item("a", 1, 1))
    assert spool.claim(0.1) == key
    assert spool.load(key).key.seq == 1
    resent = item("a", 1, 1)
    spool.store(resent)
    spool.finish(key)
    assert spool.claim(0.1) == key
    assert spool.load(key) == resent
    spool.finish(key)
    spool.store(item("a", 1, 2))
    spool.finish(spool.claim(0.1))  # finished without being read: its memory goes too
    assert spool.usage() == (0, 0) and not spool._held and spool._held_bytes == 0


def test_a_released_batch_stays_spooled_and_comes_back(spool):
    key = spool.store(item("a", 1, 1))
    assert spool.claim(0.1) == key
    spool.release(key)
    assert spool.path(key).exists()
    assert spool.claim(0.1) == key


def test_a_restart_finds_the_spool_and_drops_unfinished_writes(spool, tmp_path):
    for seq in (1, 2, 3):
        spool.store(item("a", 1, seq))
    tmp = spool.root / "acme" / "a" / ".00000001-000000000004.batch.tmp99"
    tmp.write_bytes(b"torn")
    again = Spool(spool.root, limit=1 << 20, quarantine=tmp_path / "quarantine")
    assert again.recover() == 3
    assert not tmp.exists()
    assert again.usage() == spool.usage()
    assert claim_all(again) == [("a", 1, 1), ("a", 1, 2), ("a", 1, 3)]


def test_a_file_read_back_is_checked_and_one_of_an_earlier_version_is_still_taken(tmp_path):
    spool = Spool(tmp_path / "spool", limit=1 << 20, quarantine=tmp_path / "q", held=0)
    spool.recover()
    written = item("a", 1, 1)
    spool.store(written)
    spool.store(item("a", 1, 2))
    spool.store(item("a", 1, 3))
    # An earlier version spooled raw batches in the same place; a restart takes them as they are.
    legacy = batch("a", 1, 4)
    spool.path(SpoolKey.of(legacy)).write_bytes(legacy_spool_file(legacy))
    # One file's segment lost a byte's worth of bits; another holds a different batch's segment.
    damaged = bytearray(spool.path(SpoolKey("acme", "a", 1, 2)).read_bytes())
    damaged[100] ^= 0x40
    spool.path(SpoolKey("acme", "a", 1, 2)).write_bytes(damaged)
    spool.path(SpoolKey("acme", "a", 1, 3)).write_bytes(item("a", 1, 9).data)

    again = Spool(spool.root, limit=1 << 20, quarantine=tmp_path / "q")
    assert again.recover() == 4
    keys = [again.claim(0.1) for _ in range(4)]
    assert again.load(keys[0]) == written  # from its file, checksum checked
    with pytest.raises(ValueError, match="checksum mismatch"):
        again.load(keys[1])
    with pytest.raises(ValueError, match="holds a segment of"):
        again.load(keys[2])
    assert again.load(keys[3]) == legacy  # raw: the uploader packs it


def test_room_comes_back_when_uploads_finish(tmp_path):
    spool = Spool(tmp_path / "spool", limit=6000, quarantine=tmp_path / "q")
    spool.recover()
    spool.store(item("a", 1, 1))
    assert not spool.over_limit()
    spool.store(item("a", 1, 2))
    assert spool.over_limit()
    assert not spool.wait_for_room(0.05)
    key = spool.claim(0.1)
    threading.Timer(0.1, spool.finish, args=(key,)).start()
    assert spool.wait_for_room(5)


def test_the_bandwidth_limit_holds_however_many_threads_upload():
    rate = 200_000
    bucket = TokenBucket(rate)  # one second of burst
    stop = threading.Event()
    start = time.monotonic()
    threads = [threading.Thread(target=bucket.take, args=(100_000, stop)) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 500 kB at 200 kB/s with a 200 kB burst cannot take less than 1.5 s.
    assert time.monotonic() - start >= (500_000 - rate) / rate - 0.05
