"""``make bench-soak``: random writes for a long time; RPO per window and memory over time.

    .venv/bin/python -m bench.soak                        # 30 minutes at 20 MB/s, 5-minute windows
    .venv/bin/python -m bench.soak --minutes 6 --window-minutes 1     # a short run
    .venv/bin/python -m bench.soak --minutes 12 --window-minutes 2 --journal-keep-all-minutes 3

The live source of ``make bench`` (a mounted ext4 image, the agent able to
freeze it) is replicated on the embedded default; fio then writes at random
(direct I/O, 4-64 KiB) at ``--rate`` MB/s, window after window, each window
one fio run (``bench.live``: RPO of a write = when the first tag with t0
at or after its completion was applied, minus its completion, on the
monotonic clock).  Per window: RPO
p50/p99/max, passes and clean passes, CPU share of each daemon.  Every 5 s,
each daemon's resident memory.  Writes ``bench/results/<date>-<host>-soak.{json,md,png}``.
Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import campaign
from bench.data import CACHE, HERE, MiB, dataset, say
from bench.ferryrun import DAEMONS, FerryRun
from bench.live import Live, fio_size_for, say_rpo

NAMES = (*DAEMONS, "azurite")


class MemorySampler(threading.Thread):
    """Each daemon's resident memory every ``period`` seconds."""

    def __init__(self, run: FerryRun, period: float = 5.0) -> None:
        super().__init__(name="memory", daemon=True)
        self.run_, self.period = run, period
        self.samples: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop.wait(self.period):
            now = self.run_.meter().read()
            self.samples.append(
                {
                    "t": time.monotonic() - self.t0,
                    "rss_mib": {n: now[n]["rss_mib"] for n in NAMES if n in now},
                    "load": os.getloadavg()[0],
                }
            )


def soak(args: argparse.Namespace) -> dict[str, Any]:
    """Replicate a live source and write at random for ``args.minutes``, window by window."""
    data = dataset(args.size_mib * MiB)
    windows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="soak-", dir=CACHE) as tmp:
        keep_all = args.journal_keep_all_minutes
        settings = None if keep_all is None else {"journal_keep_all_minutes": keep_all}
        run = FerryRun(Path(data.base), Path(tmp) / "ferry", mount=True, master_target=settings)
        sampler = MemorySampler(run)
        try:
            live = Live(run, fio_size_for(data.size))
            prepared = live.prepare()
            say(f"live source replicated ({prepared['seconds']:.1f} s); soaking")
            sampler.start()
            count = max(1, round(args.minutes / args.window_minutes))
            for k in range(count):
                window = live.rpo(args.rate, args.window_minutes * 60, seed=500 + k)
                window["index"] = k
                window["load_average"] = os.getloadavg()
                windows.append(window)
                say_rpo(window)
        finally:
            sampler.stop.set()
            run.close()
    return {"windows": windows, "memory": sampler.samples, "fio_size": fio_size_for(data.size)}


def markdown(result: dict[str, Any], chart: str) -> str:
    """The soak's table: one row per window."""
    a = result["settings"]
    rows = [
        f"{campaign.measured(result)}: {a['minutes']:g} minutes of fio random writes at {a['rate']:g} MB/s into a "
        f"{result['fio_size'] / MiB:.0f} MiB file, {a['window_minutes']:g}-minute windows"
        + (
            f"; the master target keeps every point {a['journal_keep_all_minutes']:g} minutes "
            "(its default: 60)."
            if a.get("journal_keep_all_minutes") is not None
            else "."
        ),  # fmt: skip
        "",
        "| window | achieved MB/s | writes | RPO p50 s | p99 s | max s | passes clean | "
        + " | ".join(f"{n} % core" for n in NAMES)
        + " | steal % core | load |",
        "|--:|--:|--:|--:|--:|--:|--:|" + "--:|" * len(NAMES) + "--:|--:|",
    ]
    for w in result["windows"]:
        share = w["cost"]["core_share"]
        clean = f"{w['clean_passes']}/{w['passes']}"
        rows.append(
            f"| {w['index'] + 1} | {w['achieved_mb_s']:.1f} | {w['writes']} | "
            f"{w['p50_s']:.2f} | {w['p99_s']:.2f} | {w['max_s']:.2f} | {clean} | "
            + " | ".join(f"{share[n] * 100:.0f}" for n in NAMES)
            + f" | {share.get('steal', 0.0) * 100:.0f} | {w['load_average'][0]:.1f} |"
        )
    mem = result["memory"]
    if mem:
        rows += [
            "",
            "Resident memory, MiB (first sample → last, highest): "
            + "; ".join(
                f"{n} {mem[0]['rss_mib'].get(n, 0):.0f} → {mem[-1]['rss_mib'].get(n, 0):.0f}, "
                f"{max(s['rss_mib'].get(n, 0) for s in mem):.0f}"
                for n in NAMES
            ),
        ]
    return "\n".join([*rows, "", f"![Soak: RPO per window, memory over time]({chart})", ""])


def chart(result: dict[str, Any], path: Path) -> str:
    """RPO p50/p99 per window, and each daemon's resident memory over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.8))
    ws = result["windows"]
    xs = [w["index"] + 1 for w in ws]
    a.plot(xs, [w["p99_s"] for w in ws], "o-", label="p99")
    a.plot(xs, [w["p50_s"] for w in ws], "o-", label="p50")
    a.set(xlabel=f"window ({result['settings']['window_minutes']:g} min)", ylabel="RPO s",
          title=f"RPO at {result['settings']['rate']:g} MB/s", ylim=(0, None))  # fmt: skip
    a.set_xticks(xs)
    a.legend()
    mem = result["memory"]
    for n in NAMES:
        b.plot([s["t"] / 60 for s in mem], [s["rss_mib"].get(n, 0) for s in mem], label=n)
    b.set(xlabel="minutes", ylabel="MiB", title="resident memory", ylim=(0, None))
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.soak``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0, help="total minutes of writes (30)")
    p.add_argument("--window-minutes", type=float, default=5.0, help="minutes per window (5)")
    p.add_argument("--rate", type=float, default=20.0, help="MB/s of random writes (20)")
    p.add_argument("--size-mib", type=int, default=2048, help="source disk size (2048)")
    p.add_argument("--label", default="", help="suffix for the results files")
    p.add_argument("--journal-keep-all-minutes", type=float, default=None,
                   help="the master target keeps every point this young (its default: 60); "
                   "shorter shows in a short soak where the recovery journal's memory levels off")  # fmt: skip
    args = p.parse_args(argv)
    result = campaign.start("bench.soak")
    if result is None:
        return 2
    result.update(settings=vars(args), **soak(args))
    stem = campaign.stem("soak", args.label)
    table = campaign.write(result, stem, chart, markdown)
    print()
    print(table)
    say(f"wrote {stem.with_suffix('.json').relative_to(HERE.parent)} and its .md and chart")
    return 0


if __name__ == "__main__":
    sys.exit(main())
