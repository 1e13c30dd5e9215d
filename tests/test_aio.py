"""Reads submitted together (ferry.aio, ferry.blockio.DirectReader.read_each).

Once a disk replicates, a pass reads a few hundred short runs a second; each
blocking read cost the agent a sleep and a wake-up, more CPU than the read.
read_each submits up to AIO_DEPTH of them at once and waits once. These tests
read real files (O_DIRECT on the test machine's filesystem) and, as root, a
real loop device, and compare every byte with what a plain read gives.
"""

from __future__ import annotations

import errno
import os
import random

import pytest

from ferry import aio, blockio
from ferry.errors import DeviceError

MiB = 1 << 20
BLOCK = 4096


@pytest.fixture
def image(tmp_path):
    """A file of random bytes whose size is not a multiple of the O_DIRECT alignment."""
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(16 * MiB + 1000))
    return str(path)


def spans_over(size: int, seed: int) -> list[tuple[int, int, int]]:
    """Rising, disjoint ``(offset, length, n)`` spans of 4 KiB-256 KiB with gaps, the
    last one running to the device's end (a short read there)."""
    rng = random.Random(seed)
    out, at, n = [], 0, 0
    while True:
        at += rng.randrange(0, 64) * BLOCK
        length = rng.randrange(1, 65) * BLOCK
        if at + length >= size:
            out.append((at, size - at, n))
            return out
        out.append((at, length, n))
        at += length
        n += 1


def read_all(path: str, spans, buffer: int = 1 * MiB, keep: int = 0):
    """Every span's bytes through read_each, and the order of reads and their views."""
    reader = blockio.DirectReader(path, buffer, keep)
    got, order = {}, []
    try:
        for n, view in reader.read_each(spans, lambda n: order.append(("done", n))):
            order.append(("view", n))
            got[n] = bytes(view)
            del view
    finally:
        reader.close()
    return got, order


def check(path: str, spans, got) -> None:
    with open(path, "rb") as f:
        for offset, length, n in spans:
            f.seek(offset)
            assert got[n] == f.read(length), f"span {n} at {offset} (+{length}) differs"


def test_every_span_reads_the_files_bytes_in_groups(image):
    assert aio.open_context(4) is not None, "Linux AIO is unavailable on this machine"
    spans = spans_over(os.path.getsize(image), seed=1)
    got, order = read_all(image, spans)
    check(image, spans, got)
    assert [n for kind, n in order if kind == "view"] == list(range(len(spans)))
    dones = [i for i, (kind, _) in enumerate(order) if kind == "done"]
    assert len(dones) < len(spans) // 4, "the reads were not submitted together"
    # done(n) comes once every span up to n is read, before any of its group's views.
    seen = 0
    for i in dones:
        n = order[i][1]
        views = [m for kind, m in order[:i] if kind == "view"]
        assert views == list(range(seen)), "a view was given before its group was read"
        assert n >= seen
        seen = n + 1
    assert seen == len(spans)


def test_a_group_fits_the_buffer_and_the_depth(image):
    # 64 KiB runs into a 1 MiB buffer: at most 16 per group; 4 KiB runs: at most AIO_DEPTH.
    for length, most in ((64 << 10, 16), (BLOCK, blockio.AIO_DEPTH)):
        spans = [(i * 2 * length, length, i) for i in range(120)]
        got, order = read_all(image, spans)
        check(image, spans, got)
        ends = [n for kind, n in order if kind == "done"]
        sizes = [b - a for a, b in zip([-1, *ends], ends, strict=False)]
        assert max(sizes) == most, sizes


def test_without_aio_each_span_is_read_alone(image, monkeypatch):
    monkeypatch.setattr(aio, "open_context", lambda depth: None)
    spans = spans_over(os.path.getsize(image), seed=2)
    got, order = read_all(image, spans)
    check(image, spans, got)
    assert order == [(kind, n) for n in range(len(spans)) for kind in ("done", "view")]


def test_a_reader_that_keeps_views_reads_each_span_alone(image):
    # While a disk syncs the pass holds views of its reads: one read per buffer, as before.
    spans = [(i * MiB, MiB, i) for i in range(8)]
    got, order = read_all(image, spans, keep=2)
    check(image, spans, got)
    assert order == [(kind, n) for n in range(8) for kind in ("done", "view")]


def test_a_span_past_the_end_is_one_clear_error(image):
    size = os.path.getsize(image)
    reader = blockio.DirectReader(image, MiB)
    try:
        with pytest.raises(DeviceError, match="short read") as caught:
            list(reader.read_each([(0, BLOCK, 0), (size + BLOCK, BLOCK, 1)], lambda n: None))
        assert "\n" not in str(caught.value)
        # The reader reads on afterwards.
        [(_, view)] = list(reader.read_each([(BLOCK, BLOCK, 0)], lambda n: None))
        with open(image, "rb") as f:
            f.seek(BLOCK)
            assert bytes(view) == f.read(BLOCK)
    finally:
        reader.close()


def test_a_refused_submission_raises_and_the_context_reads_on(image):
    context = aio.open_context(8)
    assert context is not None
    buf = blockio.page_buffer(2 * BLOCK)
    address = blockio.ctypes.addressof(blockio.ctypes.c_char.from_buffer(buf))
    wronly = os.open(image, os.O_WRONLY)
    rdonly = os.open(image, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as caught:
            context.read(wronly, [(address, BLOCK, 0)])
        assert caught.value.errno == errno.EBADF
        with pytest.raises(ValueError):
            context.read(rdonly, [(address, BLOCK, 0)] * 9)
        assert context.read(rdonly, [(address, BLOCK, 0), (address + BLOCK, 500, 5 * BLOCK)]) == [
            BLOCK,
            500,
        ]
        with open(image, "rb") as f:
            assert buf[:BLOCK] == f.read(BLOCK)
            f.seek(5 * BLOCK)
            assert buf[BLOCK : BLOCK + 500] == f.read(500)
        context.close()
        with pytest.raises(OSError):
            context.read(rdonly, [(address, BLOCK, 0)])
    finally:
        os.close(wronly)
        os.close(rdonly)
        context.close()
        buf.close()


@pytest.mark.root
def test_a_loop_device_reads_through_aio(loopdisk):
    disk = loopdisk(32 << 20, fs=False)
    data = os.urandom(32 << 20)
    with open(disk.device, "r+b") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    spans = spans_over(len(data), seed=3)
    reader = blockio.DirectReader(disk.device, MiB)
    assert reader.direct, "the loop device did not open with O_DIRECT"
    dones: list[int] = []
    try:
        for n, view in reader.read_each(spans, dones.append):
            offset, length, _ = spans[n]
            assert bytes(view) == data[offset : offset + length], f"span {n} differs"
            del view
    finally:
        reader.close()
    assert dones[-1] == len(spans) - 1
    assert len(dones) < len(spans) // 4, "the reads were not submitted together"
