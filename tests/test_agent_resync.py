"""The agent's choice of resync block: a digest map that always fits in one frame."""

from __future__ import annotations

import pytest

from agent import defaults
from agent.replicator import resync_block
from ferry import blockio, wire

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize(
    ("size", "block"),
    [
        (100 * GiB, 64 * KiB),  # small disks compare at the configured block
        (256 * GiB, 64 * KiB),  # exactly 64 MiB of digests
        (1 * TiB, 256 * KiB),
        (4 * TiB + 1, 2 * MiB),  # a partial last block counts
        (64 * TiB, 16 * MiB),  # Azure's largest managed disk
    ],
)
def test_large_disks_compare_coarser_blocks(size, block):
    assert resync_block(64 * KiB, size) == block
    assert -(-size // block) * blockio.DIGEST_BYTES <= defaults.DIGEST_MAP_MAX


def test_the_block_never_exceeds_what_the_master_target_accepts():
    block = resync_block(64 * KiB, 1024 * TiB)
    assert block == defaults.RESYNC_BLOCK_MAX
    # Beyond 64 TiB the map grows past DIGEST_MAP_MAX, but still fits one frame
    # up to 256 TiB.
    assert -(-256 * TiB // block) * blockio.DIGEST_BYTES <= wire.MAX_PAYLOAD


def test_an_operators_coarser_block_is_kept():
    assert resync_block(1 * MiB, 10 * GiB) == 1 * MiB
