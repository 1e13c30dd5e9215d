"""One disk's work: receive notices, verify and stage segments, apply whole groups.

Write and delete ordering (docs/design.md, "Master target"; invariants 7-8):

* segment: download → verify (checksum, identity, authentication) → staging
  file fsync'ed → delete the notice; or, for a segment applied in the round
  that received it, staged in memory → applied (cursor durable) → delete the
  notice, its staging file written only if the round did not apply it.  A corrupt segment: cursor marks the
  resync durably → notice to the poison queue → delete it from the queue.
* resync: cursor ``(gen+1, 0)`` fsync'ed → drop older staged segments →
  digest map blob → answer blob → delete the notice.
* apply: check every staged file of the group → undo record of the group
  fsync'ed (mastertarget/journal.py) → write all extents in seq order →
  fsync the target → cursor fsync'ed → retention of the journal → delete
  blobs, then staged files.

A crash between any two steps leaves work that the next start redoes
harmlessly: notices come back, staged files replay (extents are absolute),
and stale leftovers are recognised against the cursor and removed.

Fence (a cutover): the group closing with a tag marked ``final``, or with
the tag named in ``fx-<len(tenant)>-<tenant>-<disk>/<tenant>/<disk>/fence.json``, is the last
one applied; the cursor that reaches it records ``fenced`` in the same
write, and the disk is never served again.  A group newer than the fence's
tag is refused.

Hold (a test failover): each group is applied holding an exclusive
``flock`` on ``<state_dir>/<disk>/apply.lock``.  Whoever else holds that lock
(``mastertarget.cutover.clone_at_tag``) sees the target sitting exactly on the
cursor's tag; meanwhile notices are still received and staged, so
replication goes on and only applying waits.

Online verify (mastertarget.verify): a tag carrying a verify section is
applied as any other; then, still on that tag and holding ``apply.lock``,
the section's ranges of the target are digested and compared.  The section
is never recorded with the tag.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from azure.core.exceptions import AzureError

from ferry import durable, memory, naming, segment
from ferry import fence as fences
from ferry import verify as verify_format
from ferry.batch import Batch
from ferry.blockio import BufferPool
from ferry.errors import FerryError, NotFound, SegmentCorrupt
from ferry.storage import Message, Storage
from mastertarget import applylock, defaults, killpoint, layout, notices
from mastertarget import cursor as cursors
from mastertarget import journal as journals
from mastertarget.errors import BadNotice
from mastertarget.gap import GapWatch
from mastertarget.ownership import Ownership
from mastertarget.settings import DiskSettings, Settings
from mastertarget.staging import Staging, file_name
from mastertarget.status import StatusBoard
from mastertarget.target import Target
from mastertarget.verified import Verified
from mastertarget.verify import Checker

log = logging.getLogger("ferry.mastertarget")


TRIMMER = memory.AfterBurst(defaults.TRIM_LARGE, defaults.TRIM_AFTER)
"""The process's: a sync's large segments, once applied, give their memory back (services
call :meth:`~ferry.memory.AfterBurst.maybe` between rounds, and :meth:`DECODED.release
<ferry.blockio.BufferPool.release>` when it trims)."""

DECODED = BufferPool(defaults.DECODE_BUFFER_BYTES, defaults.DECODE_BUFFERS)
"""The process's reused buffers segments are decompressed into: page-aligned, so that the
target writes long extents from them with O_DIRECT without copying (mastertarget.target)."""


class DiskWorker:
    """Replicates one disk: call :meth:`open`, then :meth:`step` in a loop, then :meth:`close`.

    ``ownership`` (the held owner lease) is checked before anything is taken
    from the queue and between extents; without it the caller guarantees
    that nothing else serves the disk (tests, tools).  ``stop`` is checked
    between groups, so a stop request finishes the group in hand.
    ``on_applied(disk, tag, gen, seq)`` is called after each group's cursor
    is durable (a new recovery point); it must not block.
    """

    def __init__(
        self,
        settings: Settings,
        disk: DiskSettings,
        storage: Storage,
        key: segment.Keys = None,
        ownership: Ownership | None = None,
        board: StatusBoard | None = None,
        stop: threading.Event | None = None,
        visibility: int = defaults.VISIBILITY_TIMEOUT,
        missing_retry: int = defaults.MISSING_BLOB_RETRY,
        on_applied: Callable[[str, dict[str, Any], int, int], None] | None = None,
    ) -> None:
        self.tenant = settings.tenant
        self.awaits_keys = bool(settings.segment_keys)
        """Keys arrive from the configuration server (a rotation may be in flight): wait a
        little for a key a segment names before poisoning it."""
        self.on_applied = on_applied
        self.disk = disk.id
        self.storage = storage
        self.key = key
        """One key or a keyring by key id; the master target's own dict is refreshed in place."""
        self.allow_unsealed = settings.allow_unsealed
        self.ownership = ownership
        self.board = board
        self.stop = stop or threading.Event()
        self.visibility = visibility
        self.missing_retry = missing_retry
        self.segments = naming.segments_container(self.tenant, self.disk)
        self.control = naming.control_container(self.tenant, self.disk)
        self.queue = naming.disk_queue(self.tenant, self.disk)
        self.poison = naming.poison_queue(self.queue)
        self.directory = layout.disk_dir(settings.state_dir, self.disk)
        self.cursor_path = layout.cursor_path(settings.state_dir, self.disk)
        self.staging = Staging(layout.staging_dir(settings.state_dir, self.disk))
        self.verified = Verified(defaults.VERIFIED_KEPT_BYTES)
        self.gap = GapWatch(defaults.GAP_LOOKUP_AFTER)
        self.target = Target(disk.target, disk.kind)
        self.cursor = cursors.Cursor(self.tenant, self.disk)
        self.verify = Checker(self.disk, self.directory, str(disk.target))  # online verify
        self.apply_lock_path = layout.apply_lock_path(settings.state_dir, self.disk)
        self.applying_path = layout.applying_path(settings.state_dir, self.disk)
        self.journal = journals.Journal(
            layout.journal_dir(settings.state_dir, self.disk), self.disk, settings.journal_policy()
        )
        self.fence: dict[str, Any] | None = None
        self.held = False
        self._apply_lock: int | None = None
        self._fence_at = float("-inf")
        self._changed = False
        self._stale_possible = True
        self._status_at = self._state_at = float("-inf")
        self._published: tuple[Any, ...] = ()
        self._round = False
        self.drained = False
        """True when the last round received fewer notices than it asked for: the queue held
        no more then, and polling it again at once would very likely find it empty."""
        self._torn: tuple[int, int] | None = None
        """``(gen, through)`` of applying.json found at open: the group a crash interrupted."""
        self._unsettled: dict[tuple[int, int], list[Message]] = {}
        """Notices of segments staged in memory this round, deleted by _settle."""
        """What of the last state blob written must reach readers at once (see publish)."""
        self._fetcher: concurrent.futures.ThreadPoolExecutor | None = None
        self._fetching: dict[str, concurrent.futures.Future[bytes]] = {}
        """Downloads of this round's segments, by blob name (see _fetch_ahead)."""
        self._to_fetch: list[str] = []
        """Blobs of this round's segments not yet asked for, in the round's order."""

    # -- life cycle ----------------------------------------------------------------------

    def open(self) -> DiskWorker:
        """Load the cursor, open (or create) the target and index the staged segments."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.cursor = cursors.load(self.cursor_path, self.tenant, self.disk)
        self.target.open()
        self._apply_lock = applylock.open_lock(self.apply_lock_path)
        for path in self.staging.scan():
            self._forget_unreadable(path)
        mark = durable.read_json(self.applying_path) if self.applying_path.exists() else None
        if isinstance(mark, dict) and isinstance(mark.get("through"), int):
            self._torn = (int(mark.get("gen") or 0), mark["through"])
        with self._applying() as allowed:  # a copy being made reads the journal: not under it
            if allowed:
                self.journal.open(dataclasses.asdict(self.cursor))
        return self  # the fence record is read by the first step (storage may be down now)

    def close(self) -> None:
        """Release the target; the queue, staging and cursor stay as they are."""
        self._forget_fetches()
        if self._fetcher is not None:
            self._fetcher.shutdown(wait=False, cancel_futures=True)
            self._fetcher = None
        self.target.close()
        if self._apply_lock is not None:
            os.close(self._apply_lock)
            self._apply_lock = None

    @property
    def fenced(self) -> bool:
        """True once the disk is fenced: nothing more is received or applied."""
        return self.cursor.fenced is not None

    def _forget_unreadable(self, path: Path) -> None:
        # The file's name still says which batch it was; its blob may still
        # exist, but without the notice we cannot tell: resync to be safe.
        path.unlink(missing_ok=True)
        why = f"staged file {path.name} is unreadable"
        self._require_resync(self.cursor.gen, why)
        log.error("disk %s: %s; removed it; the disk needs a resync", self.disk, why)

    # -- one round -----------------------------------------------------------------------

    def step(self) -> int:
        """Handle one round of notices and apply every whole group; return the work done.

        The result counts notices handled plus groups applied: 0 means idle.
        A fenced disk does nothing.
        """
        self._check_fence()
        if self.fenced:
            return 0
        self._check_owner()
        self._discard_stale()
        messages = self.storage.receive(
            self.queue, count=defaults.RECEIVE_BATCH, visibility=self.visibility
        )
        self.drained = len(messages) < defaults.RECEIVE_BATCH
        self._round = True
        try:
            self._fetch_ahead(messages)
            for message in messages:
                self.handle(message)
            self._forget_fetches()  # before applying: no download holds memory meanwhile
            found = self._replay_marked() + self._look_up_gap()
            applied = self.apply_ready()
        finally:
            self._round = False
            self._forget_fetches()
            self._settle()
        self.publish(force=self._changed)
        return len(messages) + found + applied

    def _settle(self) -> None:
        """Delete the notices of segments staged in memory this round, each once durable:
        applied (the cursor is past it) or else written to staging now.

        A crash before leaves their notices in the queue, which deliver them again.
        """
        for key in list(self._unsettled):
            if not self.cursor.is_stale(*key) and self.staging.held(*key):
                self.staging.persist(*key)
                killpoint.reached("staged")
        for key, messages in list(self._unsettled.items()):
            while messages:
                self.storage.delete_message(self.queue, messages[0])
                messages.pop(0)
            del self._unsettled[key]

    def handle(self, message: Message) -> None:
        """Act on one received notice (resync, segment, or unusable)."""
        self._check_owner()
        try:
            notice = notices.parse(message.body, self.tenant, self.disk)
        except BadNotice as exc:
            self._poison(message, exc.why, resync_gen=self.cursor.gen if exc.segment else None)
            return
        if isinstance(notice, notices.ResyncNotice):
            self._resync(message, notice)
        else:
            self._segment(message, notice)

    # -- segments ------------------------------------------------------------------------

    def _segment(self, message: Message, notice: notices.SegmentNotice) -> None:
        if self.cursor.is_stale(notice.gen, notice.seq):
            # Applied already, or of a finished generation: a re-announce after
            # a process server restart, or a duplicate delivery.
            self.storage.delete(self.segments, notice.blob)
            self.storage.delete_message(self.queue, message)
            return
        if (notice.gen, notice.seq) in self.staging:
            if self.staging.held(notice.gen, notice.seq):
                self._unsettled[(notice.gen, notice.seq)].append(message)  # a duplicate
            else:
                self.storage.delete_message(self.queue, message)
            return
        try:
            data = self._download(notice.blob)
        except NotFound:
            self._blob_missing(message, notice)
            return
        try:
            # Everything short of decompressing: the apply decompresses anyway,
            # and doing it twice cost the master target 15% of its CPU.
            expect = {
                "tenant": self.tenant,
                "disk": self.disk,
                "gen": notice.gen,
                "seq": notice.seq,
            }
            opened = segment.open_verified(
                data, notice.blob, expect, key=self.key, checksum=notice.checksum,
                allow_unsealed=self.allow_unsealed,
            )  # fmt: skip
        except segment.UnknownKey as exc:
            # A rotation in flight: the key may reach a master target that learns
            # keys from the server a little after the first segment sealed with it.
            if self.awaits_keys and message.dequeue_count < defaults.UNKNOWN_KEY_SIGHTINGS:
                log.warning("disk %s: %s; waiting for the key", self.disk, exc)
                return
            self._poison_segment(message, notice, str(exc))
            return
        except SegmentCorrupt as exc:
            self._poison_segment(message, notice, str(exc))
            return
        TRIMMER.used(opened.header.get("raw_len") or 0)
        self.verified.keep(notice.gen, notice.seq, opened)  # applied from memory (see verified.py)
        if self._round and self._applies_soon(notice.gen, notice.seq, len(data)):
            # Staged in memory: applied in this round, its file would only be written, fsync'ed
            # and deleted again; _settle deletes the notice once it is durable either way.
            self.staging.hold(notice.gen, notice.seq, data, opened.header)
            self._unsettled[(notice.gen, notice.seq)] = [message]
            return
        self.staging.add(notice.gen, notice.seq, data, opened.header.get("tag") is not None)
        killpoint.reached("staged")
        self.storage.delete_message(self.queue, message)

    def _fetch_ahead(self, messages: list[Message]) -> None:
        """Start downloading the segments this round will want (FETCH_AHEAD at a time).

        Only what the round would download anyway: a segment notice of a batch
        neither applied already nor staged.  Each is still verified, in the
        round's order, by :meth:`_segment`; a download's failure is raised
        there, as if it had been made then.
        """
        self._to_fetch = []
        for message in messages:
            try:
                notice = notices.parse(message.body, self.tenant, self.disk)
            except BadNotice:
                continue
            if not isinstance(notice, notices.SegmentNotice):
                continue
            key = (notice.gen, notice.seq)
            if self.cursor.is_stale(*key) or key in self.staging:
                continue
            self._to_fetch.append(notice.blob)
        self._to_fetch.reverse()  # popped from the end
        self._top_up()

    def _top_up(self) -> None:
        while self._to_fetch and len(self._fetching) < defaults.FETCH_AHEAD:
            blob = self._to_fetch.pop()
            if blob in self._fetching:
                continue
            if self._fetcher is None:
                self._fetcher = concurrent.futures.ThreadPoolExecutor(
                    defaults.FETCH_AHEAD, thread_name_prefix=f"fetch-{self.disk}"
                )
            self._fetching[blob] = self._fetcher.submit(self.storage.get, self.segments, blob)

    def _download(self, blob: str) -> bytes:
        """Blob ``blob`` of the disk's segments: its download started ahead, or now."""
        future = self._fetching.pop(blob, None)
        self._top_up()
        if future is None:
            return self.storage.get(self.segments, blob)
        return future.result()

    def _forget_fetches(self) -> None:
        """Drop the round's downloads not used (a notice handled otherwise, a round cut short)."""
        self._to_fetch = []
        for future in self._fetching.values():
            future.cancel()  # one running finishes in the background; its bytes are dropped
        self._fetching = {}

    def _applies_soon(self, gen: int, seq: int, size: int) -> bool:
        """True if batch (gen, seq) may well be applied in this round: the cursor's generation,
        next after the cursor or after a staged batch, applying not held, and its verified copy
        in memory with room for its bytes beside it."""
        c = self.cursor
        return (
            gen == c.gen
            and not self.held
            and (seq == c.applied_seq + 1 or (gen, seq - 1) in self.staging)
            and (gen, seq) in self.verified
            # One budget with the verified copies: the master target's memory bound per disk
            # stays VERIFIED_KEPT_BYTES (a separate one raised its peak by as much again).
            and self.verified.bytes + self.staging.held_bytes + size <= defaults.VERIFIED_KEPT_BYTES
        )

    def _look_up_gap(self) -> int:
        """Stage the batch the cursor waits for by its blob's name if its notice is overdue.

        The notice was lost (``mastertarget.gap``); 1 if the batch was found.
        """
        gen = self.cursor.gen
        seq = self.gap.due(gen, self.cursor.applied_seq, self.staging)
        if seq is None:
            return 0
        return self._stage_by_name(gen, seq, "its notice was lost")

    def _replay_marked(self) -> int:
        """After a crash mid-group, stage what the group lacks by its blobs' names, at once.

        Segments of the group staged in memory only (_applies_soon) went with the
        process; their notices come back only after the visibility timeout, and the
        target stays torn until the group is replayed.  Returns the batches staged.
        """
        if self._torn is None:
            return 0
        gen, through = self._torn
        found = 0
        for seq in range(self.cursor.applied_seq + 1, through + 1):
            if gen != self.cursor.gen or (gen, seq) in self.staging:
                continue
            if not self._stage_by_name(gen, seq, "to replay the group a crash interrupted"):
                return found  # not there (yet): its notice or a later round brings it
            found += 1
        self._torn = None
        return found

    def _stage_by_name(self, gen: int, seq: int, why: str) -> int:
        """Fetch, verify and stage segment (gen, seq) by its blob's name; 1 if staged."""
        blob = naming.segment_blob(self.tenant, self.disk, gen, seq)
        expect = {"tenant": self.tenant, "disk": self.disk, "gen": gen, "seq": seq}
        try:
            data = self.storage.get(self.segments, blob)
            header = segment.verify(data, blob, expect, key=self.key,
                                    allow_unsealed=self.allow_unsealed)  # fmt: skip
        except (NotFound, segment.UnknownKey):
            return 0  # not uploaded yet, or a key still on its way: look again later
        except SegmentCorrupt as exc:
            self._require_resync(gen, f"segment gen {gen} seq {seq} ({blob}): {exc}")
            return 0
        self.staging.add(gen, seq, data, header.get("tag") is not None)
        log.warning("disk %s: staged gen %d seq %d found by its blob's name: %s",
                    self.disk, gen, seq, why)  # fmt: skip
        return 1

    def _verify(
        self, data: bytes, name: str, gen: int, seq: int, checksum: str | None = None
    ) -> Batch:
        expect = {"tenant": self.tenant, "disk": self.disk, "gen": gen, "seq": seq}
        return segment.unpack(data, name, expect=expect, key=self.key, checksum=checksum,
                              allow_unsealed=self.allow_unsealed)  # fmt: skip

    def _blob_missing(self, message: Message, notice: notices.SegmentNotice) -> None:
        # The process server uploads before it announces (invariant 6), so a
        # missing blob is a fault; a few sightings rule out a slow replica.
        if message.dequeue_count >= defaults.MISSING_BLOB_SIGHTINGS:
            why = f"blob missing after {message.dequeue_count} deliveries of its notice"
            self._poison_segment(message, notice, why)
            return
        log.debug("disk %s: segment %s not there yet; looking again later", self.disk, notice.blob)
        self._defer(message)

    def _defer(self, message: Message) -> None:
        # Without this the notice would wait out the whole visibility timeout.
        try:
            self.storage.defer(self.queue, message, self.missing_retry)
        except (AzureError, FerryError) as exc:
            log.debug("disk %s: cannot defer notice %s: %s", self.disk, message.id, exc)

    def _poison_segment(self, message: Message, notice: notices.SegmentNotice, why: str) -> None:
        reason = f"segment gen {notice.gen} seq {notice.seq} ({notice.blob}): {why}"
        self._poison(message, reason, resync_gen=notice.gen)

    def _poison(self, message: Message, why: str, resync_gen: int | None) -> None:
        """Move a notice to the poison queue, never applying it; mark a resync if data is lost."""
        if resync_gen is not None:
            # Durable before the notice goes: the mark must survive a crash.
            self._require_resync(resync_gen, why)
        self.storage.send_raw(self.poison, message.raw)
        self.storage.delete_message(self.queue, message)
        if resync_gen is None:
            log.error("disk %s: unusable notice (%s); moved it to %s", self.disk, why, self.poison)
        else:
            log.error(
                "disk %s: rejected %s; moved its notice to %s; the disk needs a resync",
                self.disk,
                why,
                self.poison,
            )

    def _require_resync(self, gen: int, reason: str) -> None:
        current = self.cursor.resync_required_gen
        gen = max(gen, current) if current is not None else gen
        self._save(dataclasses.replace(self.cursor, resync_required_gen=gen, reason=reason))

    # -- resync --------------------------------------------------------------------------

    def _resync(self, message: Message, notice: notices.ResyncNotice) -> None:
        answer_blob = naming.resync_answer_blob(self.tenant, self.disk, notice.request_id)
        if self.storage.exists(self.control, answer_blob) or self._superseded(message):
            self.storage.delete_message(self.queue, message)  # answered before: idempotent
            return
        gen = self._start_generation(notice.request_id, message.inserted_at)
        answer = self._answer(notice, gen)
        self.storage.put_json(self.control, answer_blob, answer)
        self.storage.delete_message(self.queue, message)
        if gen > 1:
            # The previous generation's map served its resync; maps are large.
            self.storage.delete(self.control, naming.digest_blob(self.tenant, self.disk, gen - 1))
        log.info(
            "disk %s: started generation %d for resync request %s (target %s)",
            self.disk,
            gen,
            notice.request_id,
            "empty" if answer["empty"] else "compared",
        )

    def _superseded(self, message: Message) -> bool:
        """A resync request queued before the one that started the current generation.

        Queues do not keep order: a request the agent gave up on (it crashed
        or asked again) can arrive after its successor.  Starting a
        generation for it would leave the agent shipping one the master
        target had already left, for good (found by the fault campaign's
        soak).  The queue's own insertion times order them (one clock, whole
        seconds: within the same second the request is honoured).
        """
        current, inserted = self.cursor.resync_inserted_at, message.inserted_at
        if current is None or inserted is None or inserted >= current:
            return False
        log.warning("disk %s: ignored a resync request queued before the one that started "
                    "generation %d: %s", self.disk, self.cursor.gen, message.body.get("request_id"))  # fmt: skip
        return True

    def _start_generation(self, request_id: str, inserted_at: float | None = None) -> int:
        """Move the cursor to a new generation durably; drop what older ones staged."""
        old = self.cursor
        if old.resync_request == request_id:
            # We crashed after the cursor but before the answer: the agent has
            # not heard of this generation yet, so it is still fresh.
            new = old
        else:
            new = dataclasses.replace(old, gen=old.gen + 1, applied_seq=0,
                                      resync_request=request_id, resync_inserted_at=inserted_at)  # fmt: skip
        if new.resync_required_gen is not None and new.resync_required_gen < new.gen:
            new = dataclasses.replace(new, resync_required_gen=None, reason=None)
        self._save(new)
        self._discard_stale()
        return new.gen

    def _answer(self, notice: notices.ResyncNotice, gen: int) -> dict[str, Any]:
        digests, empty = self.target.digest_map(notice.block_size)
        digest_blob = None
        if not empty:
            digest_blob = naming.digest_blob(self.tenant, self.disk, gen)
            self.storage.put(self.control, digest_blob, digests)
        return {
            "request_id": notice.request_id,
            "gen": gen,
            "block_size": notice.block_size,
            "target_size": self.target.size,
            "digest_blob": digest_blob,
            "empty": empty,
        }

    # -- apply ---------------------------------------------------------------------------

    def apply_ready(self) -> int:
        """Apply every whole group of the cursor's generation, in order; return how many.

        The one exception to whole groups: a disk whose target never reached
        a tag applies its batches as they arrive (it has no recovery point
        to keep).

        Stops between groups when a stop was asked, when the disk is fenced
        and while someone else holds ``apply.lock``.
        """
        leftover = self.applying_path.exists()  # a crash mid-group: replaying it mends it
        groups, clean = self._apply_groups()
        if clean and (groups or not leftover) and self.applying_path.exists():
            self.applying_path.unlink()  # every group begun is done: the target is on a tag
        return groups

    def _mark_applying(self, gen: int, through: int) -> None:
        """Say durably, before the first write, that the target may be torn up to ``through``."""
        durable.write_json(self.applying_path, {"gen": gen, "through": through,
                                                "from_tag": (self.cursor.last_tag or {}).get("id")})  # fmt: skip

    def _apply_groups(self) -> tuple[int, bool]:
        """Apply whole groups; ``(how many, False if one could not be applied)``.

        ``applying.json`` is written (fsync'ed) before the first write of a
        run of groups and removed only once the cursor is past every group
        begun; a crash in between leaves it, and the restart replays the group.
        """
        groups, marked = 0, -1
        while not self.stop.is_set() and not self.fenced:
            gen, after = self.cursor.gen, self.cursor.applied_seq
            end = self.staging.group_end(gen, after)
            if end is None and self.cursor.last_tag is None:
                # Before its first tag ever the target is no recovery point
                # yet: apply the initial sync as it arrives, so staging never
                # has to hold the whole disk.
                end = self.staging.run_end(gen, after)
            if end is None or self._past_fence(gen, end):
                break
            with self._applying() as allowed:
                if not allowed:
                    break
                if end > marked:  # one durable mark covers every group staged now
                    marked = max([end, *(s.seq for s in self.staging if s.gen == gen)])
                    self._mark_applying(gen, marked)
                    killpoint.reached("marked")
                if not self._apply_group(gen, after + 1, end):
                    return groups, False
            groups += 1
        return groups, True

    @contextlib.contextmanager
    def _applying(self) -> Iterator[bool]:
        """Hold ``apply.lock`` for one group; yields False while someone else holds it."""
        if self._apply_lock is None:
            yield True
            return
        with applylock.try_apply(self._apply_lock) as mine:
            if not mine:
                if not self.held:
                    self.held = True
                    self._changed = True
                    log.info(
                        "disk %s: applying held (%s)",
                        self.disk,
                        applylock.holder(self.apply_lock_path),
                    )
                yield False
                return
            if self.held:
                self.held = False
                self._changed = True
                log.info("disk %s: applying resumed", self.disk)
            yield True

    def _apply_group(self, gen: int, first: int, last: int) -> bool:
        """Apply batches ``first..last`` of ``gen`` and advance the cursor; False if it cannot."""
        if not self._group_intact(gen, first, last):
            return False
        self._check_owner()
        self._journal_group(gen, first, last)
        written, tag, section = 0, None, None
        for seq in range(first, last + 1):
            try:
                batch = self._staged_batch(gen, seq)
            except SegmentCorrupt as exc:
                # Only if the file changed after _group_intact: earlier batches of
                # the group are on the target, which is off its tag until the resync.
                self._group_broken(gen, seq, f"{exc} (after {seq - first} batches were written)")
                return False
            written += self.target.write_batch(batch, check=self._check_owner)
            killpoint.reached("written")
            tag, section = verify_format.split(batch.tag)  # the verify digests are never recorded
            del batch  # one segment's data in memory at a time
        self.target.sync()
        killpoint.reached("synced")
        self._save(
            dataclasses.replace(
                self.cursor,
                applied_seq=last,
                last_tag=tag,
                applied_at=time.time(),
                bytes_applied=self.cursor.bytes_applied + written,
                fenced=self._fence_reached(tag),
            )
        )
        killpoint.reached("cursor")
        self.journal.after_group(dataclasses.asdict(self.cursor))
        self._discard_stale()
        if self.fenced:
            self._fenced_now()
        if section is not None:  # online verify: the target sits on the tag, apply.lock held
            self.verify.check(section, tag)
            self._changed = True
        if tag is not None and self.on_applied is not None:
            self.on_applied(self.disk, tag, gen, last)
        log.info(
            "disk %s: applied gen %d seq %d-%d (%d bytes), now at tag %s",
            self.disk,
            gen,
            first,
            last,
            written,
            (tag or {}).get("id"),
        )
        return True

    def _journal_group(self, gen: int, first: int, last: int) -> None:
        """Make the group's undo record durable before its first write (journal.py)."""
        if not self.journal.enabled or self.cursor.last_tag is None:
            return  # before the first tag there is no older point to keep
        headers = [self.staging.header(gen, seq) for seq in range(first, last + 1)]
        extents = [(int(o), int(n)) for h in headers for o, n, _ in h.get("extents", [])]
        tag, _ = verify_format.split(headers[-1].get("tag"))  # never the verify digests
        to = {"gen": gen, "seq": last, "tag": tag}
        disk_size = int(headers[-1].get("disk_size") or 0)
        self.journal.before_group(
            dataclasses.asdict(self.cursor), to, extents, self.target.read, disk_size
        )

    def _staged_batch(self, gen: int, seq: int) -> Batch:
        """The batch of a staged segment: from memory if kept when staged, else from its file."""
        opened = self.verified.take(gen, seq)
        if opened is not None:
            return segment.decode(opened, DECODED.view)
        return self._verify(self.staging.read(gen, seq), file_name(gen, seq), gen, seq)

    def _group_intact(self, gen: int, first: int, last: int) -> bool:
        """Check every staged file of the group before the first write, re-fetching bad ones.

        A file that went bad on local disk would otherwise stop the group
        halfway and leave the target between two tags.
        """
        for seq in range(first, last + 1):
            if (gen, seq) in self.verified:
                continue  # verified in memory when staged; its file is not read
            if not self.staging.intact(gen, seq) and not self._refetch(gen, seq):
                return False
        return True

    def _refetch(self, gen: int, seq: int) -> bool:
        # The blob is deleted only after the group is applied, so it is
        # normally still there to replace a damaged staged copy.
        blob = naming.segment_blob(self.tenant, self.disk, gen, seq)
        self.staging.remove(gen, seq)
        try:
            data = self.storage.get(self.segments, blob)
            batch = self._verify(data, blob, gen, seq)
        except (NotFound, SegmentCorrupt) as exc:
            self._group_broken(gen, seq, f"staged copy damaged and {exc}")
            return False
        self.staging.add(gen, seq, data, batch.tag is not None)
        log.warning(
            "disk %s: staged gen %d seq %d was damaged; fetched it again", self.disk, gen, seq
        )
        return True

    def _group_broken(self, gen: int, seq: int, why: str) -> None:
        self.verified.take(gen, seq)
        self.staging.remove(gen, seq)
        reason = f"staged segment gen {gen} seq {seq}: {why}"
        self.journal.reset(f"a group could not be finished ({reason})")  # the target is torn
        self._require_resync(gen, reason)
        log.error("disk %s: cannot apply %s; the disk needs a resync", self.disk, reason)

    def _discard_stale(self) -> None:
        """Delete blobs, then staged files, of batches the cursor has passed.

        Blob first: a crash in between leaves a staged file that the next
        round recognises as stale, and the blob delete is retried with it.
        """
        if not self._stale_possible:
            return
        self.verified.forget(self.cursor.is_stale)
        for staged in self.staging.select(self.cursor.is_stale):
            self.storage.delete(
                self.segments, naming.segment_blob(self.tenant, self.disk, staged.gen, staged.seq)
            )
            killpoint.reached("blob-deleted")
            self.staging.remove(staged.gen, staged.seq)
            self._changed = True
        killpoint.reached("discarded")
        self._stale_possible = False

    # -- fence ---------------------------------------------------------------------------

    def _check_fence(self, force: bool = False) -> None:
        """Read the disk's fence record now and then; fence at once if the cursor is on its tag."""
        now = time.monotonic()
        if self.fenced or (not force and now - self._fence_at < defaults.FENCE_CHECK_EVERY):
            return
        self._fence_at = now
        record = fences.read(self.storage, self.tenant, self.disk)
        if isinstance(record, str):
            log.error("disk %s: ignoring its fence record: %s", self.disk, record)
            record = None
        if record is not None and self.fence is None:
            log.info("disk %s: will be fenced at tag %s", self.disk, record["tag"].get("id"))
        self.fence = record
        fenced = self._fence_reached(self.cursor.last_tag)
        if fenced is not None:
            self._save(dataclasses.replace(self.cursor, fenced=fenced))
            self._fenced_now()

    def _fence_reached(self, tag: dict[str, Any] | None) -> dict[str, Any] | None:
        """The ``fenced`` record if ``tag`` is the disk's last tag (final, or the fence's)."""
        if not tag:
            return None
        resumed = (self.cursor.resumed or {}).get("tag")
        if tag.get("final") and tag.get("id") != resumed:
            return {"tag": tag, "reason": "final tag (cutover)", "at": time.time()}
        wanted = (self.fence or {}).get("tag") or {}
        if wanted.get("id") not in (None, resumed) and tag.get("id") == wanted.get("id"):
            reason = (self.fence or {}).get("reason") or "fence record"
            return {"tag": tag, "reason": reason, "at": time.time()}
        return None

    def _past_fence(self, gen: int, end: int) -> bool:
        """True (and the disk fenced where it stands) if the group closing at ``end`` is newer
        than the fence's tag: the fence's own tag can no longer arrive in order."""
        wanted = (self.fence or {}).get("tag") or {}
        tag = self.staging.tag(gen, end) or {}
        t0, fence_t0 = tag.get("t0_mono_ns"), wanted.get("t0_mono_ns")
        if not (isinstance(t0, int) and isinstance(fence_t0, int)):
            return False
        if tag.get("id") == wanted.get("id") or t0 <= fence_t0:
            return False
        reason = (
            f"group gen {gen} up to seq {end} closes with tag {tag.get('id')}, newer than the "
            f"fence's tag {wanted.get('id')}, which never arrived; refused it"
        )
        self._save(dataclasses.replace(
            self.cursor, fenced={"tag": self.cursor.last_tag, "reason": reason, "at": time.time()}
        ))  # fmt: skip
        log.error("disk %s: %s", self.disk, reason)
        self._fenced_now()
        return True

    def _fenced_now(self) -> None:
        f = self.cursor.fenced or {}
        log.info(
            "disk %s: fenced at tag %s (%s); nothing after it is applied",
            self.disk,
            (f.get("tag") or {}).get("id"),
            f.get("reason"),
        )

    # -- state ---------------------------------------------------------------------------

    def _save(self, cursor: cursors.Cursor) -> None:
        cursors.save(self.cursor_path, cursor)
        self.cursor = cursor
        self._changed = True
        self._stale_possible = True

    def state(self) -> dict[str, Any]:
        """The disk's applied state as published in its state blob and status.json."""
        c = self.cursor
        return {
            "tenant": self.tenant,
            "disk": self.disk,
            "gen": c.gen,
            "applied_seq": c.applied_seq,
            "last_tag": c.last_tag,
            "applied_at": c.applied_at,
            "staged": len(self.staging),
            "staged_bytes": self.staging.total_bytes,
            "resync_required_gen": c.resync_required_gen,
            "reason": c.reason,
            "bytes_applied": c.bytes_applied,
            "fenced": c.fenced,
            "held": self.held,
            "journal": self.journal.state(dataclasses.asdict(c)),
            "verify": self.verify.summary(),
            "updated_at": time.time(),
        }

    def publish(self, force: bool = False, at_once: bool = False) -> None:
        """Write status.json and the state blob when something changed or they are due.

        ``force`` (something changed) writes the blob at most every ``STATE_MIN_INTERVAL``
        unless what changed must reach readers at once; ``at_once`` writes it now (a stop).
        """
        now = time.monotonic()
        board = self.board is not None and (
            force or at_once or now - self._status_at >= defaults.STATUS_INTERVAL
        )
        c = self.cursor
        what = (c.gen, c.resync_required_gen, c.fenced is not None, self.held)
        put = (
            at_once
            or now - self._state_at >= defaults.STATE_INTERVAL
            or (
                force
                and (what != self._published or now - self._state_at >= defaults.STATE_MIN_INTERVAL)
            )
        )  # a change not yet due stays _changed: a later round (at most 0.25 s on) writes it
        if not (board or put):
            return  # the state (the journal's points among it) is made only when it is written
        state = self.state()
        if board:
            assert self.board is not None
            self.board.update(self.disk, state)
            self._status_at = now
        if put:
            blob = naming.disk_state_blob(self.tenant, self.disk)
            self.storage.put_json(self.control, blob, state)
            self._state_at = now
            self._changed = False
            self._published = what

    def _check_owner(self) -> None:
        if self.ownership is not None:
            self.ownership.check()
