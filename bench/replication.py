"""``make bench``: Ferry side by side with the tools a user would otherwise run.

    .venv/bin/python -m bench.replication            # full: 2 GiB, 3 runs, 3 x 60 s per rate
    .venv/bin/python -m bench.replication --quick    # 512 MiB, 1 run, 15 s per rate

Everything runs on the embedded default (Azurite, the three daemons as
subprocesses, mutual TLS) on this machine, and needs root (loop devices,
tracefs, fsfreeze, drop_caches).  Scenarios:

1. initial sync of an ext4 image about half full of real files: Ferry end to
   end (target verified) against ``cp --sparse=always``, ``rsync`` and
   ``casync``, each run timing every tool on a cold cache;
2. delta after about 1% of the disk changed: Ferry's convergence against
   ``rsync --inplace --no-whole-file``, ``rdiff`` and a digest-compare scan;
3. RPO under fio random writes at each rate, with pass and freeze counts;
4. cost: CPU seconds and peak memory of each daemon and of Azurite;
5. cutover: final tag on a frozen source to a verified target;

plus a py-spy profile of the daemons during an extra, untimed initial sync
and under the highest write rate.  Writes ``bench/results/<date>-<host>.json``,
``.md`` and PNG charts; a full run also refreshes the generated block of
``docs/performance.md``.  Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import peers, report
from bench.data import (
    CACHE,
    HERE,
    Dataset,
    GiB,
    MiB,
    dataset,
    digest,
    drop_caches,
    replay_diff,
    say,
)
from bench.ferryrun import DAEMONS, FerryRun
from bench.live import Live, aggregate, fio_size_for, say_rpo
from bench.profiling import PySpy, summarize

RESULTS = HERE / "results"
DOC = HERE.parent / "docs" / "performance.md"
TOOLS = ("fio", "rsync", "casync", "rdiff", "mkfs.ext4", "e2fsck", "fsfreeze", "losetup")


# -- one run of scenarios 1 and 2 ----------------------------------------------------------


def copy_run(data: Dataset, i: int, verify: bool, tunables: dict[str, Any]) -> dict[str, Any]:
    """Peers then Ferry on the same images: initial copy and delta, timed in this run."""
    with tempfile.TemporaryDirectory(prefix="run-", dir=CACHE) as tmp:
        work = Path(tmp)
        out: dict[str, Any] = {"initial_peers": peers.initial_peers(data, work, verify)}
        out["delta_peers"] = peers.delta_peers(data, work, verify)
        run = FerryRun(Path(data.base), work / "ferry", **tunables)
        try:
            run.start_servers()
            out["ferry_initial"] = run.initial_sync()
            if digest(run.target, data.size) != data.base_digest:
                raise RuntimeError("Ferry's target differs from the source after the initial sync")
            out["ferry_delta"] = ferry_delta(run, data)
        finally:
            run.close()
    p, f = out["initial_peers"], out["ferry_initial"]
    say(
        f"run {i + 1}: initial cp {p['cp']['total']:.1f} s, rsync {p['rsync']['total']:.1f} s, "
        f"casync {p['casync']['total']:.1f} s, Ferry {f['seconds']:.1f} s (verified) | delta "
        f"rsync {out['delta_peers']['rsync']['total']:.1f} s, rdiff "
        f"{out['delta_peers']['rdiff']['total']:.1f} s, scan {out['delta_peers']['scan']['total']:.1f}"
        f" s, Ferry {out['ferry_delta']['seconds']:.2f} s (verified)"
    )
    return out


def ferry_delta(run: FerryRun, data: Dataset) -> dict[str, Any]:
    """Write A→B's differing blocks onto the live source; time until the target has them."""
    before = run.agent_counters()
    drop_caches()
    first = time.monotonic()
    # From the last write's completion: a tag whose t0 is after it holds the whole change.
    # (Measured from after the fsync that follows, a pass that ran during the fsync held the
    # change yet was not counted, and the next tag came with the idle interval, 10 s later.)
    written, done = replay_diff(data, run.loop)
    applied = run.converge_after(done)
    after = run.agent_counters()
    if digest(run.target, data.size) != data.changed_digest:
        raise RuntimeError("Ferry's target differs from state B after the delta")
    return {
        "seconds": applied.at - done,
        "from_first_write_s": applied.at - first,
        "change_s": done - first,
        "bytes_written": written,
        "bytes_shipped": after["bytes_shipped"] - before["bytes_shipped"],
        "passes": after["passes"] - before["passes"],
    }


