"""The agent's read passes: resync, initial sync, tags, freezes.

One thread runs :meth:`Replicator.run`.  Each pass spans every replicating
disk of the machine, so a tag is consistent across them.  See
docs/design.md, "Mobility agent", for the rules this code follows.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pyroaring import BitMap

from agent import defaults, state
from agent.disks import filesystems_on, identity
from agent.freeze import Frozen
from agent.schedule import Every
from agent.settings import Settings
from agent.shipper import Shipper
from agent.tracker import DiskTrack, Tracker, mono
from agent.verify import Verifier
from ferry import blockio, memory
from ferry.batch import DATA, ZERO, Batch, Gathered
from ferry.errors import Exit, FerryError

log = logging.getLogger("ferry.agent")

MAX_EXTENTS = 8192
"""Most extents in one batch (keeps frame headers small)."""


@dataclass
class DiskState:
    """What the agent knows of one disk's replication."""

    track: DiskTrack
    mountpoint: str | None
    """A filesystem to freeze besides those found on the disk (the ``mountpoint`` setting)."""
    identity: str = ""
    """The identity recorded at first protection (see agent.disks.identity)."""
    problem: str | None = None
    """Why the disk is not replicated (phase ``identity-mismatch``), for the operator."""
    start_reason: str = "agent start"
    """Why the disk resyncs at this start, or ``resumed`` (see agent.restart)."""
    gen: int | None = None
    next_seq: int = 1
    phase: str = "starting"
    request_id: str | None = None
    target_zero: BitMap = field(default_factory=BitMap)
    last_tag: dict[str, Any] | None = None
    resend: list[Batch] = field(default_factory=list)
    """Batches an orderly stop kept unacknowledged, sent again first at a resumed start."""
    bytes_shipped: int = 0
    bytes_read: int = 0
    pass_remaining: int = 0
    resyncs: int = 0

    @property
    def id(self) -> str:
        """The disk id."""
        return self.track.id


@dataclass
class TagRequest:
    """An operator's request for a tag; ``done`` is set with ``result``.

    With ``pause_after`` the replicator pauses right after a successful tag,
    before any further pass (a drain: nothing is shipped after the tag).
    With ``final`` too the tag is marked ``"final": true``: the master target
    fences the disk once it has applied it (a cutover), so even a batch sent
    by mistake afterwards is never applied.
    """

    kind: str
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] | None = None
    error: str | None = None
    pause_after: bool = False
    final: bool = False


