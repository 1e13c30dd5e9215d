"""The daemons' allocator set-up (ferry.memory): what a burst of large buffers took is
handed back by the trim after it, whichever thread allocated it.

Each case runs in a fresh interpreter: glibc's settings are per process and
must be made before any thread allocates.
"""

from __future__ import annotations

import subprocess
import sys

from support import ROOT

BURST = """
import concurrent.futures, os, sys
from ferry import memory
took = memory.tune() if sys.argv[1] == "tuned" else None

def rss_mib():
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) // 1024

before = rss_mib()
pool = concurrent.futures.ThreadPoolExecutor(2)  # downloads, as the master target's
for _ in range(10):
    fetched = [f.result() for f in [pool.submit(os.urandom, 6 << 20) for _ in range(16)]]
    applied = [bytes(d) + bytes(10 << 20) for d in fetched[:4]]
    del fetched, applied
memory.trim()
print(took, rss_mib() - before)
"""


def burst(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", BURST, mode], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.split()  # fmt: skip
    return out[0], int(out[1])


def test_a_trim_hands_back_what_worker_threads_allocated():
    took, kept = burst("tuned")
    assert took == "True", "glibc refused a setting"
    assert kept < 8, f"{kept} MiB kept after the trim"
    # With glibc's defaults the same burst kept 36 MiB (the threads' arenas).
