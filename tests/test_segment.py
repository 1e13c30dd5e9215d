"""The segment format: a round trip, and every corruption rejected."""

from __future__ import annotations

import base64
import os

import pytest
import xxhash

from ferry.batch import DATA, ZERO, Batch
from ferry.errors import SegmentCorrupt
from ferry.segment import (
    CIPHERS,
    FLAG_AEGIS,
    FLAG_AES,
    FLAG_SEALED,
    FLAG_ZSTD,
    UnknownKey,
    key_id,
    keyring,
    pack,
    unpack,
    verify,
)

KEY = bytes(range(32))


def sample(seq: int = 7) -> Batch:
    data = os.urandom(8192) + bytes(4096)
    return Batch(
        tenant="acme",
        disk="web01-disk0",
        gen=3,
        seq=seq,
        disk_size=1 << 30,
        extents=[(0, 8192, DATA), (1 << 20, 65536, ZERO), (2 << 20, 4096, DATA)],
        payload=data,
        tag={"id": "web01-1", "kind": "crash"},
    )


EXPECT = {"tenant": "acme", "disk": "web01-disk0", "gen": 3, "seq": 7}


@pytest.mark.parametrize(
    ("key", "cipher"),
    [(None, "aegis-256"), (KEY, "aegis-256"), (KEY, "aes-256-gcm")],
    ids=["plain", "sealed", "sealed-aes"],
)
def test_round_trip(key, cipher):
    batch = sample()
    data, checksum = pack(batch, key, cipher=cipher)
    back = unpack(data, "s", EXPECT, key=key, checksum=checksum)
    assert back == batch
    assert list(back.pieces())[1] == (1 << 20, None, 65536)


