"""AEGIS-256 through ferry.aegis: the draft's test vector, cryptography's AEAD methods on
buffers of every kind, and a forgery refused without one unverified byte handed out."""

from __future__ import annotations

import os

import pytest
from cryptography.exceptions import InvalidTag

from ferry.aegis import AEGIS256, NONCE, TAG

# draft-irtf-cfrg-aegis-aead, appendix A.3 (AEGIS-256), test vector 1: a 256-bit tag.
KEY = bytes.fromhex("1001" + "00" * 30)
VECTOR_NONCE = bytes.fromhex("100002" + "00" * 29)
SEALED = bytes.fromhex(
    "754fc3d8c973246dcc6d741412a4b236"  # ciphertext of 16 zero bytes
    "1181a1d18091082bf0266f66297d167d2e68b845f61a3b0527d31fc7b7b89f13"  # tag
)


def test_the_drafts_test_vector():
    aead = AEGIS256(KEY)
    assert bytes(aead.encrypt(VECTOR_NONCE, bytes(16), b"")) == SEALED
    assert bytes(aead.decrypt(VECTOR_NONCE, SEALED, None)) == bytes(16)


@pytest.mark.parametrize("size", [0, 1, 31, 32, 33, 4096, (1 << 20) + 5])
def test_what_is_sealed_opens_as_it_was_from_any_buffer(size):
    aead, nonce, data = AEGIS256(os.urandom(32)), os.urandom(NONCE), os.urandom(size)
    sealed = aead.encrypt(nonce, memoryview(data), b"header")
    assert len(sealed) == size + TAG
    into = bytearray(size + TAG + 7)  # a slice of a larger buffer, as the records use
    assert (
        aead.encrypt_into(
            nonce, bytearray(data), memoryview(b"header"), memoryview(into)[3 : 3 + size + TAG]
        )
        == size + TAG
    )
    assert into[3 : 3 + size + TAG] == sealed
    assert aead.decrypt(nonce, bytes(sealed), b"header") == data
    out = bytearray(size)
    assert aead.decrypt_into(nonce, memoryview(sealed), b"header", out) == size
    assert out == data


@pytest.mark.parametrize(
    "change", ["ciphertext", "tag", "nonce", "associated data", "key", "short"]
)
def test_a_change_is_refused_and_nothing_unverified_is_handed_out(change):
    key, nonce, data = os.urandom(32), os.urandom(NONCE), os.urandom(1000)
    sealed = bytearray(AEGIS256(key).encrypt(nonce, data, b"header"))
    ad = b"header"
    if change == "ciphertext":
        sealed[10] ^= 1
    elif change == "tag":
        sealed[-1] ^= 0x80
    elif change == "nonce":
        nonce = nonce[:-1] + bytes([nonce[-1] ^ 1])
    elif change == "associated data":
        ad = b"headex"
    elif change == "key":
        key = os.urandom(32)
    elif change == "short":
        sealed = sealed[: TAG - 1]
    out = bytearray(b"\xff" * max(len(sealed) - TAG, 0))
    with pytest.raises(InvalidTag):
        AEGIS256(key).decrypt_into(nonce, sealed, ad, out)
    assert out == bytes(len(out))  # zeros, not the bytes that failed
    with pytest.raises(InvalidTag):
        AEGIS256(key).decrypt(nonce, sealed, ad)


def test_wrong_sizes_are_refused():
    aead = AEGIS256(os.urandom(32))
    with pytest.raises(ValueError, match="key must be 32"):
        AEGIS256(os.urandom(16))
    with pytest.raises(ValueError, match="nonce must be 32"):
        aead.encrypt(os.urandom(12), b"data", None)
    with pytest.raises(ValueError, match="buffer must be"):
        aead.encrypt_into(os.urandom(NONCE), b"data", None, bytearray(4 + TAG - 1))
    with pytest.raises(ValueError, match="buffer must be"):
        aead.decrypt_into(os.urandom(NONCE), bytes(4 + TAG), None, bytearray(5))
