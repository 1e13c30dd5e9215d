"""The order of a pass's reads and sends (agent.replicator.Replicator._ship_pass).

A write queued on a block the pass has not read yet makes the pass collide: it
ends without a tag (docs/design.md, "Which pass a write belongs to").  Once a
disk replicates, a pass therefore reads every block before it sends, or waits
on the process server's window, up to a budget; while the disk syncs it sends
as it reads, and an orderly stop gives back every block it has not sent.

The disk is a real file read through ferry.blockio; the tracker and the
shipper record what the pass asks of them, in order.  The last test is of
the loop around the passes: it takes an answer from the process server when
the answer arrives, not at its next look.
"""

from __future__ import annotations

import os
import queue
import threading
import time

import pytest
from pyroaring import BitMap

from agent.disks import identity
from agent.replicator import DiskState, Replicator
from agent.settings import DiskSettings, Settings
from agent.tracker import DiskTrack, Tracker
from ferry.batch import Batch

MiB = 1 << 20
BLOCK = 4096


class RecordingTracker(Tracker):
    def __init__(self, disks: list[DiskTrack], events: list[tuple[str, int]]) -> None:
        super().__init__(disks)
        self.events = events

    def chunk_read(self, disk: str, end_block: int) -> None:
        self.events.append(("read", end_block))


class RecordingShipper:
    def __init__(self, events: list[tuple[str, int]], stop_after: int | None = None) -> None:
        self.events = events
        self.batches: list[Batch] = []
        self.stop_after = stop_after
        self.stop: threading.Event | None = None
        self.inbox: queue.Queue[dict] = queue.Queue()
        self.on_inbox = lambda: None
        self.requests: list[str] = []

    def request_resync(self, disk: str, request_id: str, block_size: int) -> None:
        self.requests.append(request_id)

    def answer(self, event: dict) -> None:
        """An event from the process server, as the shipper's reader thread hands it on."""
        self.inbox.put(event)
        self.on_inbox()

    def send_batch(self, batch: Batch, stop: threading.Event | None = None) -> bool:
        self.events.append(("send", batch.seq))
        self.batches.append(batch)
        if self.stop_after is not None and len(self.batches) >= self.stop_after and stop:
            stop.set()  # an orderly stop arrives while the pass waits on the window
        return True


@pytest.fixture
def pass_on(tmp_path):
    def make(phase: str, window: int = 8, stop_after: int | None = None, **more):
        size = 64 * MiB
        image = tmp_path / "disk.img"
        image.write_bytes(os.urandom(size))
        settings = Settings(
            tenant="t1", machine="web01", process_server="127.0.0.1:1", ca="", cert="",
            key="", state_dir=str(tmp_path / "state"),
            disks=[DiskSettings("web01-disk0", str(image))],
            block_size=BLOCK, batch_bytes=1 * MiB, sync_batch_bytes=4 * MiB, window=window,
            **more,
        )  # fmt: skip
        track = DiskTrack("web01-disk0", str(image), size, BLOCK)
        events: list[tuple[str, int]] = []
        tracker = RecordingTracker([track], events)
        shipper = RecordingShipper(events, stop_after)
        disk = DiskState(track=track, mountpoint=None, gen=1, phase=phase)
        replicator = Replicator(settings, tracker, shipper, [disk])  # type: ignore[arg-type]
        return replicator, disk, tracker, shipper, events

    return make


def scattered(n: int, every: int = 3) -> BitMap:
    """``n`` single blocks with gaps between them: one read per block."""
    return BitMap(range(0, n * every, every))


