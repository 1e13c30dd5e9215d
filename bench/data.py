"""The benchmark's data and the system plumbing around it.

Two states of one disk, made once and cached in ``bench/cache/``:

* **A**: an ext4 image about half full of real files copied from this system
  (``/usr/lib``, ``/usr/share``, ``/usr/local``);
* **B**: A after about 1% of the disk was overwritten in 4 KiB pieces inside
  a couple of thousand of its files, through the filesystem.

Every peer and Ferry move the same bytes: peers copy A and turn A into B;
Ferry replicates A and then sees exactly the blocks that differ between A
and B written onto its live source device.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import xxhash

from ferry.blockio import DirectReader

MiB = 1 << 20
GiB = 1 << 30
BLOCK = 4096
HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
RECIPE = 4
"""Bump to rebuild cached images after a change to how they are made."""
SOURCES = ("/usr/lib", "/usr/share", "/usr/local")


def say(msg: str) -> None:
    """One progress line, time-stamped."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(*cmd: str, check: bool = True) -> str:
    """Run a command; its stdout, or an error with its stderr."""
    result = subprocess.run(cmd, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip()


def drop_caches() -> None:
    """Flush dirty pages and drop the page cache, so the next read comes from disk."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def fsync_path(path: str | Path) -> None:
    """fsync one file (not the whole machine, as sync(1) would)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def digest(path: str | Path, size: int | None = None, chunk: int = 8 * MiB) -> str:
    """xxh3-128 of a device or file, read with O_DIRECT (never fooled by the page cache)."""
    reader = DirectReader(str(path), chunk)
    size = reader.size if size is None else size
    h = xxhash.xxh3_128()
    try:
        for off in range(0, size, chunk):
            h.update(reader.read(off, min(chunk, size - off)))
    finally:
        reader.close()
    return h.hexdigest()


def copy_image(src: Path, dest: Path) -> None:
    """Copy an image, keeping it sparse (setup, never timed)."""
    sh("cp", "--sparse=always", str(src), str(dest))


# -- loop devices and mounts -----------------------------------------------------------


def attach(image: Path, direct: bool = True) -> str:
    """A loop device over ``image``."""
    args = ["losetup", "--find", "--show"] + (["--direct-io=on"] if direct else [])
    return sh(*args, str(image))


def umount(mnt: Path | str) -> None:
    """Unmount, retrying while the filesystem is briefly busy; lazily as a last resort."""
    for _ in range(20):
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
            return
        if subprocess.run(["mountpoint", "-q", str(mnt)]).returncode != 0:
            return
        time.sleep(0.5)
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def detach(device: str) -> None:
    """Release a loop device (quietly: it may be gone already)."""
    subprocess.run(["losetup", "-d", device], capture_output=True)


class Mounted:
    """An image or device mounted for the duration of a with-block."""

    def __init__(self, what: Path | str, where: Path | None = None) -> None:
        self.what = str(what)
        self.mnt = where or Path(tempfile.mkdtemp(prefix="ferry-bench-mnt-"))
        self.loop: str | None = None

    def __enter__(self) -> Path:
        device = self.what
        if not self.what.startswith("/dev/"):
            device = self.loop = attach(Path(self.what), direct=False)
        self.mnt.mkdir(parents=True, exist_ok=True)
        sh("mount", device, str(self.mnt))
        return self.mnt

    def __exit__(self, *exc: object) -> None:
        umount(self.mnt)
        if self.loop:
            detach(self.loop)


# -- the two states ----------------------------------------------------------------------


@dataclass
class Dataset:
    """State A, state B, and what differs between them."""

    size: int
    base: str
    changed: str
    base_digest: str
    changed_digest: str
    files_bytes: int
    used_bytes: int
    zero_blocks: int
    changed_file_bytes: int
    changed_files: int
    diff_blocks: int
    diff_path: str

    @property
    def blocks(self) -> int:
        """4 KiB blocks in the image."""
        return self.size // BLOCK

    def diff(self) -> np.ndarray:
        """Numbers of the 4 KiB blocks that differ between A and B, ascending."""
        return np.load(self.diff_path)

    def describe(self) -> dict:
        """JSON-able facts for the results file."""
        out = asdict(self)
        out["zero_block_share"] = self.zero_blocks / self.blocks
        out["diff_block_share"] = self.diff_blocks / self.blocks
        return out


def dataset(size: int) -> Dataset:
    """States A and B of a ``size``-byte disk, from the cache or made now (needs root)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    stem = CACHE / f"ext4-{size // MiB}m"
    meta = stem.with_suffix(".json")
    if meta.exists():
        facts = json.loads(meta.read_text())
        if facts.pop("recipe", None) == RECIPE and all(
            Path(facts[k]).exists() for k in ("base", "changed", "diff_path")
        ):
            return Dataset(**facts)
    facts = _make(stem, size)
    meta.write_text(json.dumps({"recipe": RECIPE, **asdict(facts)}, indent=1) + "\n")
    return facts


def base_image(size: int) -> tuple[Path, str, int]:
    """State A alone, for runs that need no second state (``bench.scaling``): its path, digest
    and bytes of files; from the cache, or made now (needs root)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    stem = CACHE / f"ext4-{size // MiB}m"
    full = stem.with_suffix(".json")
    if full.exists():  # made by dataset() already
        facts = json.loads(full.read_text())
        if facts.get("recipe") == RECIPE and Path(facts["base"]).exists():
            return Path(facts["base"]), facts["base_digest"], facts["files_bytes"]
    meta = stem.with_name(stem.name + "-a.json")
    if meta.exists():
        facts = json.loads(meta.read_text())
        if facts.get("recipe") == RECIPE and Path(facts["base"]).exists():
            return Path(facts["base"]), facts["digest"], facts["files_bytes"]
    base = stem.with_name(stem.name + "-a.img")
    files_bytes, _ = _make_base(base, size)
    found = digest(base, size)
    meta.write_text(json.dumps({"recipe": RECIPE, "base": str(base), "digest": found,
                                "files_bytes": files_bytes}) + "\n")  # fmt: skip
    return base, found, files_bytes


def _make_base(base: Path, size: int) -> tuple[int, int]:
    """Make state A at ``base``; return (bytes of files copied, bytes used)."""
    say(f"making {base.name}: {size // MiB} MiB ext4, about half full of files from /usr")
    tmp = base.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.truncate(size)
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0",
       str(tmp))  # fmt: skip
    with Mounted(tmp) as mnt:
        files_bytes = copy_files(mnt, size // 2)
        fs = os.statvfs(mnt)
        used = (fs.f_blocks - fs.f_bfree) * fs.f_frsize
    os.replace(tmp, base)
    return files_bytes, used


def _make(stem: Path, size: int) -> Dataset:
    base, changed = stem.with_name(stem.name + "-a.img"), stem.with_name(stem.name + "-b.img")
    files_bytes, used = _make_base(base, size)
    say(f"making {changed.name}: about 1% of the disk overwritten inside many files")
    tmp = changed.with_suffix(".tmp")
    copy_image(base, tmp)
    with Mounted(tmp) as mnt:
        changed_bytes, changed_files = change_files(mnt, size // 100)
    os.replace(tmp, changed)
    say("comparing the two states block by block")
    diff, zero, digest_a, digest_b = _compare(base, changed, size)
    diff_path = stem.with_name(stem.name + "-diff.npy")
    np.save(diff_path, diff)
    return Dataset(
        size=size,
        base=str(base),
        changed=str(changed),
        base_digest=digest_a,
        changed_digest=digest_b,
        files_bytes=files_bytes,
        used_bytes=used,
        zero_blocks=zero,
        changed_file_bytes=changed_bytes,
        changed_files=changed_files,
        diff_blocks=len(diff),
        diff_path=str(diff_path),
    )


def copy_files(dest: Path, budget: int, seed: int = 11, largest: int = 64 * MiB) -> int:
    """Copy a seeded random sample of the system's regular files into ``dest``; bytes copied.

    A random sample (rather than the first files of a walk) gives the mix a
    server has: thousands of small files and a few large ones.
    """
    candidates = []
    for source in SOURCES:
        for root, _dirs, files in os.walk(source):
            for name in files:
                path = os.path.join(root, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and 0 < st.st_size <= largest:
                    candidates.append((path, st.st_size))
    candidates.sort()
    random.Random(seed).shuffle(candidates)
    copied = 0
    for path, size in candidates:
        if copied + size > budget:
            continue
        target = dest / os.path.relpath(path, "/")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        except OSError:
            continue
        copied += size
        if copied >= budget * 0.98:
            break
    return copied


def change_files(mnt: Path, budget: int, seed: int = 5) -> tuple[int, int]:
    """Overwrite 1-4 random 4 KiB pieces in many files until ``budget`` bytes changed.

    Returns (bytes written, files touched).
    """
    rng = random.Random(seed)
    files = sorted(p for p in mnt.rglob("*") if p.is_file() and p.stat().st_size >= 2 * BLOCK)
    rng.shuffle(files)
    changed = touched = 0
    for path in files:
        if changed >= budget:
            break
        length = path.stat().st_size
        # Distinct pieces only, so that ``budget`` counts blocks that really change.
        offsets = {
            rng.randrange(0, length - BLOCK) // BLOCK * BLOCK for _ in range(rng.randint(1, 4))
        }
        with open(path, "r+b") as f:
            for offset in sorted(offsets):
                f.seek(offset)
                f.write(rng.randbytes(BLOCK))
                changed += BLOCK
        touched += 1
    os.sync()
    return changed, touched


def _compare(a: Path, b: Path, size: int, chunk: int = 8 * MiB):
    """(differing block numbers, zero blocks of A, digest of A, digest of B)."""
    ra, rb = DirectReader(str(a), chunk), DirectReader(str(b), chunk)
    ha, hb = xxhash.xxh3_128(), xxhash.xxh3_128()
    diffs, zero = [], 0
    try:
        for off in range(0, size, chunk):
            n = min(chunk, size - off)
            va, vb = ra.read(off, n), rb.read(off, n)
            ha.update(va)
            hb.update(vb)
            xa = np.frombuffer(va, np.uint8).reshape(-1, BLOCK)
            xb = np.frombuffer(vb, np.uint8).reshape(-1, BLOCK)
            diffs.append(np.flatnonzero((xa != xb).any(axis=1)) + off // BLOCK)
            zero += int((~xa.any(axis=1)).sum())
    finally:
        ra.close()
        rb.close()
    return np.concatenate(diffs).astype(np.int64), zero, ha.hexdigest(), hb.hexdigest()


def runs_of(blocks: np.ndarray) -> list[tuple[int, int]]:
    """``(first, count)`` runs of consecutive block numbers."""
    if len(blocks) == 0:
        return []
    breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(blocks)]))
    return [(int(blocks[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def replay_diff(data: Dataset, device: str) -> tuple[int, float]:
    """Write B's content of every block that differs from A onto ``device`` (O_DIRECT).

    Returns the bytes written and when the last write completed (monotonic clock, as
    the agent's t0): an O_DIRECT write is complete, for the block layer and so for
    the agent's tracking, when ``pwritev`` returns.  The fsync after it (of a loop
    device: a flush of its backing file, up to hundreds of milliseconds) writes
    nothing of the change.
    """
    import mmap

    runs = runs_of(data.diff())
    longest = max(count for _, count in runs) * BLOCK
    src = DirectReader(data.changed, longest)
    buf = mmap.mmap(-1, longest)
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
    written = 0
    try:
        for first, count in runs:
            n = count * BLOCK
            buf[:n] = src.read(first * BLOCK, n)
            written += os.pwritev(fd, [memoryview(buf)[:n]], first * BLOCK)
        last = time.monotonic()
        os.fsync(fd)
    finally:
        os.close(fd)
        src.close()
    return written, last
