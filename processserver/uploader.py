"""Uploaders: spooled segment -> segment blob -> queue notice -> spool file deleted.

The order is invariant 6: the blob is written before the notice that names
it, and the spool file goes only after both.  A crash in between leaves the
file, which is uploaded (overwriting the same blob name) and announced again
after the restart; the master target skips a notice it has already applied.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ferry import naming
from ferry import notice as disk_notice
from ferry.batch import Batch
from ferry.errors import StorageUnavailable
from processserver import defaults
from processserver.context import Context
from processserver.health import Backoff
from processserver.spool import Spooled, SpoolKey

log = logging.getLogger("ferry.processserver.uploader")

CLAIM_WAIT = 0.5
"""How long an idle uploader waits for work before checking for a stop, in seconds."""


class TokenBucket:
    """A shared budget of ``rate`` bytes per second (0 = unlimited) for all uploaders.

    A caller takes what it is about to send and, if that overdraws the
    bucket, sleeps until the debt is repaid; later callers queue behind the
    debt, so the average never exceeds the rate however many threads upload.
    """

    def __init__(self, rate: int, burst_seconds: float = defaults.BUCKET_BURST) -> None:
        self.rate = rate
        self._capacity = rate * burst_seconds
        self._tokens = self._capacity
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def take(self, amount: int, stop: threading.Event) -> None:
        """Spend ``amount`` bytes, waiting as long as the rate requires (or until ``stop``)."""
        if self.rate <= 0:
            return
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= amount
            debt = -self._tokens
        if debt > 0:
            stop.wait(debt / self.rate)


def notice(item: Spooled) -> dict[str, Any]:
    """The queue message announcing a spooled segment (its format: ferry/notice.py)."""
    k = item.key
    return disk_notice.segment(
        k.tenant, k.disk, k.gen, k.seq, item.checksum, len(item.data), item.tag
    )


class _Upload:
    """A spooled segment, and how far its upload got."""

    def __init__(self, item: Spooled) -> None:
        self.item = item
        self.blob = naming.segment_blob(*item.key)
        self.stored = False
        self.failures = 0


class Uploader:
    """A pool of threads draining the spool into Blob Storage and the disks' queues."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.bucket = TokenBucket(ctx.settings.bandwidth_limit)
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start ``upload_threads`` threads."""
        for i in range(self.ctx.settings.upload_threads):
            thread = threading.Thread(target=self._run, name=f"upload-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the threads to end (after a stop); True if they did."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def _run(self) -> None:
        while not self.ctx.stopping.is_set():
            key = self.ctx.spool.claim(CLAIM_WAIT)
            if key is not None:
                self._process(key)
            self.ctx.trimmer.maybe()

    def _process(self, key: SpoolKey) -> None:
        """Upload and announce one claimed batch, retrying until it is done or we stop."""
        upload = self._load(key)
        if upload is None:
            return
        self.ctx.trimmer.used(upload.item.raw_len)
        backoff = Backoff()
        while True:
            if self._attempt(upload):
                self.ctx.spool.finish(key)
                return
            if self.ctx.stopping.wait(backoff.pause()):
                self.ctx.spool.release(key)  # still spooled: the next start uploads it
                return

    def _load(self, key: SpoolKey) -> _Upload | None:
        """A claimed batch's segment (a raw batch of an earlier version packed now);
        a damaged file is quarantined (None)."""
        try:
            item = self.ctx.spool.load(key)
        except (OSError, ValueError) as exc:
            self._quarantine(key, exc)
            return None
        if isinstance(item, Batch):
            settings = self.ctx.settings
            item = Spooled.pack(
                item, self.ctx.segment_key, settings.compression_level, settings.cipher
            )
        return _Upload(item)

    def _quarantine(self, key: SpoolKey, why: Exception) -> None:
        where = self.ctx.spool.quarantine(key)
        if where is None:
            return
        self.ctx.stats.add(batches_quarantined=1)
        # It was acknowledged, so the agent will not send it again: the master
        # target will wait for it until the disk is resynced.  Say so loudly.
        log.error(
            "spooled batch %s is unreadable (%s); moved it to %s; disk %s/%s needs a resync",
            key, why, where, key.tenant, key.disk,
        )  # fmt: skip

    def _attempt(self, upload: _Upload) -> bool:
        """One try at put + send; True when both are done."""
        ctx = self.ctx
        item, key = upload.item, upload.item.key
        try:
            if not upload.stored:
                self.bucket.take(len(item.data), ctx.stopping)
                ctx.storage.put(
                    naming.segments_container(key.tenant, key.disk), upload.blob, item.data
                )
                upload.stored = True
            ctx.storage.send(naming.disk_queue(key.tenant, key.disk), notice(item))
        except StorageUnavailable as exc:
            ctx.health.failed(f"uploading {upload.blob}", exc)
            return False
        except Exception as exc:  # a bug or a refusal (e.g. bad credentials): keep the file
            if not upload.failures:  # the traceback once, not on every retry
                log.exception("uploading %s failed", upload.blob)
            upload.failures += 1
            ctx.health.failed(f"uploading {upload.blob}", exc)
            return False
        ctx.health.succeeded()
        ctx.stats.add(
            segments_uploaded=1,
            bytes_uploaded_raw=item.raw_len,
            bytes_uploaded_compressed=len(item.data),
        )
        log.debug("uploaded and announced %s (%d bytes)", upload.blob, len(item.data))
        return True
