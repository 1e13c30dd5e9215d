"""RPO under load and cutover, on a live (mounted) source.

The source filesystem is mounted before the agent starts, so the agent can
freeze it.  ``fio`` writes at random into a preallocated file on it with
direct I/O (psync, 4-64 KiB, fixed rate) and logs every write's completion
time on the monotonic clock (``--write_lat_log`` with ``--log_avg_msec=0
--log_alternate_epoch=1 --log_alternate_epoch_clock_id=1``), the clock of
the agent's t0: the wall clock can be stepped under a run.

RPO of a write completed at *w*: when the first tag with ``t0 >= w`` was
applied, minus *w* (:func:`bench.ferryrun.rpo_lags`).  fio logs whole milliseconds,
so *w* is rounded up to the next one: a tag counted as covering a write
always does, and the figure is at most 1 ms pessimistic (plus, for tags
known only from the master target's log, the few ms between the cursor's
fsync and the log line; see :class:`bench.ferryrun.TagWatcher`).
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.data import MiB, digest, say, sh
from bench.ferryrun import FerryRun, Measure, rpo_lags

_FROZE = re.compile(r"agent INFO froze .* for ([0-9.]+) s$")


def fio_layout(path: Path, size: int) -> None:
    """Write the file fio will overwrite, so its extents exist before we measure."""
    sh("fio", "--name=layout", f"--filename={path}", f"--size={size}", "--rw=write", "--bs=1m",
       "--direct=1", "--ioengine=psync", "--output-format=terse")  # fmt: skip


def fio_writes(path: Path, size: int, rate: int, seconds: float, seed: int) -> dict[str, Any]:
    """Random direct writes of 4-64 KiB at ``rate`` bytes/s; every completion time (monotonic s)."""
    with tempfile.TemporaryDirectory(prefix="ferry-bench-fio-") as tmp:
        prefix, out = Path(tmp) / "w", Path(tmp) / "out.json"
        sh("fio", "--name=rpo", f"--filename={path}", f"--size={size}", "--rw=randwrite",
           "--bsrange=4k-64k", "--blockalign=4k", "--direct=1", "--ioengine=psync",
           f"--rate={rate}", "--time_based", f"--runtime={seconds:g}", f"--randseed={seed}",
           f"--write_lat_log={prefix}", "--log_avg_msec=0", "--log_alternate_epoch=1",
           "--log_alternate_epoch_clock_id=1",
           "--output-format=json", f"--output={out}")  # fmt: skip
        writes, nbytes = [], 0
        for line in Path(f"{prefix}_lat.1.log").read_text().splitlines():
            ms, _lat, _dir, bs = (int(x) for x in line.split(",")[:4])
            writes.append((ms + 1) / 1000)
            nbytes += bs
        job = json.loads(out.read_text())["jobs"][0]["write"]
    writes.sort()
    span = (writes[-1] - writes[0]) if len(writes) > 1 else seconds
    return {
        "writes": writes,
        "bytes": nbytes,
        "achieved_mb_s": nbytes / max(span, 1e-9) / 1e6,
        "fio_bw_mb_s": job.get("bw_bytes", 0) / 1e6,
        "fio_lat_p99_ms": (job.get("clat_ns") or {}).get("percentile", {}).get("99.000000", 0)
        / 1e6,
    }


def quantiles(values: list[float]) -> dict[str, float | None]:
    """p50, p90, p99, max and mean of ``values`` (None when empty)."""
    if not values:
        return {"p50_s": None, "p90_s": None, "p99_s": None, "max_s": None, "mean_s": None}
    arr = np.asarray(values)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"p50_s": p50, "p90_s": p90, "p99_s": p99, "max_s": arr.max(), "mean_s": arr.mean()}


class Live:
    """A mounted source under Ferry, with a fio file of ``fio_size`` bytes on it."""

    def __init__(self, run: FerryRun, fio_size: int) -> None:
        if run.mnt is None:
            raise ValueError("a live run needs a mounted source (FerryRun(mount=True))")
        self.run = run
        self.fio_file = run.mnt / "fio.dat"
        self.fio_size = fio_size
        self.lags: dict[str, list[float]] = {}

    def prepare(self) -> dict[str, Any]:
        """Lay out the fio file, start Ferry and wait for the first tag."""
        fio_layout(self.fio_file, self.fio_size)
        sh("sync")
        self.run.start_servers()
        return self.run.initial_sync(timeline=False)

    def rpo(self, rate_mb: float, seconds: float, seed: int) -> dict[str, Any]:
        """RPO and cost while fio writes at ``rate_mb`` MB/s for ``seconds``."""
        run = self.run
        before = run.agent_counters()
        log_at = _size(run.emb.base / "agent.log")
        with Measure(run.meter()) as m:
            fio = fio_writes(self.fio_file, self.fio_size, int(rate_mb * 1e6), seconds, seed)
        after = run.agent_counters()
        writes = fio.pop("writes")
        run.converge_after(writes[-1])
        lags, uncovered = rpo_lags(writes, run.tags.history())
        self.lags.setdefault(f"{rate_mb:g}", []).extend(lags)
        passes = after["passes"] - before["passes"]
        frozen = after["frozen_passes"] - before["frozen_passes"]
        freezes = _freezes(run.emb.base / "agent.log", log_at)
        return {
            "rate_mb_s": rate_mb,
            **fio,
            "writes": len(writes),
            "measured": len(lags),
            "uncovered": uncovered,
            **quantiles(lags),
            "passes": passes,
            "clean_passes": after["clean_passes"] - before["clean_passes"],
            "frozen_passes": frozen,
            "frozen_share": frozen / passes if passes else 0.0,
            "longest_freeze_s": max(freezes, default=0.0),
            "bytes_shipped": after["bytes_shipped"] - before["bytes_shipped"],
            "cost": m.window.as_dict(),
        }

    def cutover(self, load_mb: float, load_seconds: float, seed: int) -> dict[str, Any]:
        """After a load, freeze the source, take the final tag, wait, verify the target."""
        fio_writes(self.fio_file, self.fio_size, int(load_mb * 1e6), load_seconds, seed)
        run, mnt = self.run, str(self.run.mnt)
        t_quiet = time.monotonic()
        sh("fsfreeze", "-f", mnt)
        try:
            t_req = time.monotonic()
            tag = run.emb.tag("crash", timeout=300)
            t_durable = time.monotonic()
            t0 = tag["t0_mono_ns"] / 1e9
            applied = run.tags.wait_for(lambda a: a.t0 >= t0, 600, run.emb.check_alive)
            t_seen = time.monotonic()
            same = _same_content(run.loop, run.target, run.size)
            t_digest = time.monotonic()
            clean = _fsck_clean(run.target)
            t_done = time.monotonic()
        finally:
            sh("fsfreeze", "-u", mnt, check=False)
        if not same:
            raise RuntimeError("cutover: the target differs from the frozen source")
        return {
            "seconds": t_done - t_req,
            "freeze_s": t_req - t_quiet,
            "tag_durable_s": t_durable - t_req,
            "applied_s": applied.at - t_req,
            "digest_s": t_digest - t_seen,
            "fsck_s": t_done - t_digest,
            "digest_equal": same,
            "fsck_clean": clean,
            "load_mb_s": load_mb,
            "load_seconds": load_seconds,
        }


def _same_content(source: str, target: Path, size: int) -> bool:
    """Digest source and target at once (each in a thread: reading dominates)."""
    out: dict[str, str] = {}
    threads = [
        threading.Thread(target=lambda k=k, p=p: out.__setitem__(k, digest(p, size)))
        for k, p in (("source", source), ("target", str(target)))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out.get("source") == out.get("target") and "source" in out


def _fsck_clean(target: Path) -> bool:
    """``e2fsck -fn`` (read-only, forced) finds nothing to fix."""
    return subprocess.run(["e2fsck", "-fn", str(target)], capture_output=True).returncode == 0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _freezes(log: Path, start: int) -> list[float]:
    """Durations of the freezes the agent logged after byte ``start`` of its log."""
    try:
        with open(log, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [float(m[1]) for line in text.splitlines() if (m := _FROZE.search(line))]


def fio_size_for(disk_size: int) -> int:
    """The fio file: a quarter of the disk (the image is about half full), whole MiB."""
    return max(64 * MiB, disk_size // 4 // MiB * MiB)


def aggregate(rounds: list[dict[str, Any]], lags: list[float]) -> dict[str, Any]:
    """One rate's figures over its rounds: medians of each round's figures, the worst
    freeze and peak memory, pass counts summed, and the pooled distribution."""
    med = statistics.median
    out: dict[str, Any] = {"rate_mb_s": rounds[0]["rate_mb_s"], "rounds": rounds}
    for key in ("achieved_mb_s", "p50_s", "p90_s", "p99_s", "max_s", "mean_s"):
        values = [r[key] for r in rounds if r[key] is not None]
        out[key] = med(values) if values else None
    for key in ("writes", "measured", "uncovered", "passes", "clean_passes", "frozen_passes"):
        out[key] = sum(r[key] for r in rounds)
    out["frozen_share"] = out["frozen_passes"] / out["passes"] if out["passes"] else 0.0
    out["longest_freeze_s"] = max(r["longest_freeze_s"] for r in rounds)
    pooled = quantiles(lags)
    out["pooled"] = {
        **pooled,
        "cdf": [float(x) for x in np.percentile(lags, np.arange(0, 100.5, 0.5))] if lags else [],
    }
    costs = [r["cost"] for r in rounds]
    names = costs[0]["cpu_s"].keys()
    seconds = med([c["seconds"] for c in costs])
    share = {n: med([c["core_share"][n] for c in costs]) for n in names}
    out["cost"] = {
        "seconds": seconds,
        "core_share": share,
        "cpu_s": {n: share[n] * seconds for n in names},
        "peak_rss_mib": {n: max(c["peak_rss_mib"][n] for c in costs) for n in names},
    }
    return out


def say_rpo(r: dict[str, Any]) -> None:
    """One progress line for an RPO window."""
    say(
        f"RPO at {r['rate_mb_s']:g} MB/s (achieved {r['achieved_mb_s']:.1f}): "
        f"p50 {r['p50_s']:.2f} s, p99 {r['p99_s']:.2f} s, max {r['max_s']:.2f} s; "
        f"{r['frozen_passes']}/{r['passes']} passes frozen; agent "
        f"{r['cost']['core_share']['agent'] * 100:.0f}% of a core, "
        f"{r['cost']['peak_rss_mib']['agent']:.0f} MiB"
    )
