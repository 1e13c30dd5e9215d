"""Reused page-aligned buffers (ferry.blockio.BufferPool).

The master target decompresses every segment into a buffer it uses again
once the batch is applied.  What must never happen: a buffer handed out
again while a batch still points into it (its bytes overwritten by the next
segment's before they reach the target).
"""

from __future__ import annotations

import ctypes
import threading
import time

import pytest

from ferry.blockio import BufferPool


def test_a_buffer_is_handed_out_again_only_once_no_view_of_it_is_alive():
    pool = BufferPool(1 << 20, limit=2)
    first = pool.view(4096)
    second = pool.view(4096)
    assert first is not None and second is not None
    assert first.obj is not second.obj
    assert pool.view(4096) is None  # both in use, and no more may be made
    assert pool.view((1 << 20) + 1) is None  # more than a buffer holds

    second[:5] = b"kept!"
    tail = first[100:200]  # a view of a view holds the buffer too
    del first
    assert pool.view(10) is None
    del tail
    again = pool.view(8192)
    assert again is not None and len(again) == 8192
    assert len(pool.buffers) == 2  # the first buffer, reused
    assert bytes(second[:5]) == b"kept!"


def test_release_unmaps_only_the_buffers_nothing_points_into():
    pool = BufferPool(1 << 16)
    held = pool.view(100)
    free = pool.view(100)
    assert held is not None and free is not None
    held[:4] = b"held"
    del free
    assert pool.release() == 1
    assert len(pool.buffers) == 1
    assert bytes(held[:4]) == b"held"


def test_threads_sharing_a_pool_never_get_a_buffer_another_still_views():
    """The master target's disks decompress into one pool from threads of their own."""
    pool = BufferPool(1 << 16, limit=3)
    problems: list[str] = []
    fresh = 0

    def work(mark: int) -> None:
        nonlocal fresh
        pattern = bytes([mark]) * (1 << 16)
        for _ in range(300):
            view = pool.view(1 << 16)
            if view is None:
                fresh += 1  # the caller would decompress into new memory
                continue
            view[:] = pattern
            time.sleep(0)  # let the others run while this one holds its buffer
            if view != pattern:
                problems.append(f"thread {mark}: its buffer was handed to another")
            view.release()

    threads = [threading.Thread(target=work, args=(m,)) for m in range(1, 6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not problems, problems[:3]
    assert len(pool.buffers) == 3
    assert fresh < 5 * 300  # most took a pooled buffer


def _thp_mode() -> str | None:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")]


def _huge_kib(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds ``address``, in KiB."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(
    _thp_mode() not in ("always", "madvise"), reason="the kernel gives no transparent huge pages"
)
def test_large_buffers_are_backed_by_huge_pages():
    # O_DIRECT pins each page of its buffer per read or write: in 2 MiB pages a read of
    # 2 GiB took half the time and a third of the kernel's CPU (docs/performance.md,
    # round ten).  A shared anonymous mapping (mmap's default) would get none.
    pool = BufferPool(16 << 20)
    buf = pool.take()
    assert buf is not None
    buf.write(b"\1" * len(buf))  # fault every page in
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert _huge_kib(address) >= 2048
    small = BufferPool(64 << 10).take()  # below a huge page: nothing to advise
    assert small is not None and len(small) == 64 << 10