def test_a_replicating_pass_reads_all_its_blocks_before_it_sends(pass_on):
    replicator, disk, _, shipper, events = pass_on("replicating")
    blocks = scattered(1000)  # 3.9 MiB: three full batches and the pass's last
    last = replicator._ship_pass(disk, blocks)
    kinds = [kind for kind, _ in events]
    assert kinds.count("send") == 3, kinds
    reads = [i for i, kind in enumerate(kinds) if kind == "read"]
    assert events[reads[-1]][1] == blocks.max() + 1, "the pass did not read to its last block"
    assert kinds.index("send") > reads[-1], "a send came before the pass's last read"
    assert [b.seq for b in shipper.batches] == [1, 2, 3], "full batches go in their order"
    assert last is not None and last.seq == 0, "the pass's last batch waits for its tag"
    shipped = sorted(o // BLOCK for b in [*shipper.batches, last] for o, _, _ in b.extents)
    assert shipped == list(blocks), "every block of the pass is in one batch, once"


def test_a_pass_larger_than_the_budget_sends_its_oldest_batches_as_it_reads(pass_on):
    replicator, disk, _, shipper, events = pass_on("replicating", window=2)
    blocks = scattered(2000)  # 7.8 MiB against a budget of 2 x 1 MiB
    replicator._ship_pass(disk, blocks)
    sends = [i for i, (kind, _) in enumerate(events) if kind == "send"]
    assert len(sends) == 7
    assert sends[0] < len(blocks), "held back more than the window's worth of batches"
    assert [b.seq for b in shipper.batches] == list(range(1, 8))


def test_a_syncing_pass_sends_as_it_reads(pass_on):
    replicator, disk, _, shipper, events = pass_on("initial-sync")
    blocks = BitMap(range(0, (64 * MiB) // BLOCK))
    replicator._ship_pass(disk, blocks)
    kinds = [kind for kind, _ in events]
    assert kinds.index("send") <= 2, "a sync holds no batches back"
    assert len(shipper.batches) >= 15


def test_an_orderly_stop_gives_back_the_blocks_it_read_but_did_not_send(pass_on):
    replicator, disk, tracker, shipper, _ = pass_on("replicating", window=2, stop_after=1)
    blocks = scattered(2000)
    assert replicator._ship_pass(disk, blocks) is None
    sent = BitMap(o // BLOCK for b in shipper.batches for o, _, _ in b.extents)
    dirty = tracker.disks[disk.id].dirty
    assert sent and not (sent & dirty), "a block sent is dirty again"
    assert blocks - sent <= dirty, "a block read and held back was not given back"


def _disk_bytes(replicator, disk, batch: Batch) -> bytes:
    """What the disk holds at ``batch``'s data extents, read back from the image."""
    with open(disk.track.device, "rb") as f:
        out = b""
        for offset, length, kind in batch.extents:
            if kind == "d":
                f.seek(offset)
                out += f.read(length)
    return out


def test_a_syncing_pass_ships_the_disks_bytes_though_every_batch_is_still_held(pass_on):
    # A sync sends long runs as views of the buffers they were read into, not copies;
    # the shipper keeps every batch until the process server acknowledges it (this one
    # never does), so a buffer still viewed must never take another read, and the
    # reader may hold no more than a window's worth of reads before it copies again.
    replicator, disk, _, shipper, _ = pass_on("initial-sync", window=3)
    with open(disk.track.device, "r+b") as f:  # zeros between runs of data, as on a disk
        for at in range(0, 64 * MiB, 5 * MiB):
            f.seek(at)
            f.write(bytes(700 * 1024))
    last = replicator._ship_pass(disk, BitMap(range(0, (64 * MiB) // BLOCK)))
    held = [*shipper.batches, last]
    assert len(held) >= 15
    for batch in held:
        assert batch is not None
        assert bytes(batch.payload) == _disk_bytes(replicator, disk, batch), (
            f"batch {batch.seq} does not hold what the disk holds at its extents"
        )
    kept = [p for b in held for p in b.payload.parts if isinstance(p, memoryview)]
    assert kept, "no run went out as a view of its read"
    assert replicator._buffers[disk.id].buffers <= 3 + 2, "the reader held more reads than a window"


def test_a_read_the_shipper_let_go_of_is_read_into_again(pass_on):
    replicator, disk, _, shipper, _ = pass_on("initial-sync", window=2)

    class Acking(type(shipper)):
        def send_batch(self, batch, stop=None):
            super().send_batch(batch, stop)
            self.batches = self.batches[-2:]  # the process server acknowledged the older
            return True

    replicator.shipper = Acking([])
    last = replicator._ship_pass(disk, BitMap(range(0, (64 * MiB) // BLOCK)))
    for batch in [*replicator.shipper.batches, last]:
        assert bytes(batch.payload) == _disk_bytes(replicator, disk, batch)
    assert replicator._buffers[disk.id].buffers <= 2 + 2, "a buffer no longer viewed was not reused"


def _until(condition, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_resync_answer_is_taken_when_it_arrives_not_at_the_next_look(pass_on):
    # The loop looked at its inbox once per pass interval, so an initial sync began up
    # to 0.25 s after the master target's answer reached the agent.  With an interval
    # of a minute, the answer is still taken at once, and a stop still ends the loop.
    replicator, disk, _, shipper, _ = pass_on("resync-wait", pass_interval=60.0)
    disk.gen = None
    disk.identity = identity(disk.track.device)
    replicator.paused.set()  # the answer is taken all the same; no pass runs after it
    loop = threading.Thread(target=replicator.run, daemon=True)
    loop.start()
    try:
        _until(lambda: shipper.requests, "the agent to ask for a generation")
        shipper.answer({
            "type": "resync-answer", "disk": disk.id, "request_id": shipper.requests[-1],
            "gen": 7, "block_size": BLOCK, "target_size": disk.track.size, "empty": True,
            "digests": b"",
        })  # fmt: skip
        _until(lambda: disk.gen == 7, "the generation to start before the next look")
        assert disk.phase == "initial-sync"
    finally:
        replicator.halt()
        loop.join(10)
    assert not loop.is_alive(), "the loop did not stop within 10 s"
