"""The fault campaign (bench/faults.py) on one scenario at a small scale.

``make faults`` runs them all; this keeps the network scenario's proxy and the
campaign's plumbing working: the agent's connection is delayed, reset,
dripped, blackholed and left half-open, and the target must still end
byte-identical to the source.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from bench import faults

pytestmark = [pytest.mark.root, pytest.mark.tracefs, pytest.mark.slow]


def test_network_faults_lose_nothing(tmp_path):
    tiny = dataclasses.replace(faults.QUICK, name="test", disk=32 << 20, net_phase_s=2.0)
    result = faults.network_faults(tmp_path, tiny, random.Random(1))
    assert result.lost == "nothing", result
    assert result.times == 5
    resets = next(n for n in result.notes if n.endswith("connections reset"))
    assert int(resets.split()[0]) >= 1, result.notes
