"""The block-layer tracker on a real loop device with a real tracefs instance."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from agent.tracker import DiskTrack, ScanTracker, TraceTracker
from ferry.blockio import DirectReader

pytestmark = [pytest.mark.root, pytest.mark.tracefs]

BLOCK = 4096


def make_tracker(device: str, size: int, buffer_kb: int = 4096) -> TraceTracker:
    track = DiskTrack("d0", device, size, BLOCK)
    tracker = TraceTracker([track], "/sys/kernel/tracing", f"ferry-test-{os.getpid()}", buffer_kb)
    tracker.start()
    return tracker


def dirty_blocks(tracker: TraceTracker) -> set[int]:
    tracker.sync()
    with tracker.lock:
        return set(tracker.disks["d0"].dirty)


def dd_direct(device: str, offset: int, data: bytes) -> None:
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
    try:
        import mmap

        buf = mmap.mmap(-1, len(data))
        buf.write(data)
        os.pwritev(fd, [buf], offset)
    finally:
        os.close(fd)


@pytest.fixture
def raw_disk(loopdisk):
    return loopdisk(64 << 20, fs=False)


def test_odirect_writes_are_marked_on_completion(raw_disk):
    tracker = make_tracker(raw_disk.device, 64 << 20)
    try:
        assert dirty_blocks(tracker) == set()
        dd_direct(raw_disk.device, 10 * BLOCK, os.urandom(3 * BLOCK))
        dd_direct(raw_disk.device, 1000 * BLOCK, os.urandom(BLOCK))
        assert dirty_blocks(tracker) == {10, 11, 12, 1000}
    finally:
        tracker.close()
    assert not tracker.instance.path.exists(), "the private trace instance must be removed"


def test_reads_are_not_marked(raw_disk):
    tracker = make_tracker(raw_disk.device, 64 << 20)
    try:
        reader = DirectReader(raw_disk.device, 1 << 20)
        reader.read(0, 1 << 20)
        reader.close()
        with open(raw_disk.device, "rb") as f:
            f.read(1 << 20)
        assert dirty_blocks(tracker) == set()
    finally:
        tracker.close()


def test_discard_and_write_zeroes_are_marked(raw_disk):
    tracker = make_tracker(raw_disk.device, 64 << 20)
    try:
        subprocess.run(
            ["blkdiscard", "-o", str(256 * BLOCK), "-l", str(16 * BLOCK), raw_disk.device],
            check=True,
        )
        subprocess.run(
            ["blkdiscard", "-z", "-o", str(512 * BLOCK), "-l", str(8 * BLOCK), raw_disk.device],
            check=True,
        )
        dirty = dirty_blocks(tracker)
        assert set(range(256, 272)) <= dirty
        assert set(range(512, 520)) <= dirty
    finally:
        tracker.close()


def test_buffered_filesystem_writes_are_marked_after_sync(loopdisk):
    disk = loopdisk(128 << 20, fs=True)
    tracker = make_tracker(disk.device, 128 << 20)
    try:
        dirty_blocks(tracker)
        with tracker.lock:
            tracker.disks["d0"].dirty.clear()
        path = disk.mountpoint / "file.bin"
        path.write_bytes(os.urandom(1 << 20))
        os.sync()
        dirty = dirty_blocks(tracker)
        # The file's data blocks (256 of them) plus journal/metadata blocks.
        assert len(dirty) >= 256
        # Every block that differs from a pristine copy taken before would be in
        # the set: check the file's own extents through FIEMAP-free means:
        # read it back raw and find its content on the device.
        data = path.read_bytes()
        reader = DirectReader(disk.device, 128 << 20)
        raw = bytes(reader.read(0, 128 << 20))
        reader.close()
        where = raw.find(data[:BLOCK])
        assert where >= 0 and where % BLOCK == 0
        assert set(range(where // BLOCK, where // BLOCK + 256)) <= dirty
    finally:
        tracker.close()


def test_a_write_queued_during_a_pass_over_its_block_is_a_collision(raw_disk):
    tracker = make_tracker(raw_disk.device, 64 << 20)
    try:
        dd_direct(raw_disk.device, 0, os.urandom(4 * BLOCK))
        taken = tracker.begin_pass(["d0"])
        assert set(taken["d0"]) == {0, 1, 2, 3}
        dd_direct(raw_disk.device, 2 * BLOCK, os.urandom(BLOCK))  # before the read: collision
        tracker.chunk_read("d0", 4)
        assert tracker.end_pass() is False

        taken = tracker.begin_pass(["d0"])
        assert set(taken["d0"]) == {2}
        tracker.chunk_read("d0", 3)
        time.sleep(0.01)
        dd_direct(raw_disk.device, 2 * BLOCK, os.urandom(BLOCK))  # after the read: still clean
        dd_direct(raw_disk.device, 100 * BLOCK, os.urandom(BLOCK))  # a block not in the pass
        assert tracker.end_pass() is True
        assert dirty_blocks(tracker) == {2, 100}
    finally:
        tracker.close()


@pytest.mark.parametrize("block", [8, 2])
def test_a_write_completed_between_t0_and_the_pass_taking_its_set_waits_for_the_next(
    raw_disk, block
):
    """Such a write is after t0: it is never in the pass's set, and collides only if it
    overwrote a block the pass still had to read (block 2), not one outside it (block 8)."""
    tracker = make_tracker(raw_disk.device, 64 << 20)
    read_t0 = tracker.sync

    def t0_then_a_write(timeout: float = 10.0) -> float:
        t0 = read_t0(timeout)
        dd_direct(raw_disk.device, block * BLOCK, os.urandom(BLOCK))
        read_t0(timeout)  # the reader has consumed the write's events
        return t0

    try:
        dd_direct(raw_disk.device, 0, os.urandom(4 * BLOCK))
        tracker.sync = t0_then_a_write  # type: ignore[method-assign]
        taken = tracker.begin_pass(["d0"])
        tracker.sync = read_t0  # type: ignore[method-assign]
        assert set(taken["d0"]) == {0, 1, 2, 3}
        tracker.chunk_read("d0", 4)
        assert tracker.end_pass() is (block == 8)
        assert dirty_blocks(tracker) == {block}
    finally:
        tracker.close()


def test_lost_events_are_detected(raw_disk):
    tracker = make_tracker(raw_disk.device, 64 << 20, buffer_kb=4)
    try:
        assert tracker.lost() is False
        # Hold the tracker's lock: its reader stalls inside a callback, the
        # tiny ring buffer fills and the kernel drops events.
        with tracker.lock:
            fd = os.open(raw_disk.device, os.O_WRONLY | os.O_DIRECT)
            import mmap

            buf = mmap.mmap(-1, BLOCK)
            for i in range(3000):
                os.pwritev(fd, [buf], (i % 4096) * BLOCK)
            os.close(fd)
        assert tracker.lost() is True
        assert tracker.lost() is False, "each loss is reported once"
    finally:
        tracker.close()


def test_scan_tracker_finds_changes_in_an_image_file(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 << 20))
    track = DiskTrack("d0", str(image), 1 << 20, BLOCK)
    tracker = ScanTracker([track])
    first = tracker.begin_pass(["d0"])
    assert len(first["d0"]) == 256  # nothing known yet: everything
    assert tracker.end_pass() is True
    with open(image, "r+b") as f:
        f.seek(7 * BLOCK + 5)
        f.write(b"changed")
    taken = tracker.begin_pass(["d0"])
    assert set(taken["d0"]) == {7}
    with open(image, "r+b") as f:  # a change while the pass runs: no tag
        f.seek(9 * BLOCK)
        f.write(b"x")
    assert tracker.end_pass() is False
    assert set(tracker.begin_pass(["d0"])["d0"]) == {9}
    assert tracker.end_pass() is True


def test_a_trickle_of_writes_is_read_in_gathered_chunks_and_a_marker_ends_the_wait(
    raw_disk, monkeypatch
):
    """Under a steady trickle of writes the reader lets events gather (a wake-up per
    event cost the agent more CPU than the events): it reads trace_pipe a few times per
    IDLE_WAIT at most, not once per write, and every write is still marked dirty."""
    from agent import tracefs

    tracker = make_tracker(raw_disk.device, 64 << 20)
    reads = []
    real_read = os.read

    def counting_read(fd: int, n: int) -> bytes:
        if fd == tracker.instance._fd:
            reads.append(n)
        return real_read(fd, n)

    monkeypatch.setattr(tracefs.os, "read", counting_read)
    try:
        dirty_blocks(tracker)
        reads.clear()
        writes = 200
        started = time.monotonic()
        for i in range(writes):
            dd_direct(raw_disk.device, (2 * i) * BLOCK, os.urandom(BLOCK))
            time.sleep(0.002)
        elapsed = time.monotonic() - started
        assert dirty_blocks(tracker) == {2 * i for i in range(writes)}
        # One read per IDLE_WAIT, and a few more for the marker of the sync just made.
        assert len(reads) <= elapsed / tracefs.IDLE_WAIT + 4, (
            f"{len(reads)} reads of trace_pipe in {elapsed:.2f} s for {writes} writes"
        )
    finally:
        tracker.close()


def test_a_backlog_is_read_on_without_waiting(raw_disk, monkeypatch):
    """When the pipe holds more than one read gives, the reader reads on at once: waiting
    after every read capped it at a few hundred KB of events a second, and at 50 MB/s of
    writes it fell behind and passes slowed to seconds."""
    tracker = make_tracker(raw_disk.device, 64 << 20)
    instance = tracker.instance
    waits = []
    real_wait = instance._wake.wait

    def counting_wait(timeout: float | None = None) -> bool:
        waits.append(timeout)
        return real_wait(timeout)

    monkeypatch.setattr(instance._wake, "wait", counting_wait)
    try:
        dirty_blocks(tracker)
        # 20,000 marker lines the parser ignores (about 1.3 MB), written faster than a
        # reader that waits after every read drains them (it waited ~200 times after).
        fd = os.open(instance.path / "trace_marker", os.O_WRONLY)
        try:
            for i in range(20000):
                os.write(fd, b"backlog %d" % i)
        finally:
            os.close(fd)
        waits.clear()
        dd_direct(raw_disk.device, 7 * BLOCK, os.urandom(BLOCK))
        assert dirty_blocks(tracker) == {7}
        assert len(waits) < 20, f"the reader waited {len(waits)} times draining the backlog"
    finally:
        tracker.close()
