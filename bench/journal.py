"""``make bench-journal``: what the recovery journal costs, and how fast an old point comes back.

    .venv/bin/python -m bench.journal            # 20 s per rate, an hour of 1 tag/s
    .venv/bin/python -m bench.journal --quick    # 8 s per rate, 10 minutes of tags

Part 1, journal on against off in one run: the same source (a loop device
over an image of random bytes, no filesystem) replicated end to end
(Azurite, the three daemons) twice, once with ``journal = true`` and once
with ``journal = false``; at each rate fio writes 4-64 KiB at random with
direct I/O.  Per rate: RPO (as bench/live.py measures it: for each write,
when the first tag covering it was applied), the master target's CPU share
and peak RSS, and the bytes the journal added on disk (its records; it
reads as many raw bytes from the target as before-images).

Part 2, materialising a point an hour old in compressed time: the journal
of one 1 GiB target (random bytes) is filled in process with one group per
tag, one tag a second for an hour of ``t0_wall`` (``--quick``: 10 minutes),
each group writing 8 random 4-64 KiB extents (about 2.2 MB/s of a source's
writes), as fast as this machine applies them.  Then the oldest point is
materialised the way a test failover does it (sparse copy, then the chain
rewound onto the copy) and checked against the target as it was.

Writes ``bench/results/journal-<date>-<host>.json`` and prints a Markdown
table for docs/performance.md.  Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.data import CACHE, HERE, MiB, say
from bench.ferryrun import DISK, FerryRun, Measure, rpo_lags
from bench.live import fio_writes, quantiles
from mastertarget import journal, layout, recovery
from mastertarget.target import Target

RESULTS = HERE / "results"
RATES = (5, 10, 20)


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def random_image(path: Path, size: int) -> None:
    """An image of random bytes, so before-images do not compress away (setup, not timed)."""
    rng = random.Random(3)
    with open(path, "wb") as f:
        for _ in range(size // (4 * MiB)):
            f.write(rng.randbytes(4 * MiB))


def rates_run(image: Path, work: Path, on: bool, seconds: float) -> list[dict[str, Any]]:
    """Replicate ``image`` with the journal ``on`` or off; RPO and cost at each rate."""
    run = FerryRun(image, work, agent={"freeze_after": 5.0}, master_target={"journal": on})
    out = []
    try:
        run.start_servers()
        run.initial_sync(timeline=False)
        state_dir = run.emb.base / "master-target"
        journal_dir = layout.journal_dir(state_dir, DISK)
        for i, rate in enumerate(RATES):
            before = _du(journal_dir)
            with Measure(run.meter()) as m:
                fio = fio_writes(Path(run.loop), run.size, rate * 1_000_000, seconds, seed=7 + i)
            writes = fio.pop("writes")
            run.converge_after(writes[-1])
            lags, uncovered = rpo_lags(writes, run.tags.history())
            window = m.window.as_dict()
            row = {
                "journal": on, "rate_mb_s": rate, "writes": len(writes), "uncovered": uncovered,
                "written_mb": fio.get("bytes", 0) / 1e6, **quantiles(lags),
                "mt_core_share": window["core_share"].get("master-target"),
                "mt_peak_rss_mib": window["peak_rss_mib"].get("master-target"),
                "journal_added_mb": (_du(journal_dir) - before) / 1e6,
                "journal_mb": _du(journal_dir) / 1e6,
                "points": len(recovery.disk_points(state_dir, DISK)),
            }  # fmt: skip
            say(f"journal {'on ' if on else 'off'} {rate:2d} MB/s: RPO p50 {_s(row.get('p50_s'))} "
                f"p99 {_s(row.get('p99_s'))}; master target {row['mt_core_share']:.2f} core, "
                f"{row['mt_peak_rss_mib']:.0f} MiB; journal +{row['journal_added_mb']:.0f} MB "
                f"for {row['written_mb']:.0f} MB written, {row['points']} points")  # fmt: skip
            out.append(row)
    finally:
        run.close()
    return out


def hour_old_point(work: Path, span_s: int, size: int = 1024 * MiB) -> dict[str, Any]:
    """Fill one disk's journal with ``span_s`` one-second points, then materialise the oldest."""
    state_dir = work / "state"
    disk = "bench-disk0"
    target_path = work / "target.img"
    random_image(target_path, size)
    target = Target(target_path).open()
    directory = layout.journal_dir(state_dir, disk)
    clock = {"now": time.time()}
    t0 = clock["now"] - span_s
    policy = journal.Policy(keep_all_s=span_s + 60, thin_every_s=300, window_s=86400,
                            budget_bytes=64 << 30)  # fmt: skip
    jr = journal.Journal(directory, disk, policy, now=lambda: clock["now"])
    tag0 = {"id": "p0", "kind": "crash", "t0_wall": t0}
    cursor = {"gen": 1, "applied_seq": 1, "last_tag": tag0}
    layout.disk_dir(state_dir, disk).mkdir(parents=True, exist_ok=True)
    jr.open(cursor)
    oldest_digest = _digest(target_path)
    rng = random.Random(9)
    began = time.monotonic()
    written = 0
    for i in range(1, span_s + 1):
        extents = []
        for _ in range(8):
            n = rng.choice([4096, 16384, 65536])
            extents.append((rng.randrange(0, size - n) // 4096 * 4096, n))
        tag = {"id": f"p{i}", "kind": "crash", "t0_wall": t0 + i}
        jr.before_group(cursor, {"gen": 1, "seq": i + 1, "tag": tag}, extents, target.read, size)
        for offset, n in extents:
            os.pwrite(target.fd, rng.randbytes(n), offset)  # type: ignore[arg-type]
            written += n
        cursor = {"gen": 1, "applied_seq": i + 1, "last_tag": tag}
        clock["now"] = t0 + i + 0.5  # compressed time: the journal sees one tag a second
        jr.after_group(cursor)
    target.sync()
    fill_s = time.monotonic() - began
    durable_cursor = layout.cursor_path(state_dir, disk)
    durable_cursor.write_text(json.dumps({"tenant": "bench", "disk": disk, **cursor}))
    began = time.monotonic()
    made = recovery.materialise_disk(state_dir, disk, target_path, work / "point.img", "p0")
    seconds = time.monotonic() - began
    same = _digest(work / "point.img") == oldest_digest
    target.close()
    result = {
        "span_s": span_s, "points": len(recovery.disk_points(state_dir, disk)),
        "disk_mib": size // MiB, "source_writes_mb": written / 1e6,
        "journal_mb": _du(directory) / 1e6, "fill_s": round(fill_s, 1),
        "materialise_s": round(seconds, 1), "copy_s": made["copy_s"], "rewind_s": made["rewind_s"],
        "undo_records": made["undo_records"], "undo_mb": made["undo_bytes"] / 1e6,
        "apply_held_s": made["apply_held_s"], "equal_to_the_point": same,
    }  # fmt: skip
    say(f"point {span_s} s old: {result['materialise_s']} s to materialise ({made['copy_s']} s "
        f"copy, {made['rewind_s']} s rewinding {result['undo_mb']:.0f} MB of "
        f"{made['undo_records']} records), equal: {same}")  # fmt: skip
    return result


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| rate | journal | RPO p50 | RPO p99 | MT CPU (core) | MT peak RSS | source writes "
        "| journal added | points |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rates"]:
        lines.append(
            f"| {r['rate_mb_s']} MB/s | {'on' if r['journal'] else 'off'} | {_s(r.get('p50_s'))} "
            f"| {_s(r.get('p99_s'))} | {r['mt_core_share']:.2f} | {r['mt_peak_rss_mib']:.0f} MiB "
            f"| {r['written_mb']:.0f} MB | {r['journal_added_mb']:.0f} MB | {r['points']} |"
        )
    h = result["hour"]
    lines += [
        "",
        f"Materialising the oldest of {h['points']} points, {h['span_s']} s old, on a "
        f"{h['disk_mib']} MiB disk after {h['source_writes_mb']:.0f} MB of writes "
        f"({h['journal_mb']:.0f} MB of journal): {h['materialise_s']} s ({h['copy_s']} s copy, "
        f"{h['rewind_s']} s rewinding {h['undo_mb']:.0f} MB in {h['undo_records']} records; "
        f"applying held {h['apply_held_s']} s); equal to the point: {h['equal_to_the_point']}.",
    ]
    return "\n".join(lines)


def _s(value: Any) -> str:
    return f"{value:.2f} s" if isinstance(value, int | float) else "-"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.journal", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    seconds, span = (8.0, 600) if args.quick else (20.0, 3600)
    CACHE.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="journal-", dir=CACHE) as tmp:
        work = Path(tmp)
        image = work / "source.img"
        random_image(image, 256 * MiB)
        rates = []
        for on in (True, False):
            rates += rates_run(image, work / ("on" if on else "off"), on, seconds)
        shutil.rmtree(work / "on", ignore_errors=True)
        shutil.rmtree(work / "off", ignore_errors=True)
        hour_dir = work / "hour"
        hour_dir.mkdir()
        hour = hour_old_point(hour_dir, span)
    result = {"host": socket.gethostname(), "platform": platform.platform(),
              "cpus": os.cpu_count(), "started": started, "quick": args.quick,
              "seconds_per_rate": seconds, "rates": rates, "hour": hour}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    name = f"journal-{time.strftime('%Y%m%d-%H%M', time.gmtime(started))}-{socket.gethostname()}"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
