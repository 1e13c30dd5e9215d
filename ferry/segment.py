"""Segment format: one batch, compressed, checksummed, optionally encrypted.

Layout (all integers big-endian)::

    magic     8 bytes  b"FERRYSG1"
    hlen      u32      length of the header
    header    hlen     canonical JSON of Batch.header() plus "raw_len"
    flags     u8       bit 0: body is zstd, bit 1: body is AEAD-sealed
    blen      u64      length of the body
    body      blen     zstd(payload), or nonce(12) || ChaCha20-Poly1305(zstd(payload))
    checksum  16 bytes xxh3-128 of every byte before it

The AEAD's associated data is the header bytes, which name tenant, disk,
generation and sequence: a segment cannot be replayed under another name.
A reader MUST verify the checksum, then the expected identity, then the AEAD
tag, before it trusts any byte; :func:`unpack` does all three.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import xxhash
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ferry.batch import Batch
from ferry.errors import SegmentCorrupt

MAGIC = b"FERRYSG1"
FLAG_ZSTD = 1
FLAG_SEALED = 2
_HEAD = struct.Struct(">8sI")
_BODY = struct.Struct(">BQ")
_SUM = 16
KEY_BYTES = 32
"""Length of a segment encryption key (ChaCha20-Poly1305)."""


def pack(batch: Batch, key: bytes | None = None, level: int = 1) -> tuple[bytes, str]:
    """Encode ``batch`` as a segment; return ``(segment bytes, checksum hex)``."""
    header = batch.header()
    header["raw_len"] = len(batch.payload)
    hbytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    body = zstandard.ZstdCompressor(level=level).compress(batch.payload)
    flags = FLAG_ZSTD
    if key is not None:
        nonce = os.urandom(12)
        body = nonce + ChaCha20Poly1305(key).encrypt(nonce, body, hbytes)
        flags |= FLAG_SEALED
    parts = [_HEAD.pack(MAGIC, len(hbytes)), hbytes, _BODY.pack(flags, len(body)), body]
    digest = xxhash.xxh3_128()
    for part in parts:
        digest.update(part)
    checksum = digest.digest()
    return b"".join(parts) + checksum, checksum.hex()


def unpack(
    data: bytes,
    name: str,
    expect: dict[str, object] | None = None,
    key: bytes | None = None,
    checksum: str | None = None,
) -> Batch:
    """Verify and decode a segment; raise SegmentCorrupt naming ``name`` on any defect.

    ``expect`` maps header fields (tenant, disk, gen, seq) to the values the
    notice promised; ``checksum`` is the notice's checksum hex.  With ``key``
    the segment MUST be sealed, without it it MUST NOT be.
    """
    header, body, flags = _open_segment(data, name, expect, key, checksum)
    payload = _decompress(body, flags, header, name)
    try:
        return Batch.from_header(header, payload)
    except ValueError as exc:
        raise SegmentCorrupt(name=name, why=str(exc))


def verify(
    data: bytes,
    name: str,
    expect: dict[str, object] | None = None,
    key: bytes | None = None,
    checksum: str | None = None,
) -> dict:
    """Check a segment as :func:`unpack` does, short of decompressing it; return its header.

    Checksum, identity and authentication are all checked, and the extents
    must add up to the header's ``raw_len``: what is left for the reader who
    later unpacks it is only zstd's own framing.
    """
    header, _, _ = _open_segment(data, name, expect, key, checksum)
    raw_len = header.get("raw_len")
    if not isinstance(raw_len, int) or raw_len < 0:
        raise SegmentCorrupt(name=name, why="header lacks raw_len")
    try:
        Batch.from_header(header, b"", payload_len=raw_len)
    except ValueError as exc:
        raise SegmentCorrupt(name=name, why=str(exc))
    return header


def _open_segment(
    data: bytes,
    name: str,
    expect: dict[str, object] | None,
    key: bytes | None,
    checksum: str | None,
) -> tuple[dict, bytes, int]:
    view = memoryview(data)
    if len(view) < _HEAD.size + _BODY.size + _SUM:
        raise SegmentCorrupt(name=name, why=f"truncated ({len(view)} bytes)")
    actual = xxhash.xxh3_128(view[:-_SUM]).digest()
    if actual != bytes(view[-_SUM:]):
        raise SegmentCorrupt(name=name, why="checksum mismatch")
    if checksum is not None and checksum != actual.hex():
        raise SegmentCorrupt(name=name, why="checksum differs from the notice")
    magic, hlen = _HEAD.unpack_from(view, 0)
    if magic != MAGIC:
        raise SegmentCorrupt(name=name, why="bad magic")
    hstart = _HEAD.size
    bstart = hstart + hlen + _BODY.size
    if bstart > len(view) - _SUM:
        raise SegmentCorrupt(name=name, why="header runs past the end")
    hbytes = bytes(view[hstart : hstart + hlen])
    flags, blen = _BODY.unpack_from(view, hstart + hlen)
    if bstart + blen != len(view) - _SUM:
        raise SegmentCorrupt(name=name, why="body length does not match")
    try:
        header = json.loads(hbytes)
    except ValueError:
        raise SegmentCorrupt(name=name, why="header is not JSON")
    if not isinstance(header, dict):
        raise SegmentCorrupt(name=name, why="header is not an object")
    for field, value in (expect or {}).items():
        if header.get(field) != value:
            raise SegmentCorrupt(
                name=name, why=f"{field} is {header.get(field)!r}, expected {value!r}"
            )
    body = bytes(view[bstart : bstart + blen])
    return header, _open(body, flags, hbytes, key, name), flags


def _open(body: bytes, flags: int, hbytes: bytes, key: bytes | None, name: str) -> bytes:
    sealed = bool(flags & FLAG_SEALED)
    if not sealed:
        if key is not None:
            raise SegmentCorrupt(name=name, why="segment is not encrypted but a key is configured")
        return body
    if key is None:
        raise SegmentCorrupt(name=name, why="segment is encrypted but no key is configured")
    try:
        return ChaCha20Poly1305(key).decrypt(body[:12], body[12:], hbytes)
    except (InvalidTag, ValueError):
        raise SegmentCorrupt(name=name, why="authentication failed")


def _decompress(body: bytes, flags: int, header: dict, name: str) -> bytes:
    raw_len = header.get("raw_len")
    if not isinstance(raw_len, int) or raw_len < 0:
        raise SegmentCorrupt(name=name, why="header lacks raw_len")
    if not flags & FLAG_ZSTD:
        payload = body
    else:
        try:
            payload = zstandard.ZstdDecompressor().decompress(body, max_output_size=raw_len)
        except zstandard.ZstdError as exc:
            raise SegmentCorrupt(name=name, why=f"cannot decompress ({exc})")
    if len(payload) != raw_len:
        raise SegmentCorrupt(name=name, why="payload length differs from the header")
    return payload


def load_key(path: str | None) -> bytes | None:
    """Read a segment key file (64 hex characters); None when no path is set."""
    if not path:
        return None
    from ferry.errors import ConfigError

    try:
        text = Path(path).read_text().strip()
        key = bytes.fromhex(text)
    except (OSError, ValueError) as exc:
        raise ConfigError(path=path, problem=f"cannot read the segment key ({exc})")
    if len(key) != KEY_BYTES:
        raise ConfigError(path=path, problem=f"segment key must be {KEY_BYTES} bytes in hex")
    return key
