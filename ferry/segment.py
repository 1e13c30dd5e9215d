"""Segment format: one batch, compressed, checksummed, optionally encrypted.

Layout (all integers big-endian)::

    magic     8 bytes  b"FERRYSG1"
    hlen      u32      length of the header
    header    hlen     canonical JSON of Batch.header() plus "raw_len"
    flags     u8       bit 0: body is zstd, bit 1: body is AEAD-sealed,
                       bit 3: the AEAD is AEGIS-256, else bit 2: AES-256-GCM,
                       else ChaCha20-Poly1305
    blen      u64      length of the body
    body      blen     zstd(payload), or nonce || AEAD(zstd(payload)) (a nonce
                       of 32 bytes for AEGIS-256, else 12)
    checksum  16 bytes xxh3-128 of every byte before it

The AEAD's associated data is the header bytes, which name tenant, disk,
generation and sequence: a segment cannot be replayed under another name.
Process servers seal with AEGIS-256 (:mod:`ferry.aegis`), or AES-256-GCM
where they are set to (``cipher``); segments sealed with AES-256-GCM or
ChaCha20-Poly1305 (by older process servers) still open.  The nonce is
synthetic (a keyed BLAKE3 hash of header and body, :func:`_nonce`), so the
same batch packed again is the same segment byte for byte.
A sealed segment's header also names its key (``key_id``, a hash of the key,
never the key), so a master target holding several keys of a tenant (a
rotation in flight) opens each segment with the key it was sealed with.
Segments are sealed by default; a reader refuses an unsealed one unless it
was told to accept them (``allow_unsealed``).
A reader MUST verify the checksum, then the expected identity, then the AEAD
tag, before it trusts any byte; :func:`unpack` does all three.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xxhash
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from ferry.aegis import AEGIS256
from ferry.batch import Batch, contiguous
from ferry.errors import SegmentCorrupt

MAGIC = b"FERRYSG1"
FLAG_ZSTD = 1
FLAG_SEALED = 2
FLAG_AES = 4
"""With FLAG_SEALED and not FLAG_AEGIS: sealed with AES-256-GCM; without it, ChaCha20-Poly1305."""
FLAG_AEGIS = 8
"""With FLAG_SEALED: sealed with AEGIS-256."""
CIPHERS: dict[str, tuple[int, Callable[[bytes], Any], int]] = {
    "aegis-256": (FLAG_AEGIS, AEGIS256, 32),
    "aes-256-gcm": (FLAG_AES, AESGCM, 12),
}
"""What a process server may seal with (its ``cipher``): flag, AEAD and nonce length."""
CIPHER = "aegis-256"
_HEAD = struct.Struct(">8sI")
_BODY = struct.Struct(">BQ")
_SUM = 16
KEY_BYTES = 32
"""Length of a segment encryption key (AEGIS-256 and AES-256-GCM; ChaCha20-Poly1305 before)."""

Keys = bytes | dict[str, bytes] | None
"""What a reader holds: one key, several by :func:`key_id` (a rotation), or none."""


class UnknownKey(SegmentCorrupt):
    """segment {name} is corrupt: {why}"""


def _nonce(key: bytes, hbytes: bytes, body: bytes, size: int) -> bytes:
    """The nonce: a keyed hash of what is sealed (synthetic IV).

    The same batch packed again (a process server restarted before it knew
    its upload and notice were done) is the same segment byte for byte, so
    a notice of the first upload still matches the blob; two different
    segments get the same nonce only if keyed BLAKE3 collides in ``size`` bytes
    (12 for AES-256-GCM, 32 for AEGIS-256).
    BLAKE3 rather than HMAC-SHA256: it costs a process server 0.17 CPU s per
    GiB here against 0.6 (docs/performance.md, round seven).  Imported here:
    only a process server seals (blake3 is in its extra alone).
    """
    import blake3

    h = blake3.blake3(_HLEN.pack(len(hbytes)), key=_nonce_key(key))
    h.update(hbytes)
    h.update(body)
    return h.digest(size)


_HLEN = struct.Struct(">I")


@functools.lru_cache(maxsize=8)
def _nonce_key(key: bytes) -> bytes:
    """The key of :func:`_nonce`, derived from the segment key (BLAKE3's key derivation)."""
    import blake3

    return blake3.blake3(key, derive_key_context="ferry 2026 segment nonce").digest()


def key_id(key: bytes) -> str:
    """A key's public name in segment headers: 16 hex digits of a hash of it."""
    return hashlib.sha256(b"ferry segment key\0" + key).hexdigest()[:16]


def keyring(*keys: bytes | None) -> dict[str, bytes]:
    """The keys given (None skipped), by :func:`key_id`."""
    return {key_id(k): k for k in keys if k is not None}


def pack(
    batch: Batch, key: bytes | None = None, level: int = 1, cipher: str = CIPHER
) -> tuple[bytes, str]:
    """Encode ``batch`` as a segment, sealed with ``cipher`` (:data:`CIPHERS`) if a ``key``
    is given; return ``(segment bytes, checksum hex)``."""
    header = batch.header()
    header["raw_len"] = len(batch.payload)
    if key is not None:
        header["key_id"] = key_id(key)
    hbytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    body = [_compressor(level).compress(contiguous(batch.payload))]
    flags = FLAG_ZSTD
    if key is not None:
        flag, aead, nonce_size = CIPHERS[cipher]
        nonce = _nonce(key, hbytes, body[0], nonce_size)
        body = [nonce, aead(key).encrypt(nonce, body[0], hbytes)]
        flags |= FLAG_SEALED | flag
    blen = sum(len(part) for part in body)
    parts = [_HEAD.pack(MAGIC, len(hbytes)), hbytes, _BODY.pack(flags, blen), *body]
    digest = xxhash.xxh3_128()
    for part in parts:
        digest.update(part)
    checksum = digest.digest()
    return b"".join([*parts, checksum]), checksum.hex()  # the one copy of the body


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's compressor for ``level``: a zstd context is reused, not made per segment."""
    made = getattr(_local, "compressors", None)
    if made is None:
        made = _local.compressors = {}
    if level not in made:
        made[level] = zstandard.ZstdCompressor(level=level)
    return made[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor (see :func:`_compressor`)."""
    made = getattr(_local, "decompressor", None)
    if made is None:
        made = _local.decompressor = zstandard.ZstdDecompressor()
    return made


@dataclasses.dataclass
class Opened:
    """A segment whose checksum, identity and authentication held (:func:`open_verified`).

    ``body`` is its still-compressed payload, in the clear: :func:`decode` only
    decompresses it.  A reader that keeps an Opened (the master target between
    staging and apply) need not check, read or decrypt the segment again.
    """

    name: str
    header: dict
    body: bytes | memoryview
    flags: int


def unpack(
    data: bytes,
    name: str,
    expect: dict[str, object] | None = None,
    key: Keys = None,
    checksum: str | None = None,
    allow_unsealed: bool | None = None,
) -> Batch:
    """Verify and decode a segment; raise SegmentCorrupt naming ``name`` on any defect.

    ``expect`` maps header fields (tenant, disk, gen, seq) to the values the
    notice promised; ``checksum`` is the notice's checksum hex.  ``key`` is
    one key or a keyring (:func:`keyring`); a sealed segment needs the key it
    names (UnknownKey otherwise).  An unsealed segment is accepted only with
    ``allow_unsealed`` (by default: only when no key is given).
    """
    return decode(open_verified(data, name, expect, key, checksum, allow_unsealed))


def verify(
    data: bytes,
    name: str,
    expect: dict[str, object] | None = None,
    key: Keys = None,
    checksum: str | None = None,
    allow_unsealed: bool | None = None,
) -> dict:
    """Check a segment as :func:`unpack` does, short of decompressing it; return its header."""
    return open_verified(data, name, expect, key, checksum, allow_unsealed).header


def open_verified(
    data: bytes,
    name: str,
    expect: dict[str, object] | None = None,
    key: Keys = None,
    checksum: str | None = None,
    allow_unsealed: bool | None = None,
) -> Opened:
    """Check a segment as :func:`unpack` does, short of decompressing it.

    Checksum, identity and authentication are all checked, and the extents
    must add up to the header's ``raw_len``: what is left for :func:`decode`
    is only zstd's own framing.
    """
    header, body, flags = _open_segment(data, name, expect, key, checksum, allow_unsealed)
    raw_len = header.get("raw_len")
    if not isinstance(raw_len, int) or raw_len < 0:
        raise SegmentCorrupt(name=name, why="header lacks raw_len")
    try:
        Batch.from_header(header, b"", payload_len=raw_len)
    except ValueError as exc:
        raise SegmentCorrupt(name=name, why=str(exc))
    return Opened(name, header, body, flags)


def decode(opened: Opened, into: Callable[[int], memoryview | None] | None = None) -> Batch:
    """The batch of a verified segment: decompress its body; SegmentCorrupt if that fails.

    The payload is decompressed into what ``into`` gives for its length (e.g.
    a reused buffer, ``ferry.blockio.BufferPool.view``), else into new bytes.
    """
    payload = _decompress(opened.body, opened.flags, opened.header, opened.name, into)
    try:
        return Batch.from_header(opened.header, payload)
    except ValueError as exc:
        raise SegmentCorrupt(name=opened.name, why=str(exc))


def peek(data: bytes | memoryview, name: str) -> tuple[dict, str]:
    """A segment's header and checksum hex, once its checksum and framing held.

    No key is needed and nothing is decrypted: what a process server checks of
    a segment it spooled itself before uploading it (the master target still
    checks everything, :func:`open_verified`).  SegmentCorrupt on any defect.
    """
    header, _hbytes, _body, _flags, checksum = _frame(data, name, None, None)
    return header, checksum


def _frame(
    data: bytes | memoryview, name: str, expect: dict[str, object] | None, checksum: str | None
) -> tuple[dict, bytes, memoryview, int, str]:
    """Checksum and framing checked: ``(header, header bytes, body, flags, checksum hex)``."""
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
    body = view[bstart : bstart + blen]  # no copy: decrypt and zstd read views
    return header, hbytes, body, flags, actual.hex()


def _open_segment(
    data: bytes,
    name: str,
    expect: dict[str, object] | None,
    key: Keys,
    checksum: str | None,
    allow_unsealed: bool | None = None,
) -> tuple[dict, bytes | memoryview, int]:
    header, hbytes, body, flags, _sum = _frame(data, name, expect, checksum)
    keys = keyring(key) if isinstance(key, bytes) else dict(key or {})
    allow = not keys if allow_unsealed is None else allow_unsealed
    return header, _open(body, flags, hbytes, header, keys, allow, name), flags


def _open(
    body: memoryview, flags: int, hbytes: bytes, header: dict, keys: dict[str, bytes], allow: bool,
    name: str,
) -> bytes | memoryview:  # fmt: skip
    if not flags & FLAG_SEALED:
        if not allow:
            raise SegmentCorrupt(name=name, why="segment is not encrypted and authenticated, "
                                 "and unsealed segments are refused (allow_unsealed is off)")  # fmt: skip
        return body
    if not keys:
        raise SegmentCorrupt(name=name, why="segment is encrypted but no key is configured")
    named = header.get("key_id")
    if named is None:  # sealed before segments named their key: try each
        candidates = list(keys.values())
    elif named in keys:
        candidates = [keys[named]]
    else:
        raise UnknownKey(name=name, why=f"segment is sealed with key {named}, not one held here")
    if flags & (FLAG_AEGIS | FLAG_AES):
        _, aead, nonce_size = CIPHERS["aegis-256" if flags & FLAG_AEGIS else "aes-256-gcm"]
    else:  # sealed by a process server of an earlier version
        aead, nonce_size = ChaCha20Poly1305, 12
    for key in candidates:
        try:
            return aead(key).decrypt(body[:nonce_size], body[nonce_size:], hbytes)
        except (InvalidTag, ValueError):
            continue
    raise SegmentCorrupt(name=name, why="authentication failed")


def _decompress(
    body: bytes | memoryview,
    flags: int,
    header: dict,
    name: str,
    into: Callable[[int], memoryview | None] | None = None,
) -> bytes | memoryview:
    raw_len = header.get("raw_len")
    if not isinstance(raw_len, int) or raw_len < 0:
        raise SegmentCorrupt(name=name, why="header lacks raw_len")
    if not flags & FLAG_ZSTD:
        return _check_length(bytes(body), raw_len, name)
    out = into(raw_len) if into is not None and raw_len else None
    try:
        if out is not None:
            return _check_length(out, _decompress_into(body, out), name)
        payload = _decompressor().decompress(body, max_output_size=raw_len)
    except zstandard.ZstdError as exc:
        raise SegmentCorrupt(name=name, why=f"cannot decompress ({exc})")
    return _check_length(payload, raw_len, name)


def _decompress_into(body: bytes | memoryview, out: memoryview) -> int:
    """Decompress ``body`` into ``out``; the bytes it decompresses to (``len(out)`` + 1 if more)."""
    reader = _decompressor().stream_reader(body, read_across_frames=True)
    got = 0
    while got < len(out):
        n = reader.readinto(out[got:])
        if not n:
            return got
        got += n
    return got + len(reader.read(1))


def _check_length(payload: bytes | memoryview, length: int, name: str) -> bytes | memoryview:
    if len(payload) != length:
        raise SegmentCorrupt(name=name, why="payload length differs from the header")
    return payload


def load_key(path: str | None) -> bytes | None:
    """Read a segment key file (64 hex characters); None when no path is set."""
    if not path:
        return None
    from ferry.errors import ConfigError

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(path=path, problem=f"cannot read the segment key ({exc})")
    return parse_key(text, path)


def parse_key(text: str, where: str) -> bytes:
    """A segment key from its 64 hex digits; ConfigError naming ``where`` if it is not one."""
    from ferry.errors import ConfigError

    try:
        key = bytes.fromhex(text.strip())
    except ValueError as exc:
        raise ConfigError(path=where, problem=f"cannot read the segment key ({exc})")
    if len(key) != KEY_BYTES:
        raise ConfigError(path=where, problem=f"segment key must be {KEY_BYTES} bytes in hex")
    return key
