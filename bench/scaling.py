"""``make bench-scale``: how the initial sync's cost grows with the disk.

    .venv/bin/python -m bench.scaling                  # 1, 2, 4 and 8 GiB images
    .venv/bin/python -m bench.scaling --sizes 1,2      # fewer, for iterating

Each size is an ext4 image about half full of the same kind of real files
as ``make bench`` (``bench.data``; state A only, cached in ``bench/cache/``).
Ferry replicates it end to end on the embedded default, from a cold page
cache, until the master target applied the first tag; the target is then
verified against the image's digest.  Per size: wall time, CPU seconds per
GiB of disk and peak resident memory (VmHWM over the whole sync) of each
daemon and of Azurite.  Time should grow linearly and memory stay flat;
the chart shows both.  Writes ``bench/results/<date>-<host>-scale.{json,md,png}``.
Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import campaign
from bench.data import CACHE, HERE, GiB, MiB, base_image, digest, say
from bench.ferryrun import DAEMONS, FerryRun

NAMES = (*DAEMONS, "azurite")


def one_size(size_gib: float) -> dict[str, Any]:
    """Initial sync of a ``size_gib`` GiB image: time, CPU per GiB, peak memory per daemon."""
    size = int(size_gib * GiB)
    image, image_digest, files_bytes = base_image(size)
    with tempfile.TemporaryDirectory(prefix="scale-", dir=CACHE) as tmp:
        run = FerryRun(image, Path(tmp) / "ferry")
        try:
            run.start_servers()
            sync = run.initial_sync(timeline=False)
            if digest(run.target, size) != image_digest:
                raise RuntimeError(f"the target differs from the {size_gib:g} GiB image")
        finally:
            run.close()
    cost = sync["cost"]
    out = {
        "size_gib": size_gib,
        "files_mib": files_bytes / MiB,
        "seconds": sync["seconds"],
        "mb_s": size / sync["seconds"] / 1e6,
        "bytes_shipped": sync["bytes_shipped"],
        "cpu_s_per_gib": {n: cost["cpu_s"][n] / size_gib for n in NAMES},
        "peak_rss_mib": {n: cost["peak_rss_mib"][n] for n in NAMES},
        "machine_busy_cores": cost["cpu_s"]["machine"] / cost["seconds"],
        "load_average": os.getloadavg(),
    }
    say(
        f"{size_gib:g} GiB: {sync['seconds']:.1f} s ({out['mb_s']:.0f} MB/s), CPU s/GiB "
        + ", ".join(f"{n} {out['cpu_s_per_gib'][n]:.2f}" for n in NAMES)
        + "; peak MiB "
        + ", ".join(f"{n} {out['peak_rss_mib'][n]:.0f}" for n in NAMES)
    )
    return out


def markdown(result: dict[str, Any], chart: str) -> str:
    """The scaling table."""
    rows = [
        f"{campaign.measured(result)}; load average {result['load_before'][0]:.1f} before, "
        f"{result['machine']['load_average_at_end'][0]:.1f} after; one run per size.",
        "",
        "| disk GiB | wall s | MB/s | "
        + " | ".join(f"{n} CPU s/GiB" for n in NAMES)
        + " | "
        + " | ".join(f"{n} peak MiB" for n in NAMES)
        + " |",
        "|--:|--:|--:|" + "--:|" * (2 * len(NAMES)),
    ]
    for x in result["sizes"]:
        rows.append(
            f"| {x['size_gib']:g} | {x['seconds']:.1f} | {x['mb_s']:.0f} | "
            + " | ".join(f"{x['cpu_s_per_gib'][n]:.2f}" for n in NAMES)
            + " | "
            + " | ".join(f"{x['peak_rss_mib'][n]:.0f}" for n in NAMES)
            + " |"
        )
    return "\n".join([*rows, "", f"![How the initial sync's cost grows]({chart})", ""])


def chart(result: dict[str, Any], path: Path) -> str:
    """One figure, three panels: wall time, CPU s per GiB and peak memory against disk size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [x["size_gib"] for x in result["sizes"]]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.8))
    a.plot(xs, [x["seconds"] for x in result["sizes"]], "o-", label="Ferry")
    if len(xs) > 1:  # the line through the origin and the smallest size: linear growth
        k = result["sizes"][0]["seconds"] / xs[0]
        a.plot([0, xs[-1]], [0, k * xs[-1]], ":", color="grey", label="linear")
    a.set(xlabel="disk GiB", ylabel="s", title="initial sync, wall time")
    a.legend()
    for n in NAMES:
        b.plot(xs, [x["cpu_s_per_gib"][n] for x in result["sizes"]], "o-", label=n)
        c.plot(xs, [x["peak_rss_mib"][n] for x in result["sizes"]], "o-", label=n)
    b.set(xlabel="disk GiB", ylabel="CPU s per GiB of disk", title="CPU per GiB", ylim=(0, None))
    c.set(xlabel="disk GiB", ylabel="MiB", title="peak resident memory", ylim=(0, None))
    b.legend(fontsize=8)
    for ax in (a, b, c):
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.scaling``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1,2,4,8", help="disk sizes in GiB (default 1,2,4,8)")
    p.add_argument("--label", default="", help="suffix for the results files")
    args = p.parse_args(argv)
    result = campaign.start("bench.scaling")
    if result is None:
        return 2
    result["sizes"] = []
    stem = campaign.stem("scale", args.label)
    table = ""
    for size in args.sizes.split(","):
        result["sizes"].append(one_size(float(size)))
        # After each size: a long run stopped early keeps its figures.
        table = campaign.write(result, stem, chart, markdown)
    print()
    print(table)
    say(f"wrote {stem.with_suffix('.json').relative_to(HERE.parent)} and its .md and chart")
    return 0


if __name__ == "__main__":
    sys.exit(main())
