"""Segments verified at staging, kept in memory until their group is applied.

Staging verifies a segment (checksum, identity, authentication: invariant 7)
and writes it durably; applying it used to read the staged file back, check
its checksum twice and decrypt it again before decompressing.  The segment
verified in memory is the very bytes staged, so applying from it is the
same as applying the file: only what did not fit under the bound, or what a
restart left staged, is read from disk and checked there.  The staged file
stays the durable copy a crash replays from.
"""

from __future__ import annotations

from ferry import segment


class Verified:
    """Opened segments by ``(gen, seq)``, at most ``limit`` bytes of bodies."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bytes = 0
        self._kept: dict[tuple[int, int], segment.Opened] = {}

    def keep(self, gen: int, seq: int, opened: segment.Opened) -> None:
        """Keep a verified segment unless that would pass the bound (its file serves then)."""
        size = len(opened.body)
        if (gen, seq) in self._kept or self.bytes + size > self.limit:
            return
        self._kept[(gen, seq)] = opened
        self.bytes += size

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self._kept

    def take(self, gen: int, seq: int) -> segment.Opened | None:
        """The kept segment of ``(gen, seq)``, forgotten here; None if not kept."""
        opened = self._kept.pop((gen, seq), None)
        if opened is not None:
            self.bytes -= len(opened.body)
        return opened

    def forget(self, stale) -> None:
        """Forget every segment for which ``stale(gen, seq)`` is true (after a cursor move)."""
        for key in [k for k in self._kept if stale(*k)]:
            self.take(*key)
