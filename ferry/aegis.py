"""AEGIS-256 (libsodium's, through PyNaCl): the cipher of Ferry's records and sealed segments.

AEGIS-256 is an authenticated cipher built on the AES round function
(draft-irtf-cfrg-aegis-aead; libsodium since 1.0.19): a 256-bit key, a
256-bit nonce and a 256-bit tag. On this project's hosts it seals and opens
at about 8 GiB/s on one core where AES-256-GCM (cryptography's OpenSSL)
runs at about 3.3 (``docs/performance.md``, round seventeen), and a stream
of 1.1 GiB crosses two of them per initial sync (the agent seals, the
process server opens).

:class:`AEGIS256` has the methods of cryptography's AEAD classes
(``encrypt``, ``decrypt``, ``encrypt_into``, ``decrypt_into``; the tag
follows the ciphertext; a forgery raises cryptography's ``InvalidTag``), so
a caller picks a cipher and treats both alike.

Why PyNaCl's cffi module and not its public functions: those take ``bytes``
and return new ``bytes``, so every 1 MiB record would be copied in and its
output allocated afresh (0.8 GiB/s measured, against 8.3 through the same
library functions on the caller's buffers). The calls release the GIL.
"""

from __future__ import annotations

from typing import Any

from cryptography.exceptions import InvalidTag
from nacl._sodium import ffi, lib

KEY = 32
NONCE = 32
TAG = 32

if lib.sodium_init() < 0:  # picks the AES-NI implementation; safe to call more than once
    raise ImportError("libsodium could not be initialised")


class AEGIS256:
    """AEGIS-256 under one key; the methods of cryptography's ``AESGCM``."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY:
            raise ValueError(f"AEGIS-256 key must be {KEY} bytes")
        self._key = bytes(key)

    def encrypt(self, nonce: bytes, data: Any, associated_data: bytes | None) -> bytearray:
        """``data`` sealed: its ciphertext, then the tag."""
        out = bytearray(len(memoryview(data).cast("B")) + TAG)
        self.encrypt_into(nonce, data, associated_data, out)
        return out

    def decrypt(self, nonce: bytes, data: Any, associated_data: bytes | None) -> bytearray:
        """``data`` opened; ``InvalidTag`` if it, the nonce or the associated data changed."""
        size = len(memoryview(data).cast("B")) - TAG
        if size < 0:
            raise InvalidTag
        out = bytearray(size)
        self.decrypt_into(nonce, data, associated_data, out)
        return out

    def encrypt_into(self, nonce: bytes, data: Any, associated_data: Any, buf: Any) -> int:
        """Seal ``data`` into ``buf`` (exactly ``len(data) + TAG`` bytes); the bytes written."""
        src = memoryview(data).cast("B")
        out = memoryview(buf).cast("B")
        if len(out) != len(src) + TAG:
            raise ValueError(f"buffer must be {len(src) + TAG} bytes")
        ad, adlen = _ad(associated_data)
        lib.crypto_aead_aegis256_encrypt(
            ffi.from_buffer(out, require_writable=True), ffi.NULL,
            ffi.from_buffer(src), len(src), ad, adlen, ffi.NULL, _nonce(nonce), self._key,
        )  # fmt: skip
        return len(out)

    def decrypt_into(self, nonce: bytes, data: Any, associated_data: Any, buf: Any) -> int:
        """Open ``data`` into ``buf`` (exactly ``len(data) - TAG`` bytes); the bytes written.

        ``InvalidTag`` if anything changed; ``buf`` then holds zeros, never unverified bytes.
        """
        src = memoryview(data).cast("B")
        out = memoryview(buf).cast("B")
        if len(src) < TAG:
            raise InvalidTag
        if len(out) != len(src) - TAG:
            raise ValueError(f"buffer must be {len(src) - TAG} bytes")
        ad, adlen = _ad(associated_data)
        failed = lib.crypto_aead_aegis256_decrypt(
            ffi.from_buffer(out, require_writable=True), ffi.NULL, ffi.NULL,
            ffi.from_buffer(src), len(src), ad, adlen, _nonce(nonce), self._key,
        )  # fmt: skip
        if failed:
            raise InvalidTag
        return len(out)


def _nonce(nonce: bytes) -> bytes:
    if len(nonce) != NONCE:
        raise ValueError(f"AEGIS-256 nonce must be {NONCE} bytes")
    return bytes(nonce)


def _ad(associated_data: Any) -> tuple[Any, int]:
    if not associated_data:
        return ffi.NULL, 0
    view = memoryview(associated_data).cast("B")
    return ffi.from_buffer(view), len(view)
