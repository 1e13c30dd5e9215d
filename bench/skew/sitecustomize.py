"""A skewed wall clock for one daemon of the fault campaign (bench/faults.py); never deployed.

Python imports ``sitecustomize`` at start-up from the first directory of
``sys.path`` that holds one: the campaign puts this directory first on a
daemon's ``PYTHONPATH`` and names a file in ``FERRY_SKEW_FILE`` holding the
offset in seconds (re-read every second, so the campaign can step it as
NTP would).  ``time.time`` and ``time.time_ns`` (what Ferry, its logs and
the Azure SDK's request dates read) move by the offset; the monotonic
clocks do not, as on a real machine whose wall clock is off.

Why not libfaketime (Debian's ``faketime``): measured here with 0.9.10 and
Python 3.11, ``FAKETIME_DONT_FAKE_MONOTONIC=1`` makes ``time.sleep`` fail
with EINVAL, and without it the monotonic clocks jump to the faked wall
clock too, so every ``threading`` wait with a timeout hangs.  What this
does not skew: OpenSSL's own clock (certificate validity) and
``datetime.now()``.
"""

from __future__ import annotations

import os
import time as _time

_FILE = os.environ.get("FERRY_SKEW_FILE")

if _FILE:
    _real_time, _real_time_ns = _time.time, _time.time_ns
    _cache = [0.0, float("-inf")]  # offset, when read (monotonic)

    def _offset() -> float:
        now = _time.monotonic()
        if now - _cache[1] >= 1.0:
            try:
                with open(_FILE) as f:  # type: ignore[arg-type]
                    _cache[0] = float(f.read().strip() or 0)
            except (OSError, ValueError):
                pass
            _cache[1] = now
        return _cache[0]

    def _time_skewed() -> float:
        return _real_time() + _offset()

    def _time_ns_skewed() -> int:
        return _real_time_ns() + int(_offset() * 1e9)

    _time.time = _time_skewed
    _time.time_ns = _time_ns_skewed
