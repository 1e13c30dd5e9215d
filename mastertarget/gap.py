"""Finding a batch whose notice never came: the gap watch.

Queues deliver at least once, yet a notice can still go missing: deleted by
mistake or by a faulty tool, or expired (Azure keeps a message seven days by
default, so a master target down longer loses every notice of that time).
Without its notice the next batch is never staged, and the disk waits on the
gap forever while later batches pile up.  Segment blob names are
deterministic (``ferry.naming.segment_blob``), so a gap that stays the same
for ``after`` seconds, however many batches arrive behind it, is looked up
by name: one GET, which finds the blob if the process server uploaded it
(it uploads before it announces).  An idle disk's "gap" is the batch after
its last: one GET that finds nothing every ``after`` seconds.
"""

from __future__ import annotations

import time

from mastertarget.staging import Staging


class GapWatch:
    """Says when the first missing batch after the cursor has been missing long enough."""

    def __init__(self, after: float) -> None:
        self.after = after
        self._gap: tuple[int, int] | None = None
        self._since = 0.0

    def due(self, gen: int, applied_seq: int, staging: Staging) -> int | None:
        """The seq to look up by name now, or None (no gap, or not for long enough yet).

        The gap is the first seq after ``applied_seq`` of ``gen`` that is not
        staged; batches staged behind it do not make it any younger (under
        steady writes they always arrive).  After a look-up the wait starts again.
        """
        seq = applied_seq + 1
        while (gen, seq) in staging:
            seq += 1
        gap, now = (gen, seq), time.monotonic()
        if gap != self._gap:
            self._gap, self._since = gap, now
        if now - self._since < self.after:
            return None
        self._since = now
        return seq
