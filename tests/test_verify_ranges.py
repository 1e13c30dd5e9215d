"""The agent's walk of a disk for an online verify, and the shared comparison (no daemons).

A real image file is read through the agent's O_DIRECT reader; the blocks a
pass "touched" are given as the tracker would report them.
"""

from __future__ import annotations

import os

from pyroaring import BitMap

from agent.verify import RECHECK_ROUNDS, DiskVerify, Verifier
from ferry import blockio
from ferry import verify as fmt

BLOCK = 4096


def _image(tmp_path, blocks: int) -> str:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(blocks * BLOCK))
    return str(path)


def test_ranges_cover_the_disk_once_and_touched_blocks_are_tried_again(tmp_path):
    device = _image(tmp_path, 40)
    plan = DiskVerify("v-1", "d", 40 * BLOCK, BLOCK, chunk=16 * BLOCK)
    reader = blockio.DirectReader(device, 16 * BLOCK)
    sections, touched = [], [BitMap([3, 20]), BitMap([20]), BitMap(), BitMap([20]), BitMap()]
    for written in touched:
        plan.read(reader)
        sections.append(plan.section(written))
        if sections[-1]["last"]:
            break
    reader.close()
    assert [s["ranges"] for s in sections] == [
        [[0, 16 * BLOCK]], [[16 * BLOCK, 16 * BLOCK]], [[32 * BLOCK, 8 * BLOCK]],
        [[3 * BLOCK, BLOCK], [20 * BLOCK, BLOCK]],  # block 20 is written again meanwhile
        [[20 * BLOCK, BLOCK]],
    ]  # fmt: skip
    assert sections[0]["unsettled"] == [[3, 1]]  # 20 is outside the first range
    assert sections[1]["unsettled"] == [[20, 1]]
    assert sections[3]["unsettled"] == [[20, 1]]
    assert sections[-1]["last"] and sections[-1]["unverified"] == 0
    # Every digest is the source's block, in order.
    data = open(device, "rb").read()
    first = fmt.decode_digests(sections[0]["digests"])
    assert first == [blockio.block_digests(memoryview(data[i * BLOCK:(i + 1) * BLOCK]), BLOCK)[0]
                     for i in range(16)]  # fmt: skip


def test_a_block_written_all_the_time_is_reported_unverified_not_compared(tmp_path):
    device = _image(tmp_path, 8)
    plan = DiskVerify("v-2", "d", 8 * BLOCK, BLOCK, chunk=8 * BLOCK)
    reader = blockio.DirectReader(device, 8 * BLOCK)
    sections = []
    while True:
        plan.read(reader)
        sections.append(plan.section(BitMap([5])))
        if sections[-1]["last"]:
            break
    reader.close()
    assert len(sections) == 1 + RECHECK_ROUNDS
    assert sections[-1]["unverified"] == 1


def test_differing_leaves_out_unsettled_blocks():
    a, b = b"a" * 16, b"b" * 16
    blocks = [10, 11, 12, 13]
    source, target = [a, a, a, a], [a, b, b, a]
    assert fmt.differing(blocks, source, target, set()) == [11, 12]
    assert fmt.differing(blocks, source, target, {12}) == [11]
    assert fmt.runs([13, 11, 12, 40]) == [[11, 3], [40, 1]]
    tag, section = fmt.split({"id": "t", "verify": {"id": "v"}})
    assert tag == {"id": "t"} and section == {"id": "v"}


def test_an_operators_verify_replaces_one_in_progress_a_scheduled_one_does_not(tmp_path):
    device = _image(tmp_path, 8)
    verifier = Verifier(8 * BLOCK)
    disk = [("d", device, 8 * BLOCK, BLOCK)]
    first = verifier.start(disk, scheduled=True)
    verifier.start(disk, scheduled=True)  # the schedule again: the one in progress goes on
    assert verifier.status("d")["id"] == first
    mine = verifier.start(disk, repair=True)  # an operator's: it replaces the scheduled one
    assert mine != first and verifier.status("d")["id"] == mine
    verifier.read_pass(["d"])
    (section,) = verifier.end_pass(["d"], True, lambda _: BitMap()).values()
    assert section["id"] == mine and section["repair"] and section["last"]
    assert verifier.status("d")["state"] == "sent" and not verifier.busy()
    verifier.close()