def test_zeros_compress():
    batch = Batch("acme", "d", 1, 1, 1 << 30, [(0, 1 << 20, DATA)], bytes(1 << 20))
    data, _ = pack(batch)
    assert len(data) < 4096


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "sealed"])
def test_truncated(key):
    data, _ = pack(sample(), key)
    for cut in (0, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(SegmentCorrupt, match="truncated|checksum"):
            unpack(data[:cut], "s", EXPECT, key=key)


@pytest.mark.parametrize(
    ("key", "cipher"),
    [(None, "aegis-256"), (KEY, "aegis-256"), (KEY, "aes-256-gcm")],
    ids=["plain", "sealed", "sealed-aes"],
)
def test_every_bit_flip_region(key, cipher):
    data, _ = pack(sample(), key, cipher=cipher)
    for pos in range(0, len(data), max(1, len(data) // 97)):
        bad = bytearray(data)
        bad[pos] ^= 0x10
        with pytest.raises(SegmentCorrupt):
            unpack(bytes(bad), "s", EXPECT, key=key)


@pytest.mark.parametrize("cipher", list(CIPHERS))
def test_flip_with_recomputed_checksum_fails_authentication(cipher):
    data, _ = pack(sample(), KEY, cipher=cipher)
    bad = bytearray(data)
    bad[-40] ^= 1  # inside the sealed body
    bad[-16:] = xxhash.xxh3_128(bytes(bad[:-16])).digest()
    with pytest.raises(SegmentCorrupt, match="authentication"):
        unpack(bytes(bad), "s", EXPECT, key=KEY)


def test_wrong_sequence_and_identity():
    data, _ = pack(sample(seq=8))
    with pytest.raises(SegmentCorrupt, match="seq is 8, expected 7"):
        unpack(data, "s", EXPECT)
    with pytest.raises(SegmentCorrupt, match="disk"):
        unpack(data, "s", {**EXPECT, "seq": 8, "disk": "other"})


def test_wrong_key_and_missing_key():
    data, _ = pack(sample(), KEY)
    with pytest.raises(UnknownKey, match=f"sealed with key {key_id(KEY)}, not one held here"):
        unpack(data, "s", EXPECT, key=bytes(32))
    with pytest.raises(SegmentCorrupt, match="no key"):
        unpack(data, "s", EXPECT)
    plain, _ = pack(sample())
    with pytest.raises(SegmentCorrupt, match="not encrypted"):
        unpack(plain, "s", EXPECT, key=KEY)
    with pytest.raises(SegmentCorrupt, match="allow_unsealed is off"):
        unpack(plain, "s", EXPECT, allow_unsealed=False)
    assert unpack(plain, "s", EXPECT, key=KEY, allow_unsealed=True).seq == 7


def test_a_keyring_opens_segments_of_each_key_and_a_forged_key_id_fails():
    old, new = KEY, bytes(range(100, 132))
    ring = keyring(old, new)
    for key in (old, new):
        data, _ = pack(sample(), key)
        assert unpack(data, "s", EXPECT, key=ring).seq == 7
    # Naming another key in the header (checksum recomputed) does not open it.
    data, _ = pack(sample(), old)
    forged = data[:-16].replace(key_id(old).encode(), key_id(new).encode())
    forged += xxhash.xxh3_128(forged).digest()
    with pytest.raises(SegmentCorrupt, match="authentication failed"):
        unpack(forged, "s", EXPECT, key=ring)


def test_checksum_must_match_the_notice():
    data, _ = pack(sample())
    with pytest.raises(SegmentCorrupt, match="notice"):
        unpack(data, "s", EXPECT, checksum="00" * 16)


def test_inconsistent_batches_are_refused():
    with pytest.raises(ValueError, match="payload"):
        Batch.from_header(sample().header(), b"short")
    header = sample().header()
    header["extents"] = [[(1 << 30) - 10, 8192, "d"]]
    with pytest.raises(ValueError, match="outside"):
        Batch.from_header(header, os.urandom(8192))


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "sealed"])
def test_verify_checks_all_but_decompression(key):
    data, checksum = pack(sample(), key)
    header = verify(data, "s", EXPECT, key=key, checksum=checksum)
    assert header["tag"] == {"id": "web01-1", "kind": "crash"} and header["raw_len"] == 12288
    for pos in range(0, len(data), max(1, len(data) // 61)):
        bad = bytearray(data)
        bad[pos] ^= 0x04
        with pytest.raises(SegmentCorrupt):
            verify(bytes(bad), "s", EXPECT, key=key)
    with pytest.raises(SegmentCorrupt, match="seq"):
        verify(data, "s", {**EXPECT, "seq": 9}, key=key)


@pytest.mark.parametrize("cipher", list(CIPHERS))
def test_packing_a_batch_again_gives_the_same_sealed_segment(cipher):
    """A process server restarted mid-upload packs the batch again: its first notice must
    still match the blob (random nonces made it differ, and the master target resynced)."""
    batch = sample()
    first, sum1 = pack(batch, KEY, cipher=cipher)
    again, sum2 = pack(batch, KEY, cipher=cipher)
    assert (first, sum1) == (again, sum2)
    other, sum3 = pack(sample(seq=8), KEY, cipher=cipher)
    assert sum3 != sum1  # another batch, another nonce and ciphertext


@pytest.mark.parametrize(
    ("cipher", "flag", "nonce_size"), [("aegis-256", FLAG_AEGIS, 32), ("aes-256-gcm", FLAG_AES, 12)]
)
def test_segments_are_sealed_with_the_cipher_under_a_nonce_of_header_and_body(
    cipher, flag, nonce_size
):
    """A process server seals with AEGIS-256 unless set to AES-256-GCM; the nonce changes
    with any byte of the header or the body (a keyed hash of both), so two batches never
    share one."""
    batch = sample()
    data, _ = pack(batch, KEY, cipher=cipher)
    if cipher == "aegis-256":
        assert pack(batch, KEY) == (data, _)  # the default
    hlen = int.from_bytes(data[8:12], "big")
    assert data[12 + hlen] == FLAG_ZSTD | FLAG_SEALED | flag
    nonce = data[12 + hlen + 9 : 12 + hlen + 9 + nonce_size]
    changed = Batch(**{**batch.__dict__, "payload": batch.payload[:-1] + b"\1"})
    retagged = Batch(**{**batch.__dict__, "tag": {"id": "web01-2", "kind": "crash"}})
    for other in (changed, retagged):
        odata, _ = pack(other, KEY, cipher=cipher)
        ohlen = int.from_bytes(odata[8:12], "big")
        assert odata[12 + ohlen + 9 : 12 + ohlen + 9 + nonce_size] != nonce
        assert unpack(odata, "s", EXPECT, key=KEY) == other


LEGACY = base64.b64decode(
    "RkVSUllTRzEAAADLeyJkaXNrIjoid2ViMDEtZGlzazAiLCJkaXNrX3NpemUiOjEwNzM3NDE4MjQsImV4dGVudHMi"
    "OltbMCw4MTkyLCJkIl0sWzEwNDg1NzYsNjU1MzYsInoiXV0sImdlbiI6Mywia2V5X2lkIjoiYzJmMjM5YmFmOTdl"
    "ZDBlMCIsInJhd19sZW4iOjgxOTIsInNlcSI6NywidGFnIjp7ImlkIjoid2ViMDEtMSIsImtpbmQiOiJjcmFzaCJ9"
    "LCJ0ZW5hbnQiOiJhY21lIn0DAAAAAAAAAEXBMza5SFYZrlcvUWimKvzosDSl8VLSPKRKJN/3wHIsyZ9xXwDHcay6"
    "BkULl7kcgySk+7dwrEdRFRs1OM5Z65/LyvHu5ydjUxmkq2g2B2XvNuTWAfWW"
)
"""A segment sealed with ChaCha20-Poly1305 by the process server of 42a6951 (key KEY)."""
LEGACY_AES = base64.b64decode(
    "RkVSUllTRzEAAADLeyJkaXNrIjoid2ViMDEtZGlzazAiLCJkaXNrX3NpemUiOjEwNzM3NDE4MjQsImV4dGVudHMi"
    "OltbMCw4MTkyLCJkIl0sWzEwNDg1NzYsNjU1MzYsInoiXV0sImdlbiI6Mywia2V5X2lkIjoiYzJmMjM5YmFmOTdl"
    "ZDBlMCIsInJhd19sZW4iOjgxOTIsInNlcSI6NywidGFnIjp7ImlkIjoid2ViMDEtMSIsImtpbmQiOiJjcmFzaCJ9"
    "LCJ0ZW5hbnQiOiJhY21lIn0HAAAAAAAAAE1/Hd7h9Tc2NklgHii3UcCFbro+D3g/mKwh56eD8quXVRXiv0Wn3b8c"
    "EYxRBBnVcv8o4dfUGzgETBfDM5ke5ujQhhJUJnwQA5MDqUGRLx677/qHtkaDu4LRGdH2/9g="
)
"""A segment sealed with AES-256-GCM by the process server of 1fe69af (key KEY)."""


@pytest.mark.parametrize(
    ("legacy", "checksum", "payload"),
    [
        (LEGACY, "635319a4ab68360765ef36e4d601f596", b"ferry legacy segment\n" * 390 + b"xx"),
        (
            LEGACY_AES,
            "1ebbeffa87b64683bb82d119d1f6ffd8",
            b"ferry round sixteen segment\n" * 292 + b"yy" * 8,
        ),
    ],
    ids=["chacha20-poly1305", "aes-256-gcm"],
)
def test_a_segment_sealed_by_an_older_process_server_still_opens(legacy, checksum, payload):
    """Segments in flight across an upgrade: ChaCha20-Poly1305 and AES-256-GCM ones open,
    and a flip of an algorithm flag (checksum recomputed) fails authentication rather than
    opening."""
    batch = unpack(legacy, "s", EXPECT, key=KEY, checksum=checksum)
    assert batch.payload == payload
    assert batch.tag == {"id": "web01-1", "kind": "crash"}
    hlen = int.from_bytes(legacy[8:12], "big")
    for flag in (FLAG_AES, FLAG_AEGIS):
        flipped = bytearray(legacy[:-16])
        flipped[12 + hlen] ^= flag
        flipped += xxhash.xxh3_128(bytes(flipped)).digest()
        with pytest.raises(SegmentCorrupt, match="authentication failed"):
            unpack(bytes(flipped), "s", EXPECT, key=KEY)


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "sealed"])
def test_a_segment_decompressed_into_a_buffer_of_the_callers_is_the_same_batch(key):
    """The master target decompresses into reused, page-aligned buffers (ferry.blockio)."""
    from ferry.blockio import BufferPool
    from ferry.segment import decode, open_verified

    batch = sample()
    data, checksum = pack(batch, key)
    pool = BufferPool(1 << 20)
    back = decode(open_verified(data, "s", EXPECT, key=key, checksum=checksum), pool.view)
    assert isinstance(back.payload, memoryview) and back.payload.obj is pool.buffers[0]
    assert back == batch
    # too big for the buffers: decompressed into new memory, the same batch
    assert decode(open_verified(data, "s", EXPECT, key=key), BufferPool(4096).view) == batch


def test_a_body_longer_or_shorter_than_its_header_says_is_refused_in_a_buffer_too():
    import zstandard

    from ferry.blockio import BufferPool
    from ferry.segment import Opened, decode

    batch = sample()
    header = {**batch.header(), "raw_len": len(batch.payload)}
    pool = BufferPool(1 << 20)
    for body in (batch.payload + b"more", batch.payload[:-1]):
        opened = Opened("s", header, zstandard.ZstdCompressor().compress(body), FLAG_ZSTD)
        with pytest.raises(SegmentCorrupt, match="payload length differs"):
            decode(opened, pool.view)
        with pytest.raises(SegmentCorrupt, match="payload length differs"):
            decode(opened)
    garbage = Opened("s", header, b"\x28\xb5\x2f\xfd" + os.urandom(64), FLAG_ZSTD)
    with pytest.raises(SegmentCorrupt, match="cannot decompress"):
        decode(garbage, pool.view)