# -- scenarios 3 and 5, and the profile ----------------------------------------------------------


def live_run(data: Dataset, args: argparse.Namespace, tunables: dict[str, Any]) -> dict[str, Any]:
    """RPO at each rate, then cutovers, on one mounted source; optionally profiled at the end."""
    with tempfile.TemporaryDirectory(prefix="live-", dir=CACHE) as tmp:
        run = FerryRun(Path(data.base), Path(tmp) / "ferry", mount=True, **tunables)
        try:
            live = Live(run, fio_size_for(data.size))
            prepared = live.prepare()
            say(f"live source replicated ({prepared['seconds']:.1f} s); measuring RPO")
            rounds: dict[str, list[dict[str, Any]]] = {f"{rate:g}": [] for rate in args.rates}
            for k in range(args.rpo_rounds):
                for n, rate in enumerate(args.rates):
                    rounds[f"{rate:g}"].append(live.rpo(rate, args.rpo_seconds, 100 + 10 * k + n))
                    say_rpo(rounds[f"{rate:g}"][-1])
            rpo = {rate: aggregate(xs, live.lags[rate]) for rate, xs in rounds.items()}
            cutovers = []
            for n in range(args.cutovers):
                cutovers.append(live.cutover(args.load_mb, args.load_seconds, seed=200 + n))
                c = cutovers[-1]
                say(
                    f"cutover {n + 1}: {c['seconds']:.2f} s (tag durable {c['tag_durable_s']:.2f}"
                    f" s, applied {c['applied_s']:.2f} s, verified: digest "
                    f"{c['digest_equal']}, e2fsck clean {c['fsck_clean']})"
                )
            profile = None
            if args.profile:
                profile = profile_load(live, max(args.rates), args.profile_seconds)
            steps = run.tags.clock.steps
            for wall, step in steps:
                say(f"the wall clock was stepped by {step:+.2f} s at "
                    f"{time.strftime('%H:%M:%S', time.localtime(wall))}; the figures use the "
                    "monotonic clock and do not see it")  # fmt: skip
        finally:
            run.close()
    return {
        "rpo": rpo,
        "cutovers": cutovers,
        "lags": live.lags,
        "profile": profile,
        "clock_steps": [{"wall": w, "step_s": s} for w, s in steps],
    }


def profile_load(live: Live, rate: float, seconds: float) -> dict[str, Any]:
    """py-spy on every daemon while fio writes at ``rate`` MB/s."""
    say(f"profiling the daemons under {rate:g} MB/s of writes for {seconds:g} s")
    spies = _spy(live.run, Path(live.run.work), "load")
    kept = {rate: list(lags) for rate, lags in live.lags.items()}
    live.rpo(rate, seconds, seed=300)
    live.lags = kept  # a profiled window is perturbed: keep it out of the RPO figures
    return _unspy(spies)


def profile_initial(data: Dataset, tunables: dict[str, Any]) -> dict[str, Any]:
    """An extra, untimed initial sync with py-spy on every daemon."""
    say("profiling an extra initial sync (not timed)")
    with tempfile.TemporaryDirectory(prefix="prof-", dir=CACHE) as tmp:
        run = FerryRun(Path(data.base), Path(tmp) / "ferry", **tunables)
        try:
            run.start_servers()
            spies = _spy(run, Path(tmp), "initial", skip=("agent",))
            drop_caches()
            started = time.monotonic()
            run.emb.start("agent")
            spies.update(_spy(run, Path(tmp), "initial", only=("agent",)))
            first = run.tags.wait_for(lambda a: True, 1800, run.emb.check_alive)
            out = _unspy(spies)
            out["seconds_profiled_run"] = first.at - started
        finally:
            run.close()
    return out


