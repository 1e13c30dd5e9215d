"""The tools a user would otherwise run, timed on the same images as Ferry.

Each timing starts with a cold page cache (:func:`bench.data.drop_caches`)
and ends when the tool's output file is fsync'ed, as Ferry's target is.
Setup (copying the old state into place) is never timed.

Initial copy: ``cp --sparse=always``, ``rsync`` (whole-file copy to a local
file, sparse), ``casync`` (chunk the image into a store, then extract it).

Delta (A -> B): ``rsync --inplace --no-whole-file``, ``rdiff``
(signature, delta, patch; librsync) and a digest-compare scan in the manner
of blocksync or bdsync: both sides read and hashed in 64 KiB blocks
(xxh3-128), differing blocks written into the destination.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import xxhash

from bench.data import Dataset, MiB, copy_image, digest, drop_caches, fsync_path, sh

SCAN_BLOCK = 64 * 1024
"""Block size of the digest-compare scan, in bytes."""


def timed(steps: list[tuple[str, Callable[[], None]]]) -> dict[str, float]:
    """Drop caches, then run ``steps`` in order; seconds of each and ``total``."""
    drop_caches()
    out: dict[str, float] = {}
    start = time.monotonic()
    for name, step in steps:
        t = time.monotonic()
        step()
        out[name] = time.monotonic() - t
    out["total"] = time.monotonic() - start
    return out


def run(*cmd: str) -> Callable[[], None]:
    """A step that runs ``cmd``."""

    def step() -> None:
        sh(*cmd)

    return step


def fsync(path: Path) -> Callable[[], None]:
    """A step that fsyncs ``path``."""
    return lambda: fsync_path(path)


# -- initial copy ------------------------------------------------------------------------


def initial_peers(data: Dataset, work: Path, verify: bool) -> dict[str, dict[str, float]]:
    """Time each peer copying state A to a local file; check the copies if ``verify``."""
    src = Path(data.base)
    out = {}
    dest = work / "peer.img"
    out["cp"] = timed([("copy", run("cp", "--sparse=always", str(src), str(dest))),
                       ("fsync", fsync(dest))])  # fmt: skip
    _check(verify, dest, data.base_digest, "cp")
    dest.unlink()
    out["rsync"] = timed([("copy", run("rsync", "--whole-file", "--sparse", str(src), str(dest))),
                          ("fsync", fsync(dest))])  # fmt: skip
    _check(verify, dest, data.base_digest, "rsync")
    dest.unlink()
    store, index = work / "store.castr", work / "image.caibx"
    out["casync"] = timed([
        ("make", run("casync", "make", f"--store={store}", str(index), str(src))),
        ("extract", run("casync", "extract", f"--store={store}", str(index), str(dest))),
        ("fsync", fsync(dest)),
    ])  # fmt: skip
    out["casync"]["store_bytes"] = _tree_bytes(store)
    _check(verify, dest, data.base_digest, "casync")
    dest.unlink()
    shutil.rmtree(store)
    index.unlink()
    return out


# -- delta ---------------------------------------------------------------------------------


def delta_peers(data: Dataset, work: Path, verify: bool) -> dict[str, dict[str, float]]:
    """Time each peer bringing a copy of A up to B; check the results if ``verify``."""
    new = Path(data.changed)
    dest = work / "peer.img"
    out = {}
    copy_image(Path(data.base), dest)
    out["rsync"] = timed([("rsync", run("rsync", "--inplace", "--no-whole-file", str(new),
                                        str(dest))), ("fsync", fsync(dest))])  # fmt: skip
    _check(verify, dest, data.changed_digest, "rsync --inplace")
    dest.unlink()
    sig, delta, patched = work / "a.sig", work / "a-b.delta", work / "patched.img"
    out["rdiff"] = timed([
        ("signature", run("rdiff", "signature", data.base, str(sig))),
        ("delta", run("rdiff", "delta", str(sig), str(new), str(delta))),
        ("patch", run("rdiff", "patch", data.base, str(delta), str(patched))),
        ("fsync", fsync(patched)),
    ])  # fmt: skip
    out["rdiff"]["delta_bytes"] = delta.stat().st_size
    _check(verify, patched, data.changed_digest, "rdiff")
    for path in (sig, delta, patched):
        path.unlink()
    copy_image(Path(data.base), dest)
    stats: dict[str, float] = {}
    out["scan"] = timed([("scan", lambda: stats.update(digest_scan(new, dest))),
                         ("fsync", fsync(dest))])  # fmt: skip
    out["scan"].update(stats)
    _check(verify, dest, data.changed_digest, "digest scan")
    dest.unlink()
    return out


def digest_scan(source: Path, dest: Path, block: int = SCAN_BLOCK) -> dict[str, float]:
    """Hash both files in ``block`` pieces (each side in its own thread), copy what differs."""
    digests: dict[str, list[bytes]] = {}

    def hash_side(name: str, path: Path) -> None:
        out: list[bytes] = []
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(8 * MiB):
                view = memoryview(chunk)
                out.extend(
                    xxhash.xxh3_128_digest(view[i : i + block]) for i in range(0, len(view), block)
                )
        digests[name] = out

    threads = [
        threading.Thread(target=hash_side, args=(n, p)) for n, p in (("src", source), ("dst", dest))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    differ = [
        i for i, (a, b) in enumerate(zip(digests["src"], digests["dst"], strict=True)) if a != b
    ]
    with open(source, "rb", buffering=0) as src, open(dest, "r+b", buffering=0) as dst:
        for i in differ:
            src.seek(i * block)
            dst.seek(i * block)
            dst.write(src.read(block))
    return {"blocks_copied": len(differ), "bytes_copied": len(differ) * block}


# -- helpers ---------------------------------------------------------------------------------


def _check(verify: bool, path: Path, want: str, who: str) -> None:
    if verify and digest(path) != want:
        raise RuntimeError(f"{who} produced a copy that differs from its source")


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def versions() -> dict[str, str]:
    """Versions of the peer tools, for the results file."""
    out = {}
    for tool, args in {
        "cp": ["cp", "--version"],
        "rsync": ["rsync", "--version"],
        "casync": ["casync", "--version"],
        "rdiff": ["rdiff", "--version"],
        "fio": ["fio", "--version"],
    }.items():
        try:
            text = subprocess.run(args, capture_output=True, text=True).stdout
            out[tool] = text.splitlines()[0].strip() if text else "?"
        except OSError:
            out[tool] = "missing"
    return out
