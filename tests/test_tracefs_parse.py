"""Reading trace_pipe's text (agent.tracefs.TraceInstance._take and _feed).

The lines are as this machine's kernel printed them for fio's O_DIRECT writes
to a loop device (block_rq_complete with its I/O priority), as older kernels
print them (without it), and the lines that are not events of ours: another
marker, a flush, lost events. The reader gets its input in reads that cut
lines anywhere; the events must come out the same, in order, whatever the cut.
"""

from __future__ import annotations

import random

from agent.tracefs import TraceInstance

TRACE = b"""\
             fio-29876   [001] ..... 35064.720241: block_bio_queue: 7,0 WS 3952 + 32 [fio]
     ksoftirqd/0-14      [000] ..s.. 35064.720378: block_rq_complete: 7,0 WS () 3952 + 32 be,0,4 [0]
          python-29869   [000] ...1. 35064.765315: tracing_mark_write: ferry-mark 7
     kworker/u8:1-lo-422 [001] d..1. 35064.800001: block_rq_complete: 259,3 W () 1000000 + 8 [0]
           <...>-31      [000] ..... 35064.800002: block_bio_queue: 8,16 FWS 0 + 0 [jbd2/vda1-8]
CPU:1 [LOST 12 EVENTS]
   my app (x)-4242   [001] ..... 35064.800003: block_bio_queue: 7,0 WM 123 + 8 [my app (x)]
     ksoftirqd/1-24  [001] ..s.. 35064.800004: block_rq_complete: 7,0 WS (3000 + 8) 3000 + 8 [0]
          python-29869   [000] ...1. 35065.265591: tracing_mark_write: ferry-stop
          python-29869   [000] ...1. 35065.300000: tracing_mark_write: ferry-mark 8
"""

EXPECTED = [
    ("queue", (7 << 20) | 0, 3952, 32, 35064.720241),
    ("complete", (7 << 20) | 0, 3952, 32, 35064.720378),
    ("mark", 7, 35064.765315),
    ("complete", (259 << 20) | 3, 1000000, 8, 35064.800001),
    ("queue", (7 << 20) | 0, 123, 8, 35064.800003),
    ("complete", (7 << 20) | 0, 3000, 8, 35064.800004),
    ("mark", 8, 35065.3),
]


def take_in_pieces(data: bytes, cuts: list[int]) -> TraceInstance:
    """A reader (no trace instance behind it) fed ``data`` cut at ``cuts``; its
    callbacks' calls are in ``got``."""
    got: list[tuple] = []
    r = object.__new__(TraceInstance)
    r.got = got  # type: ignore[attr-defined]
    r.events, r._pending = 0, b""
    r.on_queue = lambda *a: got.append(("queue", *a))
    r.on_complete = lambda *a: got.append(("complete", *a))
    r.on_mark = lambda *a: got.append(("mark", *a))
    at = 0
    for cut in [*sorted(cuts), len(data)]:
        r._take(data[at:cut])
        at = cut
    return r


def test_each_event_of_ours_comes_out_once_in_order():
    got = take_in_pieces(TRACE, [])
    assert got.got == EXPECTED
    assert got.events == 5, "every block event with data is counted, flushes are not"
    assert got._pending == b""


def test_reads_that_cut_lines_anywhere_give_the_same_events():
    rng = random.Random(7)
    for _ in range(200):
        cuts = rng.sample(range(1, len(TRACE)), rng.randrange(1, 12))
        assert take_in_pieces(TRACE, cuts).got == EXPECTED, cuts


def test_a_line_without_its_end_waits_for_it():
    head, tail = TRACE[:150], TRACE[150:]
    got = take_in_pieces(head, [])
    assert got.got == EXPECTED[:1], "only the whole first line is an event yet"
    got._take(tail)
    assert got.got == EXPECTED
