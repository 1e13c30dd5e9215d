"""Online verify: the section a verify tag carries, and how its digests are compared.

The agent and the master target share this format (docs/design.md, "Online
verify"); neither copies the other's layout.  A verify compares a disk's
source and target range by range, each range at one tag: the agent digests
the range in the read pass that closes with the tag (the source as it was at
the tag's *t0*) and puts the digests in the tag, under ``"verify"``; the
master target digests the same range of the target once it has applied
exactly that tag, before the next group, and compares.  Example::

    "verify": {"id": "v-5f2c0a9b", "ranges": [[0, 67108864]], "block": 4096,
               "digests": "<base64: 16 bytes (xxh3-128) per block, in order>",
               "unsettled": [[812, 2]], "last": false, "repair": false}

``unsettled`` lists ``[first block, count]`` runs of the ranges whose digest
may not be the source at *t0* (a write to them was queued or completed
during the pass); they are left out of this comparison and checked again at
a later tag.  ``last`` closes the verify of this disk; the last section
also says how many blocks stayed unsettled through every try
(``unverified``).  Blocks are numbered from the start of the disk in units
of ``block`` bytes; the disk's last block may be short.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import Any

from ferry import blockio

KEY = "verify"
"""The key of the verify section in a tag."""

MAX_RANGES_REPORTED = 200
"""Differing ``[first, count]`` runs kept in a verify's report (the count is always whole)."""


def encode_digests(digests: Iterable[bytes]) -> str:
    """Digests (16 bytes each) as the section's ``digests`` text."""
    return base64.b64encode(b"".join(digests)).decode("ascii")


def decode_digests(text: str) -> list[bytes]:
    """The section's ``digests`` text as a list of 16-byte digests; ValueError if malformed."""
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    size = blockio.DIGEST_BYTES
    if len(raw) % size:
        raise ValueError(f"digests are {len(raw)} bytes, not a multiple of {size}")
    return [raw[i : i + size] for i in range(0, len(raw), size)]


def split(tag: dict[str, Any] | None) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """``(the tag without its verify section, the section or None)``.

    The section is large (a digest per block): it is never recorded with the
    tag (cursor, state, recovery points), only acted on once.
    """
    if not tag or KEY not in tag:
        return tag, None
    section = tag[KEY]
    return {k: v for k, v in tag.items() if k != KEY}, section if isinstance(
        section, dict
    ) else None


def blocks_of(ranges: list[list[int]], block: int) -> list[int]:
    """The block numbers the byte ``ranges`` cover, in order (ranges are block-aligned)."""
    out: list[int] = []
    for offset, length in ranges:
        first = offset // block
        out.extend(range(first, first + -(-length // block)))
    return out


def runs(blocks: Iterable[int]) -> list[list[int]]:
    """Sorted block numbers as ``[first, count]`` runs."""
    out: list[list[int]] = []
    for b in sorted(set(blocks)):
        if out and out[-1][0] + out[-1][1] == b:
            out[-1][1] += 1
        else:
            out.append([b, 1])
    return out


def expand(pairs: Iterable[Iterable[int]]) -> set[int]:
    """``[first, count]`` runs as a set of block numbers."""
    out: set[int] = set()
    for first, count in pairs:
        out.update(range(int(first), int(first) + int(count)))
    return out


def differing(
    blocks: list[int], source: list[bytes], target: list[bytes], unsettled: set[int]
) -> list[int]:
    """Blocks whose source and target digests differ, leaving out ``unsettled`` ones."""
    if not (len(blocks) == len(source) == len(target)):
        raise ValueError("blocks, source and target digests differ in number")
    return [
        b for b, s, t in zip(blocks, source, target, strict=True) if s != t and b not in unsettled
    ]


def problem(section: Any) -> str | None:
    """What is wrong with a verify section, or None."""
    if not isinstance(section, dict):
        return "not an object"
    if not isinstance(section.get("id"), str) or not section["id"]:
        return "no id"
    block = section.get("block")
    if not isinstance(block, int) or block < 512 or block % 512:
        return f"block is {block!r}"
    ranges = section.get("ranges")
    if not isinstance(ranges, list) or not all(
        isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) and x >= 0 for x in r)
        and r[0] % block == 0
        for r in ranges
    ):  # fmt: skip
        return "ranges must be [[offset, length], ...] aligned to block"
    if not isinstance(section.get("digests"), str):
        return "no digests"
    return None
