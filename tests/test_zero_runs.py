"""Zero detection (ferry.blockio.zero_runs): a piece is called zero only if every byte is.

A piece wrongly called zero would be replicated as a hole: data lost on the
target. These tests compare with the plain definition (each piece against zeros)
on layouts made to defeat the sampling: one non-zero byte where no sample looks,
runs of candidate pieces longer than one comparison, short last pieces.
"""

from __future__ import annotations

import mmap

from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.blockio import runs, zero_runs


def expected(buf: bytes, start: int, length: int, block: int) -> list[tuple[int, int, bool]]:
    pieces = [
        buf[at : min(at + block, start + length)] for at in range(start, start + length, block)
    ]
    return runs([piece == bytes(len(piece)) for piece in pieces])


def in_mmap(data: bytes, before: int) -> mmap.mmap:
    buf = mmap.mmap(-1, max(1, before + len(data)))
    buf[before : before + len(data)] = data
    return buf


piece = st.one_of(
    st.just(("zero", 0)),
    st.tuples(st.just("byte"), st.integers(0, 1 << 30)),  # one non-zero byte, anywhere
    st.tuples(st.just("data"), st.integers(0, 255)),
)


def build(layout: list[tuple[str, int]], block: int, tail: int) -> bytes:
    out = bytearray()
    for i, (kind, arg) in enumerate(layout):
        size = tail if (i == len(layout) - 1 and tail) else block
        part = bytearray(size)
        if kind == "byte":
            part[arg % size] = 1 + arg % 255
        elif kind == "data":
            part[:] = bytes((arg + j) % 256 for j in range(size))
        out += part
    return bytes(out)


@settings(max_examples=300, deadline=None)
@given(
    layout=st.lists(piece, max_size=40),
    block=st.sampled_from([512, 4096, 65536]),
    tail=st.integers(0, 511),
    before=st.sampled_from([0, 512, 4096]),
)
def test_zero_runs_matches_the_definition(layout, block, tail, before):
    data = build(layout, block, tail if layout else 0)
    for buf in (in_mmap(data, before), bytes(before) + data):
        assert zero_runs(buf, before, len(data), block) == expected(
            bytes(buf), before, len(data), block
        )


def test_a_byte_no_sample_sees_is_found_in_a_long_run():
    """A run of 600 candidate pieces (2.4 MiB, more than one comparison) with one
    non-zero byte at an offset the samples skip, in the last piece and in the middle."""
    block = 4096
    for where in (599, 300, 0):
        data = bytearray(600 * block)
        data[where * block + 7] = 9
        buf = in_mmap(bytes(data), 0)
        got = zero_runs(buf, 0, len(data), block)
        assert got == expected(bytes(data), 0, len(data), block)
        assert (where, 1, False) in got


def test_all_zeros_and_no_zeros():
    block = 4096
    assert zero_runs(bytes(64 * block), 0, 64 * block, block) == [(0, 64, True)]
    full = bytes(range(1, 256)) * (64 * block // 255 + 1)
    assert zero_runs(full, 0, 64 * block, block) == [(0, 64, False)]
    assert zero_runs(b"", 0, 0, block) == []