def resync_block(configured: int, disk_size: int) -> int:
    """The resync block for a disk: ``configured``, doubled until the disk's digest map
    (16 bytes per block) fits ``DIGEST_MAP_MAX``, at most ``RESYNC_BLOCK_MAX``.

    A 1 TiB disk compares 256 KiB blocks (a 64 MiB map) instead of 64 KiB
    ones (256 MiB, more than one frame may carry).
    """
    block = configured
    while (
        -(-disk_size // block) * blockio.DIGEST_BYTES > defaults.DIGEST_MAP_MAX
        and block * 2 <= defaults.RESYNC_BLOCK_MAX
    ):
        block *= 2
    return block


class TagFailed(FerryError):
    """no tag: {problem}"""

    exit_code = Exit.NO_TAG


class HookFailed(TagFailed):
    """the {which}-freeze hook failed ({problem}); no app-consistent tag"""


def run_hook(command: str, which: str, timeout: float) -> None:
    """Run an app-consistency hook through the shell; HookFailed if it fails or overruns."""
    try:
        result = subprocess.run(
            command, shell=True, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise HookFailed(which=which, problem=f"still running after {timeout:g} s")
    except OSError as exc:
        raise HookFailed(which=which, problem=str(exc))
    if result.returncode != 0:
        stderr = result.stderr.strip().splitlines()
        last = stderr[-1][:200] if stderr else "no output on stderr"
        raise HookFailed(which=which, problem=f"exit status {result.returncode}: {last}")


class Replicator:
    """Runs resyncs and read passes and hands batches to the shipper."""

    def __init__(
        self, settings: Settings, tracker: Tracker, shipper: Shipper, disks: list[DiskState]
    ):
        self.settings = settings
        self.tracker = tracker
        self.shipper = shipper
        self.disks = {d.id: d for d in disks}
        self.stop = threading.Event()
        """Set (through :meth:`halt`): the loop ends at the next pass boundary."""
        self.wake = threading.Event()
        """Set when the loop should look again before its wait is over: a stop, an event
        from the process server (a resync answer waited 0.25 s for the next look), a tag
        request."""
        shipper.on_inbox = self.wake.set
        self.paused = threading.Event()
        """Set: no passes run (tracking goes on, so nothing is lost); tags are refused."""
        self.tag_requests: queue.Queue[TagRequest] = queue.Queue()
        self._resync_wanted: tuple[str, set[str] | None] | None = None
        self.passes = 0
        self.clean_passes = 0
        self.frozen_passes = 0
        self.longest_freeze = 0.0
        self._thawed_early = False
        self.last_clean = mono()
        self.last_tag_sent = mono()
        self.started = time.time()
        self._reader = blockio.DirectReader
        self._buffers: dict[str, blockio.DirectReader] = {}
        self._buffer_bytes: dict[str, tuple[int, int]] = {}
        # The larger batches of a sync, once over, give their memory back (ferry.memory).
        self.trimmer = memory.AfterBurst(settings.batch_bytes + 1, defaults.TRIM_AFTER)
        # Online verify and scheduled work (agent.verify, agent.schedule).
        self.verifier = Verifier(settings.verify_chunk_bytes)
        self.app_every = Every(settings.app_tag_interval)
        self.verify_every = Every(settings.verify_interval)
        self.scheduled_app_tags = 0

    # -- main loop ------------------------------------------------------------------

    def run(self) -> None:
        """Replicate until ``stop`` is set."""
        for disk in self.disks.values():
            if disk.gen is None:  # not resumed from an orderly stop (agent.restart)
                self._request_resync(disk, disk.start_reason)
        try:
            while not self.stop.is_set():
                self._handle_inbox()
                self._resync_if_wanted()
                request = self._next_tag_request()
                if request is not None:
                    self._serve_tag(request)
                    continue
                if self._scheduled_work():
                    continue
                self.trimmer.maybe()
                if self.paused.is_set() or not self._work_waiting():
                    self._idle(self._interval())
                    continue
                started = mono()
                clean = (
                    self._run_pass(freeze=self._freeze_due(), force=self._idle_tag_due())
                    is not None
                )
                if clean or self.tracker.kind == "scan":
                    # Space passes out; after a collision, try again at once.
                    self._idle(max(0.0, self._interval() - (mono() - started)))
        finally:
            for reader in self._buffers.values():
                reader.close()
            self.verifier.close()

    def halt(self) -> None:
        """Have the loop end at the next pass boundary (it wakes if it waits)."""
        self.stop.set()
        self.wake.set()

    def _idle(self, seconds: float) -> None:
        """Wait ``seconds``, or less if woken (:attr:`wake`)."""
        if self.wake.wait(seconds):
            self.wake.clear()

    def _interval(self) -> float:
        if self.tracker.kind == "scan":
            return max(self.settings.pass_interval, 2.0)
        return self.settings.pass_interval

    def _replicating(self) -> list[DiskState]:
        return [d for d in self.disks.values() if d.gen is not None]

    def _idle_tag_due(self) -> bool:
        return mono() - self.last_tag_sent > self.settings.idle_tag_interval

    def _work_waiting(self) -> bool:
        disks = self._replicating()
        if not disks:
            return False
        if self._idle_tag_due() or self.verifier.busy():
            return True
        if self.tracker.kind == "scan":
            return True  # only a scan can tell whether anything changed
        return any(self.tracker.dirty_count(d.id) for d in disks)

    def _freeze_due(self) -> bool:
        # Never while a disk is in its first sync or a resync: that pass reads the whole
        # disk (minutes), far beyond what a freeze may last (its watchdog).
        states = self._replicating()
        if any(d.phase in ("initial-sync", "resync") for d in states):
            return False
        return mono() - self.last_clean > self.settings.freeze_after and bool(
            self._filesystems(states)
        )

    def _filesystems(self, states: list[DiskState]) -> list[str]:
        """Mount points of every filesystem on ``states``' disks, their partitions and volumes.

        Looked up at each freeze: filesystems come and go while the agent runs.
        """
        found = filesystems_on([d.track.device for d in states])
        points = [m.mountpoint for m in found]
        numbers = {_fs_number(p) for p in points}
        for d in states:  # an extra mount point from the settings, unless already covered
            if d.mountpoint and _fs_number(d.mountpoint) not in numbers:
                points.append(d.mountpoint)
                numbers.add(_fs_number(d.mountpoint))
        return points

    def _next_tag_request(self) -> TagRequest | None:
        if not self._replicating() and not self.paused.is_set():
            return None
        try:
            return self.tag_requests.get_nowait()
        except queue.Empty:
            return None

    # -- requests from other threads ------------------------------------------------

    def request_resync(
        self, reason: str = "requested by the operator", disks: list[str] | None = None
    ) -> None:
        """Start a new generation of ``disks`` (all if None), done by the replicator thread."""
        self._resync_wanted = (reason, None if disks is None else set(disks))

    def _resync_if_wanted(self) -> None:
        wanted, self._resync_wanted = self._resync_wanted, None
        if wanted is not None:
            reason, disks = wanted
            for disk in self.disks.values():
                if disks is None or disk.id in disks:
                    self._request_resync(disk, reason)

    def tag(
        self, kind: str, timeout: float, pause_after: bool = False, final: bool = False
    ) -> dict[str, Any]:
        """Take a tag and wait until it is durable at the process server; TagFailed if not.

        With ``pause_after`` passes stop right after the tag; ``final`` marks
        it the disks' last (a cutover; implies ``pause_after``; see TagRequest).
        """
        if kind not in ("crash", "app"):
            raise TagFailed(problem=f"tag kind must be crash or app, not {kind!r}")
        request = TagRequest(kind, pause_after=pause_after or final, final=final)
        self.tag_requests.put(request)
        self.wake.set()
        deadline = time.monotonic() + timeout
        while not request.done.wait(0.2):
            if self.stop.is_set():
                raise TagFailed(problem="the agent is stopping")
            if time.monotonic() > deadline:
                raise TagFailed(problem=f"none within {timeout:.0f} s")
        tag = request.result
        if request.error or tag is None:
            raise TagFailed(problem=request.error or "no tag was taken")
        deadline = time.monotonic() + max(1.0, timeout)  # the acks get a timeout of their own
        for disk in tag["disks"]:
            state = self.disks[disk]
            seq = state.last_tag["seq"] if state.last_tag else 0
            left = max(1.0, deadline - time.monotonic())
            if not self.shipper.wait_acked(disk, state.gen, seq, left):
                raise TagFailed(problem=f"tag {tag['id']} not acknowledged for {disk}")
        return tag

    # -- scheduled work and online verify (agent.schedule, agent.verify) ---------------

    def _scheduled_work(self) -> bool:
        """Take a scheduled app-consistent tag or start a scheduled verify; True if it did."""
        disks = self._replicating()
        if self.paused.is_set() or not disks:
            return False
        # Only on tags (an initial sync or resync would be read under the freeze), and
        # after a pass without freeze, so the frozen one ships only the last moments.
        if self.app_every.due() and all(d.phase == "replicating" for d in disks):
            self.app_every.done()
            try:
                self._run_pass()
                tag = self._tag_now("app")
            except Exception as exc:  # a failed hook: logged, tried again next interval
                log.error("scheduled app-consistent tag failed: %s", exc)
                return True
            if tag is None:
                log.warning("scheduled app-consistent tag: no clean pass; next interval")
            else:
                self.scheduled_app_tags += 1
                log.info("scheduled app-consistent tag %s", tag["id"])
            return True
        if self.verify_every.due():
            self.verify_every.done()
            try:
                self.start_verify(scheduled=True)
            except TagFailed as exc:  # no disk on its tags yet: the next interval tries again
                log.warning("scheduled verify not started: %s", exc.fields.get("problem"))
        return False

    def start_verify(
        self, disks: list[str] | None = None, repair: bool = False, scheduled: bool = False,
        verify_id: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Start an online verify of ``disks`` (every replicating disk if None); its id and disks.

        Only a disk on its generation's tags (phase ``replicating``) can be verified:
        in an initial sync or a resync the target is no recovery point yet.
        """
        wanted = [d for d in self.disks.values() if disks is None or d.id in disks]
        ready = [d for d in wanted if d.gen is not None and d.phase == "replicating"]
        if not ready:
            raise TagFailed(problem="no disk to verify is replicating on its tags yet")
        verify_id = self.verifier.start(
            [(d.id, d.track.device, d.track.size, d.track.block) for d in ready],
            repair=repair, scheduled=scheduled, verify_id=verify_id,
        )  # fmt: skip
        return {"verify_id": verify_id, "disks": sorted(d.id for d in ready)}

    def repair_blocks(self, disk: str, blocks: list[list[int]]) -> int:
        """Ship ``[first, count]`` runs of ``disk``'s blocks again (a verify found them
        differing); the resync's own step: mark them dirty, the next pass reads and ships
        them.  Returns how many blocks."""
        state = self.disks.get(disk)
        if state is None or state.gen is None:
            raise TagFailed(problem=f"disk {disk} is not replicating here")
        problem = self._identity_problem(state)
        if problem:
            raise TagFailed(problem=problem)
        count = 0
        for first, n in blocks:
            self.tracker.mark_dirty(disk, int(first), int(first) + int(n))
            count += int(n)
        log.info("disk %s: %d block(s) marked for repair", disk, count)
        return count

    # -- resync -----------------------------------------------------------------------

    def _identity_problem(self, disk: DiskState) -> str | None:
        """Why ``disk``'s device is not the disk first protected now (None if it is)."""
        device = disk.track.device
        try:
            reader = blockio.DirectReader(device, blockio.ALIGN)
            size = reader.size
            reader.close()
            found = identity(device)
        except (OSError, FerryError) as exc:
            return f"{device} cannot be opened: {exc}"
        return state.mismatch(disk.identity, disk.track.size, device, found, size)

    def _refuse(self, disk: DiskState, problem: str) -> None:
        """Stop replicating ``disk``: its device is another disk (or gone)."""
        if disk.gen is not None:
            self.shipper.forget_disk(disk.id)
        self.verifier.cancel(disk.id)
        disk.gen, disk.request_id = None, None
        if disk.problem != problem:
            log.error("disk %s: refused: %s; nothing is read or shipped for it", disk.id, problem)
        disk.phase, disk.problem = "identity-mismatch", problem

    def _request_resync(self, disk: DiskState, reason: str) -> None:
        # Before every resync: a resync reads the whole device and may
        # overwrite the whole target, so it must be the disk first protected.
        problem = self._identity_problem(disk)
        if problem:
            self._refuse(disk, problem)
            return
        disk.problem = None
        if disk.gen is not None:
            self.shipper.forget_disk(disk.id)
        self.verifier.cancel(disk.id)
        disk.gen = None
        disk.request_id = uuid.uuid4().hex
        disk.phase = "resync-wait"
        disk.resyncs += 1
        log.info("disk %s: asking for a new generation (%s)", disk.id, reason)
        block = resync_block(self.settings.resync_block_size, disk.track.size)
        if block != self.settings.resync_block_size:
            log.info("disk %s: comparing %d KiB blocks, so its digest map stays within %d MiB",
                     disk.id, block >> 10, defaults.DIGEST_MAP_MAX >> 20)  # fmt: skip
        self.shipper.request_resync(disk.id, disk.request_id, block)

    def _handle_inbox(self) -> None:
        while True:
            try:
                event = self.shipper.inbox.get_nowait()
            except queue.Empty:
                return
            disk = self.disks.get(event.get("disk", ""))
            if disk is None:
                continue
            if event["type"] == "resync-answer" and event.get("request_id") == disk.request_id:
                self._start_generation(disk, event)
            elif event["type"] == "resync-required" and event.get("gen") == disk.gen:
                self._request_resync(
                    disk, f"master target: {event.get('reason') or 'resync required'}"
                )

    def _start_generation(self, disk: DiskState, answer: dict[str, Any]) -> None:
        track = disk.track
        block = int(answer["block_size"])
        per = block // track.block
        if answer.get("empty"):
            disk.target_zero = BitMap()
            disk.target_zero.add_range(0, track.blocks)
            self.tracker.mark_dirty(disk.id, 0, track.blocks)
            disk.phase = "initial-sync"
        else:
            differ, zero = self._compare(disk, answer["digests"], block)
            disk.target_zero = _expand(zero, per, track.blocks)
            for first in differ:
                self.tracker.mark_dirty(disk.id, int(first) * per, (int(first) + 1) * per)
            disk.phase = "resync"
            log.info(
                "disk %s: %d of %d blocks differ from the target",
                disk.id,
                len(differ),
                -(-track.size // block),
            )
        disk.gen = int(answer["gen"])
        disk.next_seq = 1
        disk.request_id = None
        log.info("disk %s: generation %d started (%s)", disk.id, disk.gen, disk.phase)

    def _compare(self, disk: DiskState, target: bytes, block: int) -> tuple[list[int], list[int]]:
        """Blocks (of ``block`` bytes) that differ from the target, and the target's zero blocks."""
        mine, _ = blockio.digest_map(disk.track.device, block)
        size = blockio.DIGEST_BYTES
        ours, n = len(mine) // size, min(len(mine), len(target)) // size
        differ = _differing(mine, target, n)
        zero = blockio.zero_digest(block)
        target_zero = [i for i in range(n) if target[i * size : (i + 1) * size] == zero]
        beyond = list(range(n, ours))  # the target is shorter: those blocks read as zeros there
        return differ + beyond, target_zero + beyond

    # -- passes -------------------------------------------------------------------------

    def _run_pass(
        self, freeze: bool = False, kind: str = "crash", force: bool = False, final: bool = False
    ) -> dict[str, Any] | None:
        """One read pass over every replicating disk; returns the tag if it was clean.

        A clean pass that found nothing to ship sends no tag unless ``force``:
        the target already sits on the latest state.  ``final`` marks the tag
        the disks' last (see TagRequest).
        """
        disks = self._replicating()
        if not disks:
            return None
        with self._frozen(disks) if freeze else contextlib.nullcontext() as frozen:
            taken = self.tracker.begin_pass([d.id for d in disks])
            t0 = self.tracker.t0
            t0_wall = time.time() - (mono() - t0)
            held = {d.id: self._ship_pass(d, taken[d.id]) for d in disks}
            read = mono()
            # An orderly stop cut the pass short: what it did not send is dirty again
            # (see _ship_pass), and no tag may claim the pass.
            stopped = self.stop.is_set()
            # Online verify: after t0, in the pass (never lengthening a freeze).
            if not freeze and not stopped:
                self.verifier.read_pass([d.id for d in disks])
            clean = self.tracker.end_pass() and not stopped
        log.debug("pass: %d blocks, read and sent in %.4f s, ended %.4f s after t0, %s",
                  sum(len(b) for b in taken.values()), read - t0, mono() - t0,
                  "clean" if clean else "collided")  # fmt: skip
        if freeze and self._thawed_early:
            clean = False
        self.passes += 1
        lost = self.tracker.lost()
        sections = self.verifier.end_pass([d.id for d in disks], clean and not lost,
                                          self.tracker.touched)  # fmt: skip
        if lost:
            for disk in disks:
                self._request_resync(disk, "trace events were lost")
            return None
        tag = None
        if clean:
            tag = {
                "id": f"{self.settings.machine}-{int(t0 * 1e9)}",
                "kind": kind if freeze else "crash",
                "t0_mono_ns": int(t0 * 1e9),
                "t0_wall": t0_wall,
                "frozen": frozen or [],
                "disks": sorted(d.id for d in disks),
            }
            if final:
                tag["final"] = True
        changed = force or bool(sections) or any(len(taken[d.id]) for d in disks)
        for disk in disks:
            self._close_pass(disk, held[disk.id], tag if changed else None, sections.get(disk.id))
        if clean:
            self.clean_passes += 1
            self.last_clean = mono()
        return tag

    def _close_pass(
        self, disk: DiskState, batch: Batch | None, tag: dict[str, Any] | None,
        verify: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        if batch is None and tag is None:
            return
        if verify is not None and tag is not None:
            if batch is not None and batch.extents:
                self._send(disk, batch)  # the verify digests ride alone, in an empty batch
            batch = None
        if batch is None:
            batch = self._new_batch(disk)
        batch.tag = tag if verify is None or tag is None else {**tag, "verify": verify}
        self._send(disk, batch)
        if tag is not None:
            self.last_tag_sent = mono()
            disk.last_tag = {**tag, "seq": batch.seq, "gen": batch.gen}
            if disk.phase in ("initial-sync", "resync"):
                log.info("disk %s: generation %d reached its first tag", disk.id, disk.gen)
                disk.phase = "replicating"
                self._drop_reader(disk.id)  # its buffer was sized for the sync's batches

    def _new_batch(self, disk: DiskState) -> Batch:
        if disk.gen is None:  # batches are made only within a generation
            raise RuntimeError(f"disk {disk.id} has no generation to ship in")
        return Batch(
            tenant=self.settings.tenant,
            disk=disk.id,
            gen=disk.gen,
            seq=0,
            disk_size=disk.track.size,
            extents=[],
        )

    def _send(self, disk: DiskState, batch: Batch) -> None:
        batch.seq = disk.next_seq
        disk.next_seq += 1
        disk.bytes_shipped += len(batch.payload)
        self.trimmer.used(len(batch.payload))
        self.shipper.send_batch(batch, self.stop)

    def _ship_pass(self, disk: DiskState, blocks: BitMap) -> Batch | None:
        """Read ``blocks`` and send them; return the pass's last batch, unsent."""
        track = disk.track
        limit = self._batch_limit(disk)
        # While a disk syncs, long runs of data go out as views of the buffers they were
        # read into, up to a window's worth of reads held (ferry.blockio.DirectReader):
        # copying them into the batch cost a tenth of the agent's CPU.  Once it replicates,
        # pieces are short and each would hold a whole buffer: they are copied.
        syncing = disk.phase in ("initial-sync", "resync")
        reader = self._reader_for(disk, limit, self.settings.window if syncing else 0)
        batch = self._new_batch(disk)
        payload = Gathered()
        disk.pass_remaining = len(blocks) * track.block
        # Full batches read but not sent yet, with the first block of each: once
        # replicating, a pass reads all its blocks before it sends (and waits on the
        # window), up to ``readahead`` bytes, for a write queued on a block the pass
        # has not read yet makes the pass collide (docs/design.md, "Which pass a write
        # belongs to"): the sends, and above all the window's backpressure when the
        # pipeline is behind, would otherwise stretch the time the pass can collide.
        ready: collections.deque[tuple[Batch, int]] = collections.deque()
        readahead = self._readahead(disk)
        held = 0
        unsent = 0  # the first block of the batch being filled: the ones before it were sent
        block = track.block
        spans = (
            (
                first * block,
                min((first + count) * block, track.size) - first * block,
                (first, count),
            )
            for first, count in _runs(blocks, max(1, limit // block))
        )

        def read(run: tuple[int, int]) -> None:  # every run up to this one is read
            self.tracker.chunk_read(disk.id, run[0] + run[1])

        for (first, _count), view in reader.read_each(spans, read):
            if self.stop.is_set():
                # An orderly stop: a resync's pass reads whole disks, for longer than a
                # stop may take (TimeoutStopSec), and a stop that outlived the wait for
                # this thread could not hand the dirty maps over (agent.restart).
                self._give_back(disk, blocks, ready[0][1] if ready else unsent)
                disk.pass_remaining = 0
                return None
            length = len(view)
            disk.bytes_read += length
            disk.pass_remaining = max(0, disk.pass_remaining - length)
            pieces = self._extents(disk, first, view, reader.zero_runs(track.block))
            del view  # held only through the pieces that are kept
            need = sum(len(p) for _, _, _, p in pieces if p is not None)
            if batch.extents and (
                len(payload) + need > limit or len(batch.extents) + len(pieces) > MAX_EXTENTS
            ):
                batch.payload = payload
                ready.append((batch, unsent))
                held += len(payload)
                while ready and held > readahead:  # over the budget: send the oldest
                    sent, _ = ready.popleft()
                    held -= len(sent.payload)
                    self._send(disk, sent)
                batch, payload = self._new_batch(disk), Gathered()
                unsent = first
            _gather(batch, payload, pieces, reader.may_keep())
            del pieces  # the next read may reuse the buffer of those not kept
        disk.pass_remaining = 0
        while ready:  # every block of the pass is read: it can no longer collide
            self._send(disk, ready.popleft()[0])
        if not batch.extents:
            return None
        batch.payload = payload
        return batch

    def _readahead(self, disk: DiskState) -> int:
        """Bytes of full batches a pass may hold back until its reads are done.

        Once replicating, the window's worth of ``batch_bytes`` (what the window
        already lets the agent hold); none while syncing, whose batches are larger
        and whose pass reads the whole disk.
        """
        if disk.phase in ("initial-sync", "resync"):
            return 0
        return self.settings.batch_bytes * self.settings.window

    def _give_back(self, disk: DiskState, blocks: BitMap, unsent: int) -> None:
        """Mark ``blocks`` from ``unsent`` on dirty again: a pass stopped before sending them.

        Their extents may have changed what the target is known to read as
        zeros (``target_zero``) without reaching it: forget that for them, so
        they are sent whatever they hold.
        """
        rest = BitMap(blocks)
        rest.remove_range(0, unsent)
        for first, count in _runs(rest, 1 << 30):
            self.tracker.mark_dirty(disk.id, first, first + count)
            disk.target_zero.remove_range(first, first + count)
        log.info("disk %s: stopping in the middle of a pass, %d blocks left dirty",
                 disk.id, len(rest))  # fmt: skip

    def _drop_reader(self, disk: str) -> None:
        reader = self._buffers.pop(disk, None)
        self._buffer_bytes.pop(disk, None)
        if reader is not None:
            reader.close()

    def _batch_limit(self, disk: DiskState) -> int:
        """Bytes of data per batch: ``sync_batch_bytes`` while the disk syncs (a pass that
        reads the whole disk, where no tag is due), ``batch_bytes`` once it replicates."""
        syncing = disk.phase in ("initial-sync", "resync")
        return self.settings.sync_batch_bytes if syncing else self.settings.batch_bytes

    def _reader_for(self, disk: DiskState, limit: int, keep: int) -> blockio.DirectReader:
        """The disk's reader, its buffers sized for ``limit``, ``keep`` reads' views held."""
        if self._buffer_bytes.get(disk.id) != (limit, keep):
            self._drop_reader(disk.id)
        reader = self._buffers.get(disk.id)
        if reader is None:
            reader = self._buffers[disk.id] = self._reader(disk.track.device, limit, keep)
            self._buffer_bytes[disk.id] = (limit, keep)
        return reader

    def _extents(
        self, disk: DiskState, first: int, view: memoryview, runs: list[blockio.Run]
    ) -> list[tuple[int, int, str, memoryview | None]]:
        """Split a read run into data and zero extents, skipping zeros the target has.

        ``runs`` are the zero runs of ``view`` (:func:`ferry.blockio.zero_runs`); data
        extents are views into ``view``, valid until the next read.
        """
        block = disk.track.block
        out: list[tuple[int, int, str, memoryview | None]] = []
        for start, count, is_zero in runs:
            b0 = first + start
            lo, hi = start * block, min((start + count) * block, len(view))
            if not is_zero:
                disk.target_zero.remove_range(b0, b0 + count)
                out.append((b0 * block, hi - lo, DATA, view[lo:hi]))
                continue
            known = disk.target_zero.range_cardinality(b0, b0 + count)
            if known == count:
                continue  # the target already reads as zeros here
            disk.target_zero.add_range(b0, b0 + count)
            out.append((b0 * block, hi - lo, ZERO, None))
        return out

    # -- tags and freezes ---------------------------------------------------------------

    def _serve_tag(self, request: TagRequest) -> None:
        if self.paused.is_set():
            request.error = "replication is paused (resume it first)"
            request.done.set()
            return
        try:
            tag = self._tag_now(request.kind, request.final)
        except Exception as exc:  # reported to the operator who asked
            log.error("tag request failed: %s", exc)
            request.error = str(exc)
            request.done.set()
            return
        if tag is None:
            request.error = "no clean pass could be made (see the agent log)"
        else:
            request.result = tag
            if request.pause_after:
                self.paused.set()
        request.done.set()

    def _tag_now(self, kind: str, final: bool = False) -> dict[str, Any] | None:
        if kind == "app":
            self._hook(self.settings.pre_hook, "pre")
            try:
                return self._run_pass(freeze=True, kind="app", force=True, final=final)
            finally:
                self._hook(self.settings.post_hook, "post")
        for _ in range(3):
            tag = self._run_pass(force=True, final=final)
            if tag is not None:
                return tag
        return self._run_pass(freeze=True, force=True, final=final)

    def _hook(self, command: str | None, which: str) -> None:
        if command:
            log.info("running the %s-freeze hook", which)
            run_hook(command, which, self.settings.hook_timeout)

    @contextlib.contextmanager
    def _frozen(self, states: list[DiskState]):
        """Freeze every filesystem on ``states``' disks at once; yield their mount points.

        A freeze that fails thaws what was frozen and raises: a tag is never
        taken half-frozen.  With nothing mounted the pass runs as it is, and
        the tag says so (``frozen: []``).
        """
        self._thawed_early = False
        points = self._filesystems(states)
        if not points:
            log.warning(
                "no filesystem is mounted from %s: nothing to freeze (hooks only)",
                ", ".join(d.id for d in states),
            )
            yield []
            return
        frozen = Frozen(points, self.settings.freeze_timeout)
        try:
            with frozen:
                yield list(points)
        finally:
            self._thawed_early = frozen.fired  # the pass was no frozen point: no tag
            took = frozen.seconds
            self.frozen_passes += 1
            self.longest_freeze = max(self.longest_freeze, took)
            log.info("froze %s for %.3f s", ", ".join(points), took)

    # -- status -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """A JSON-able picture of the agent's replication, per disk."""
        disks = []
        for disk in self.disks.values():
            dirty = self.tracker.dirty_count(disk.id) * disk.track.block
            disks.append(
                {
                    "disk": disk.id,
                    "device": disk.track.device,
                    "size": disk.track.size,
                    "phase": disk.phase,
                    "gen": disk.gen,
                    "next_seq": disk.next_seq,
                    "bytes_to_go": dirty + disk.pass_remaining,
                    "backlog_batches": self.shipper.unacked(disk.id),
                    "bytes_read": disk.bytes_read,
                    "bytes_shipped": disk.bytes_shipped,
                    "last_tag": disk.last_tag,
                    "resyncs": disk.resyncs,
                    "start": disk.start_reason,
                    "device_path": os.path.realpath(disk.track.device),
                    "identity": disk.identity,
                    "problem": disk.problem,
                    "filesystems": self._filesystems([disk]),
                    "verify": self.verifier.status(disk.id),
                }
            )
        return {
            "paused": self.paused.is_set(),
            "tracker": self.tracker.kind,
            "tracker_description": self.tracker.description,
            "connected": self.shipper.connected,
            "last_error": self.shipper.last_error,
            "bytes_resent": self.shipper.bytes_resent,
            "passes": self.passes,
            "clean_passes": self.clean_passes,
            "frozen_passes": self.frozen_passes,
            "longest_freeze_s": round(self.longest_freeze, 4),
            "uptime_s": round(time.time() - self.started, 1),
            "app_tag_interval": self.settings.app_tag_interval,
            "scheduled_app_tags": self.scheduled_app_tags,
            "verify_interval": self.settings.verify_interval,
            "disks": disks,
        }


def _gather(
    batch: Batch,
    payload: Gathered,
    pieces: list[tuple[int, int, str, memoryview | None]],
    keep: bool,
) -> None:
    """Add a read's ``pieces`` to ``batch``; their data to ``payload``, kept as views if
    ``keep`` (the reader has a buffer for the next read without this one)."""
    for offset, n, kind, data in pieces:
        batch.extents.append((offset, n, kind))
        if data is not None:
            payload.add(data, keep)


def _fs_number(path: str) -> int:
    try:
        return os.stat(path).st_dev
    except OSError:
        return -1


def _runs(blocks: BitMap, longest: int):
    """Yield ``(first, count)`` runs of consecutive blocks, none longer than ``longest``."""
    firsts = blocks - blocks.shift(1)  # a block whose predecessor is not in the set
    lasts = blocks - blocks.shift(-1)  # a block whose successor is not in the set
    for first, last in zip(firsts, lasts, strict=True):
        count = last - first + 1
        while count > 0:
            n = min(count, longest)
            yield first, n
            first += n
            count -= n


def _differing(mine: bytes, target: bytes, n: int, stride: int = 4096) -> list[int]:
    """Indexes of the first ``n`` digests that differ between two digest maps.

    Equal stretches of ``stride`` digests are skipped with one comparison.
    """
    size = blockio.DIGEST_BYTES
    out = []
    for lo in range(0, n, stride):
        hi = min(lo + stride, n)
        if mine[lo * size : hi * size] == target[lo * size : hi * size]:
            continue
        out += [
            i
            for i in range(lo, hi)
            if mine[i * size : (i + 1) * size] != target[i * size : (i + 1) * size]
        ]
    return out


def _expand(coarse: list[int], per: int, limit: int) -> BitMap:
    """Tracking blocks covered by the given coarse (resync) blocks."""
    out = BitMap()
    for c in coarse:
        out.add_range(c * per, min((c + 1) * per, limit))
    return out