def _spy(run: FerryRun, where: Path, label: str, skip=(), only=None) -> dict[str, PySpy]:
    spies = {}
    for name in DAEMONS:
        if name in skip or (only and name not in only) or name not in run.emb.procs:
            continue
        spies[name] = PySpy(run.emb.procs[name].pid, where / f"{label}-{name}.txt")
    return spies


def _unspy(spies: dict[str, PySpy]) -> dict[str, Any]:
    out = {}
    for name, spy in spies.items():
        raw = spy.stop()
        out[name] = summarize(raw) if raw else {"samples": 0, "error": "py-spy wrote nothing"}
    return out


# -- figures ------------------------------------------------------------------------------------


def median_of(values: list[float]) -> float:
    """Median; the figure every table shows."""
    return statistics.median(values)


def assemble(
    data: Dataset, runs: list[dict[str, Any]], live: dict[str, Any], args, started: float
) -> dict[str, Any]:
    """The results dict: medians, ratios, goals, and every run's raw figures."""
    cp = [r["initial_peers"]["cp"]["total"] for r in runs]
    initial_peers = {}
    for name in ("cp", "rsync", "casync"):
        xs = [r["initial_peers"][name]["total"] for r in runs]
        initial_peers[name] = {
            "seconds": median_of(xs),
            "runs": xs,
            "ratio_to_cp": median_of([x / c for x, c in zip(xs, cp, strict=True)]),
            "parts": [r["initial_peers"][name] for r in runs],
        }
    ferry_runs = [r["ferry_initial"] for r in runs]
    fs = [f["seconds"] for f in ferry_runs]
    mid = ferry_runs[fs.index(sorted(fs)[len(fs) // 2])]
    cost = mid["cost"]
    cost["per_gib_disk"] = {k: v / (data.size / GiB) for k, v in cost["cpu_s"].items()}
    cost["per_gib_shipped"] = {
        k: v / (mid["bytes_shipped"] / GiB) for k, v in cost["cpu_s"].items()
    }
    ferry = {
        "seconds": median_of(fs),
        "runs": fs,
        "ratio_to_cp": median_of([f / c for f, c in zip(fs, cp, strict=True)]),
        "mb_s": data.size / median_of(fs) / 1e6,
        "bytes_read": mid["bytes_read"],
        "bytes_shipped": mid["bytes_shipped"],
        "cost": cost,
        "timeline": mid["timeline"],
        "stages": stages(mid["timeline"]),
    }
    delta_peers: dict[str, dict[str, Any]] = {}
    speedup: dict[str, float] = {}
    ds = [r["ferry_delta"]["seconds"] for r in runs]
    for name in ("rsync", "rdiff", "scan"):
        xs = [r["delta_peers"][name]["total"] for r in runs]
        delta_peers[name] = {
            "seconds": median_of(xs),
            "runs": xs,
            "parts": [r["delta_peers"][name] for r in runs],
        }
        speedup[name] = median_of([x / d for x, d in zip(xs, ds, strict=True)])
    fastest_scan = min(delta_peers, key=lambda n: delta_peers[n]["seconds"])
    cut = live["cutovers"]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
        "duration_s": time.time() - started,
        "machine": machine(),
        "code": code_state(),
        "tools": peers.versions(),
        "settings": {
            "quick": args.quick,
            "runs": args.runs,
            "rates_mb_s": args.rates,
            "rpo_seconds": args.rpo_seconds,
            "rpo_rounds": args.rpo_rounds,
            "fio_size": fio_size_for(data.size),
            "cutovers": args.cutovers,
            "load_mb_s": args.load_mb,
            "load_seconds": args.load_seconds,
            "agent": _parse_kv(args.agent),
            "process_server": _parse_kv(args.process_server),
        },
        "data": data.describe(),
        "initial": {"peers": initial_peers, "ferry": ferry},
        "delta": {
            "ferry": {
                "seconds": median_of(ds),
                "runs": ds,
                **{
                    k: median_of([r["ferry_delta"][k] for r in runs])
                    for k in ("from_first_write_s", "change_s", "bytes_shipped", "passes")
                },
            },
            "peers": delta_peers,
            "speedup": speedup,
            "fastest_scanning_peer": fastest_scan,
            "speedup_fastest": speedup[fastest_scan],
        },
        "rpo": live["rpo"],
        "cutover": {
            **{
                k: median_of([c[k] for c in cut])
                for k in ("seconds", "tag_durable_s", "applied_s", "digest_s", "fsck_s")
            },
            "runs": cut,
        },
        "profile": live.get("profile_all") or {},
    }
    result["goals"] = report.goals(result)
    return result


def stages(line: list[dict[str, Any]]) -> dict[str, float | None]:
    """When each stage of the initial sync finished (seconds since the agent started)."""

    def done(key: str) -> float | None:
        if not line or not line[-1][key]:
            return None
        final = line[-1][key]
        return next(s["t"] for s in line if s[key] >= final)

    return {
        "agent_read_done_s": done("agent_read"),
        "ps_uploaded_done_s": done("ps_uploaded_raw"),
        "mt_applied_done_s": done("mt_applied"),
        "first_read_s": next((s["t"] for s in line if s["agent_read"]), None),
    }


def machine() -> dict[str, Any]:
    """The machine's description.

    A virtual machine's model name can be as short as "AMD EPYC", so the CPU's
    family, model and the instruction sets the ciphers and zstd use are kept
    too: CPU seconds per GiB are only comparable between runs on one kind of CPU.
    """
    facts: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor is enough
            key, _, value = line.partition(":")
            facts[key.strip()] = value.strip()
    except OSError:
        pass
    flags = set(facts.get("flags", "").split())
    sets = ("aes", "vaes", "vpclmulqdq", "avx2", "avx512f")
    noted = " ".join(f for f in sets if f in flags) or f"none of {', '.join(sets)}"
    return {
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "cpu_model": facts.get("model name", "?"),
        "cpu_id": f"family {facts.get('cpu family', '?')}, model {facts.get('model', '?')}, "
        f"stepping {facts.get('stepping', '?')}; {noted}",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
        "load_average_at_end": os.getloadavg(),
    }


def code_state() -> dict[str, Any]:
    """The commit measured, and whether the daemons' code had uncommitted changes."""
    root = HERE.parent

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--", "agent", "processserver", "mastertarget", "ferry")
    return {"commit": git("rev-parse", "HEAD") or "unknown", "dirty": bool(dirty),
            "dirty_paths": dirty.splitlines()[:20]}  # fmt: skip


def _parse_kv(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


# -- main -----------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Command line; ``--quick`` changes the defaults of the sizing options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="512 MiB image, 1 run, 15 s per rate, 1 cutover (for iterating)",
    )
    p.add_argument("--size-mib", type=int, help="disk size (default 2048; quick 512)")
    p.add_argument("--runs", type=int, help="runs of scenarios 1-2 (default 3; quick 1)")
    p.add_argument("--rates", help="MB/s of writes, comma separated (default 5,10,20,50)")
    p.add_argument("--rpo-seconds", type=float, help="seconds per rate (default 60; quick 15)")
    p.add_argument("--rpo-rounds", type=int, help="rounds over all rates (default 3; quick 1)")
    p.add_argument("--cutovers", type=int, help="cutovers measured (default 3; quick 1)")
    p.add_argument("--load-mb", type=float, default=10.0, help="MB/s of writes before a cutover")
    p.add_argument("--load-seconds", type=float, help="seconds of load before a cutover (15; 5)")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip py-spy")
    p.add_argument("--profile-seconds", type=float, help="seconds profiled under load (20; 10)")
    p.add_argument(
        "--agent",
        action="append",
        metavar="KEY=VALUE",
        help="agent setting for every Ferry run (see agent/settings.py)",
    )
    p.add_argument(
        "--process-server",
        action="append",
        metavar="KEY=VALUE",
        help="process server setting (see processserver/settings.py)",
    )
    p.add_argument("--label", default="", help="suffix for the results files")
    p.add_argument(
        "--no-docs",
        dest="docs",
        action="store_false",
        help="do not refresh docs/performance.md (quick runs never do)",
    )
    args = p.parse_args(argv)  # fmt: skip
    q = args.quick
    args.size_mib = args.size_mib or (512 if q else 2048)
    args.runs = args.runs or (1 if q else 3)
    args.rates = [float(x) for x in (args.rates or "5,10,20,50").split(",")]
    args.rpo_seconds = args.rpo_seconds or (15.0 if q else 60.0)
    args.rpo_rounds = args.rpo_rounds or (1 if q else 3)
    args.cutovers = args.cutovers or (1 if q else 3)
    args.load_seconds = args.load_seconds or (5.0 if q else 15.0)
    args.profile_seconds = args.profile_seconds or (10.0 if q else 20.0)
    return args


def preflight() -> str | None:
    """Why the benchmark cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (loop devices, tracefs, fsfreeze, drop_caches)"
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [t for t in TOOLS if not shutil.which(t, path=path)]
    if missing:
        return f"missing tools: {', '.join(missing)} (make bench installs them)"
    if not Path(sys.executable).with_name("py-spy").exists():
        return "py-spy is not installed in the virtualenv (make bench installs it)"
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.replication``."""
    args = parse(argv)
    problem = preflight()
    if problem:
        print(f"bench.replication: error: {problem}", file=sys.stderr)
        return 2
    os.environ["PATH"] = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    started = time.time()
    tunables = {
        "agent": _parse_kv(args.agent) or None,
        "process_server": _parse_kv(args.process_server) or None,
    }
    data = dataset(args.size_mib * MiB)
    say(
        f"data: {data.size // MiB} MiB image, {data.files_bytes / MiB:.0f} MiB of files; "
        f"{data.diff_blocks} blocks differ in state B"
    )
    runs = []
    for i in range(args.runs):
        runs.append(copy_run(data, i, verify=(i == 0), tunables=tunables))
    live = live_run(data, args, tunables)
    if args.profile:
        live["profile_all"] = {
            "initial_sync": profile_initial(data, tunables),
            f"load_{max(args.rates):g}_mb_s": live["profile"],
        }
    result = assemble(data, runs, live, args, started)
    write(result, live["lags"], args)
    return 0


def write(result: dict[str, Any], lags: dict[str, list[float]], args) -> None:
    """The JSON, markdown and charts; the docs' generated block after a full run."""
    RESULTS.mkdir(exist_ok=True)
    name = f"{time.strftime('%Y-%m-%d')}-{socket.gethostname()}"
    if args.quick:
        name += "-quick"
    if args.label:
        name += f"-{args.label}"
    stem = RESULTS / name
    charts = report.charts(result, lags, stem)
    result["charts"] = charts
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    table = report.markdown(result, charts)
    stem.with_suffix(".md").write_text(table)
    print()
    print(table)
    full = args.docs and not args.quick and not args.label
    if full and report.update_doc(DOC, table, "../bench/results"):
        say(f"refreshed the figures in {DOC.relative_to(HERE.parent)}")
    say(f"wrote {stem.with_suffix('.json').relative_to(HERE.parent)} and its .md and charts")


if __name__ == "__main__":
    sys.exit(main())
