"""Replication figures on the embedded default, side by side with `cp` in the same run.

    .venv/bin/python -m bench.replication [--size-gib 2] [--runs 3] [--rates 5,10,20]

Measures, each as the median of ``--runs`` runs (RPO runs once per rate):

1. initial sync: Ferry end to end (agent -> process server -> Azurite ->
   master target, target verified by digest) of an ext4 image about half full
   of real files, against ``cp --sparse=always`` of the same image;
2. delta: time until Ferry's target has converged after about 1% of the
   disk's blocks changed across many files;
3. RPO under steady random O_DIRECT writes at each rate: from a write's
   completion on the source to the target applying a tag that includes it.

Writes ``bench/results/<date>-<host>-replication.json`` and a markdown table
next to it.  Needs root (loop devices, tracefs).  Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ferry.azurite import Azurite
from ferry.blockio import DirectReader
from ferry.embedded import Embedded, copy_tree_sample

MiB = 1 << 20
HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
RESULTS = HERE / "results"
DISK = "src01-disk0"


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def digest(path: str, size: int) -> str:
    reader = DirectReader(path, 8 * MiB)
    h = hashlib.sha256()
    try:
        for off in range(0, size, 8 * MiB):
            h.update(reader.read(off, min(8 * MiB, size - off)))
    finally:
        reader.close()
    return h.hexdigest()


# -- data -------------------------------------------------------------------------------


def base_image(size: int) -> Path:
    """An ext4 image about half full of real files (made once, cached)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    image = CACHE / f"ext4-{size // MiB}m.img"
    if image.exists():
        return image
    say(f"making {image.name}: ext4, about half full of files from /usr")
    tmp = image.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.truncate(size)
    sh(
        "mkfs.ext4",
        "-q",
        "-F",
        "-b",
        "4096",
        "-E",
        "lazy_itable_init=0,lazy_journal_init=0",
        str(tmp),
    )
    with mounted(tmp) as mnt:
        copy_tree_sample(mnt, size // 2, ("/usr/lib", "/usr/share", "/usr/local"))
    os.replace(tmp, image)
    return image


class mounted:
    """Mount an image (through a loop device) for the duration of a with-block."""

    def __init__(self, image: Path) -> None:
        self.image = image
        self.mnt = Path(tempfile.mkdtemp(prefix="ferry-bench-mnt-"))

    def __enter__(self) -> Path:
        self.loop = sh("losetup", "--find", "--show", str(self.image))
        sh("mount", self.loop, str(self.mnt))
        return self.mnt

    def __exit__(self, *exc: object) -> None:
        sh("umount", str(self.mnt))
        sh("losetup", "-d", self.loop)
        self.mnt.rmdir()


def change_one_percent(mnt: Path, size: int, seed: int = 5) -> int:
    """Overwrite 4 KiB pieces inside many existing files until ~1% of the disk changed."""
    rng = random.Random(seed)
    files = [p for p in mnt.rglob("*") if p.is_file() and p.stat().st_size >= 8192]
    rng.shuffle(files)
    budget, changed = size // 100, 0
    for path in files:
        if changed >= budget:
            break
        with open(path, "r+b") as f:
            length = path.stat().st_size
            for _ in range(rng.randint(1, 4)):
                offset = rng.randrange(0, length - 4096) // 4096 * 4096
                f.seek(offset)
                f.write(rng.randbytes(4096))
                changed += 4096
    os.sync()
    return changed


# -- Ferry runs -----------------------------------------------------------------------


class FerryRun:
    """A loop device over a copy of the image, replicated by the embedded deployment."""

    def __init__(
        self, azurite: Azurite, image: Path, work: Path, agent: dict | None = None
    ) -> None:
        self.work = work
        self.size = image.stat().st_size
        self.source = work / "source.img"
        shutil.copyfile(image, self.source)
        self.loop = sh("losetup", "--find", "--show", "--direct-io=on", str(self.source))
        self.target = work / "target.img"
        self.emb = Embedded(work / "ferry", tenant="bench", machine="src01", azurite=azurite)
        self.emb.start_storage()
        self.emb.configure(
            [{"id": DISK, "device": self.loop}],
            {DISK: str(self.target)},
            agent={"freeze_after": 30.0, **(agent or {})},
        )

    def initial_sync(self) -> float:
        self.emb.start("process-server")
        self.emb.wait_port()
        self.emb.start("master-target")
        drop_caches()
        t0 = time.monotonic()
        self.emb.start("agent")
        while True:
            self.emb.check_alive()
            status = self.emb.agent_status() or {}
            d = (status.get("disks") or [{}])[0]
            if d.get("phase") == "replicating" and d.get("last_tag"):
                self.emb.wait_applied(d["last_tag"]["id"], timeout=1800)
                return time.monotonic() - t0
            time.sleep(0.05)

    def converge(self) -> float:
        """Tag now and wait until the target applied it; seconds taken."""
        t0 = time.monotonic()
        tag = self.emb.tag("crash")
        self.emb.wait_applied(tag["id"], timeout=1800)
        return time.monotonic() - t0

    def verify(self) -> bool:
        return digest(str(self.target), self.size) == digest(self.loop, self.size)

    def close(self) -> None:
        self.emb.close()
        subprocess.run(["umount", str(self.work / "mnt")], capture_output=True)
        subprocess.run(["losetup", "-d", self.loop], capture_output=True)


def bench_initial(azurite: Azurite, image: Path, runs: int) -> dict:
    size = image.stat().st_size
    ferry, cp = [], []
    for i in range(runs):
        with tempfile.TemporaryDirectory(prefix="ferry-bench-", dir=CACHE) as tmp:
            dest = Path(tmp) / "copy.img"
            drop_caches()
            t0 = time.monotonic()
            sh("cp", "--sparse=always", str(image), str(dest))
            os.sync()
            cp.append(time.monotonic() - t0)
            dest.unlink()
            run = FerryRun(azurite, image, Path(tmp))
            try:
                ferry.append(run.initial_sync())
                ok = run.verify()
            finally:
                run.close()
            say(
                f"initial sync run {i + 1}: ferry {ferry[-1]:.1f} s (verified: {ok}), cp {cp[-1]:.1f} s"
            )
            if not ok:
                raise SystemExit("target differs from source: this is a bug")
    f, c = statistics.median(ferry), statistics.median(cp)
    return {
        "disk_bytes": size,
        "ferry_s": f,
        "cp_sparse_s": c,
        "ferry_mb_s": size / f / 1e6,
        "cp_mb_s": size / c / 1e6,
        "ratio_to_cp": f / c,
        "runs": {"ferry": ferry, "cp": cp},
    }


def bench_delta(azurite: Azurite, image: Path, runs: int) -> dict:
    times, changed = [], 0
    for i in range(runs):
        with tempfile.TemporaryDirectory(prefix="ferry-bench-", dir=CACHE) as tmp:
            run = FerryRun(azurite, image, Path(tmp))
            try:
                run.initial_sync()
                mnt = Path(tmp) / "mnt"
                mnt.mkdir()
                sh("mount", run.loop, str(mnt))
                changed = change_one_percent(mnt, run.size, seed=i)
                sh("umount", str(mnt))
                times.append(run.converge())
                ok = run.verify()
            finally:
                run.close()
            say(
                f"delta run {i + 1}: {changed / MiB:.0f} MiB changed, converged in {times[-1]:.2f} s (verified: {ok})"
            )
    return {"changed_bytes": changed, "ferry_converge_s": statistics.median(times), "runs": times}


class RateWriter(threading.Thread):
    """Random O_DIRECT writes of 4-64 KiB at ``rate`` bytes/s; records completion times."""

    def __init__(self, device: str, size: int, rate: int) -> None:
        super().__init__(daemon=True)
        self.device, self.size, self.rate = device, size, rate
        self.stop = threading.Event()
        self.done: list[float] = []

    def run(self) -> None:
        rng = random.Random(3)
        fd = os.open(self.device, os.O_WRONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, 64 * 1024)
        buf.write(os.urandom(64 * 1024))
        start, written = time.monotonic(), 0
        try:
            while not self.stop.is_set():
                n = rng.choice([4096, 8192, 16384, 32768, 65536])
                off = rng.randrange(0, self.size - n) // 4096 * 4096
                buf[0:8] = os.urandom(8)
                os.pwritev(fd, [memoryview(buf)[:n]], off)
                self.done.append(time.time())
                written += n
                ahead = written / self.rate - (time.monotonic() - start)
                if ahead > 0:
                    self.stop.wait(ahead)
        finally:
            os.close(fd)


def bench_rpo(azurite: Azurite, image: Path, rates: list[int], seconds: float) -> dict:
    out = {}
    with tempfile.TemporaryDirectory(prefix="ferry-bench-", dir=CACHE) as tmp:
        run = FerryRun(azurite, image, Path(tmp))
        try:
            run.initial_sync()
            for rate in rates:
                out[str(rate)] = rpo_at(run, rate * MiB, seconds)
                r = out[str(rate)]
                say(
                    f"RPO at {rate} MiB/s: p50 {r['p50_s']:.2f} s, p99 {r['p99_s']:.2f} s, max {r['max_s']:.2f} s"
                )
        finally:
            run.close()
    return out


def rpo_at(run: FerryRun, rate: int, seconds: float) -> dict:
    writer = RateWriter(run.loop, run.size, rate)
    seen: list[tuple[float, float]] = []  # (tag t0_wall, applied_at)
    status0 = run.emb.agent_status()
    writer.start()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        state = run.emb.target_state(DISK) or {}
        tag = state.get("last_tag") or {}
        if tag.get("t0_wall") and (not seen or tag["t0_wall"] > seen[-1][0]):
            seen.append((tag["t0_wall"], state.get("applied_at") or time.time()))
        time.sleep(0.05)
    writer.stop.set()
    writer.join()
    tail = time.monotonic() + 60
    last = writer.done[-1] if writer.done else time.time()
    while (not seen or seen[-1][0] < last) and time.monotonic() < tail:
        state = run.emb.target_state(DISK) or {}
        tag = state.get("last_tag") or {}
        if tag.get("t0_wall") and (not seen or tag["t0_wall"] > seen[-1][0]):
            seen.append((tag["t0_wall"], state.get("applied_at") or time.time()))
        time.sleep(0.05)
    lags = []
    j = 0
    for w in writer.done:
        while j < len(seen) and seen[j][0] < w:
            j += 1
        if j == len(seen):
            break
        lags.append(seen[j][1] - w)
    lags.sort()
    status1 = run.emb.agent_status()
    passes = status1["passes"] - status0["passes"]
    frozen = status1["frozen_passes"] - status0["frozen_passes"]
    return {
        "writes": len(writer.done),
        "measured": len(lags),
        "p50_s": lags[len(lags) // 2] if lags else None,
        "p99_s": lags[int(len(lags) * 0.99)] if lags else None,
        "max_s": lags[-1] if lags else None,
        "passes": passes,
        "frozen_passes": frozen,
        "longest_freeze_s": status1["longest_freeze_s"],
    }


def machine() -> dict:
    return {
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "memory_gib": round(
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1
        ),
    }


def markdown(r: dict) -> str:
    i, d = r["initial"], r["delta"]
    lines = [
        f"Replication on the embedded default, {r['date']} ({r['machine']['cpus']} cores)",
        "",
        "| scenario | Ferry | peer | ratio |",
        "|---|---|---|---|",
        f"| initial sync of {i['disk_bytes'] / (1 << 30):.0f} GiB ext4, half full | {i['ferry_s']:.1f} s "
        f"({i['ferry_mb_s']:.0f} MB/s) | cp --sparse=always {i['cp_sparse_s']:.1f} s "
        f"({i['cp_mb_s']:.0f} MB/s) | {i['ratio_to_cp']:.2f}x cp |",
        f"| converge after {d['changed_bytes'] / MiB:.0f} MiB (1%) changed | {d['ferry_converge_s']:.2f} s | | |",
    ]
    for rate, x in r["rpo"].items():
        lines.append(
            f"| RPO at {rate} MiB/s random writes | p50 {x['p50_s']:.2f} s, p99 {x['p99_s']:.2f} s, "
            f"max {x['max_s']:.2f} s | | {x['frozen_passes']} of {x['passes']} passes frozen |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rates", default="5,10,20", help="MiB/s, comma separated")
    parser.add_argument("--rpo-seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.replication: error: needs root (loop devices, tracefs)", file=sys.stderr)
        return 2
    size = int(args.size_gib * (1 << 30))
    image = base_image(size)
    with Azurite() as azurite:
        result = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": machine(),
            "initial": bench_initial(azurite, image, args.runs),
            "delta": bench_delta(azurite, image, args.runs),
            "rpo": bench_rpo(
                azurite, image, [int(x) for x in args.rates.split(",")], args.rpo_seconds
            ),
        }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"{time.strftime('%Y-%m-%d')}-{socket.gethostname()}-replication"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
