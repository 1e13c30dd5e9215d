"""What writing a target costs, by how it is written: the figures behind
``mastertarget/target.py``'s choice (O_DIRECT for long extents, ``fallocate``
before buffered ones).

    sudo .venv/bin/python -m bench.writepaths [--extent-kib 2560] [--gap-kib 4]

Writes 1 GiB of extents of ``--extent-kib`` with ``--gap-kib`` left unwritten
between them (an initial sync writes a file's data around its free space)
into a new sparse file under ``bench/cache``, from one buffer of random bytes,
four ways: plain buffered ``pwrite``; ``fallocate`` of each extent first;
one ``fallocate`` of the whole range first; O_DIRECT from an aligned buffer.
Each starts with a cold page cache and ends with an fsync; the process's CPU
seconds (user + system) per GiB written are printed, with the wall time.

The buffered write runs twice, first and last.  On a VM that reports free
memory to its host (virtio-balloon free page reporting, as this one), the
first run's page cache is memory the host had taken back, each page faulted
in and zeroed again: 1.2-3.0 CPU s per GiB here, where the same writes into
page cache the previous run left free moments before took 0.2-0.3.  Whichever
way comes first pays that, not the way itself; the last run shows how much
of the host's memory the runs between reused.
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import time
from pathlib import Path

from bench.data import CACHE, drop_caches
from ferry.blockio import fallocate

GiB = 1 << 30


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(mode: str, extent: int, gap: int, source: mmap.mmap, path: Path) -> dict[str, float]:
    """One way of writing; CPU seconds per GiB written and wall seconds."""
    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if mode == "direct" else 0)
    fd = os.open(path, flags, 0o600)
    try:
        os.ftruncate(fd, 2 * GiB)
        if mode == "fallocate-all":
            fallocate(fd, 0, 2 * GiB)
        drop_caches()
        view = memoryview(source)
        written = 0
        cpu, wall = _cpu(), time.monotonic()
        for offset in range(0, 2 * GiB - extent, extent + gap):
            if written >= GiB:
                break
            if mode == "fallocate-each":
                fallocate(fd, offset, extent)
            os.pwrite(fd, view[:extent], offset)
            written += extent
        os.fsync(fd)
        return {
            "cpu_s_per_gib": (_cpu() - cpu) / (written / GiB),
            "wall_s": time.monotonic() - wall,
        }
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--extent-kib", type=int, default=2560)
    p.add_argument("--gap-kib", type=int, default=4)
    args = p.parse_args()
    extent, gap = args.extent_kib << 10, args.gap_kib << 10
    if extent % 4096 or gap % 4096:
        raise SystemExit("writepaths: --extent-kib and --gap-kib must be multiples of 4")
    source = mmap.mmap(-1, extent)  # page-aligned, as O_DIRECT needs
    source.write(os.urandom(extent))
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / "writepaths.tmp"
    print(f"1 GiB in extents of {args.extent_kib} KiB, {args.gap_kib} KiB apart, "
          f"into a sparse file on {path.parent}")  # fmt: skip
    for mode in ("buffered", "fallocate-each", "fallocate-all", "direct", "buffered"):
        r = measure(mode, extent, gap, source, path)
        print(f"  {mode:15} {r['cpu_s_per_gib']:5.2f} CPU s per GiB   {r['wall_s']:4.1f} s")


if __name__ == "__main__":
    main()
