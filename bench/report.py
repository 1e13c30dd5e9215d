"""Tables, goals and charts from one results dict (as written to ``bench/results/*.json``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
DAEMONS = ("agent", "process-server", "master-target")

PEER_LABELS = {
    "cp": "`cp --sparse=always`",
    "rsync": "`rsync --whole-file --sparse`",
    "casync": "`casync make` + `casync extract`",
}
DELTA_LABELS = {
    "rsync": "`rsync --inplace --no-whole-file`",
    "rdiff": "`rdiff signature` + `delta` + `patch`",
    "scan": "digest-compare scan (64 KiB xxh3, both sides)",
}


def _s(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.0%}" if whole else "–"


def _runs(values: list[float], digits: int = 1) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def goals(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal of issue 5 with the measured figure and whether it was met."""
    i, d = r["initial"], r["delta"]
    out = [
        _goal("initial sync within 2x of cp", i["ferry"]["ratio_to_cp"], 2.0, "x cp"),
        _goal(
            "initial sync faster than rsync",
            i["ferry"]["seconds"] / i["peers"]["rsync"]["seconds"],
            1.0,
            "x rsync",
        ),
        _goal(
            "initial sync faster than casync",
            i["ferry"]["seconds"] / i["peers"]["casync"]["seconds"],
            1.0,
            "x casync",
        ),
        _goal("delta 10x faster than rsync --inplace", d["speedup"]["rsync"], 10.0, "x", True),
        _goal("delta 5x faster than the fastest scanning peer", d["speedup_fastest"], 5.0, "x",
              True),
    ]  # fmt: skip
    per = i["ferry"]["cost"]["per_gib_disk"]
    out.append(_goal("daemons at most 3.5 CPU s per GiB of disk (initial sync)",
                     sum(per[n] for n in DAEMONS), 3.5 + 1e-9, "CPU s/GiB"))  # fmt: skip
    out.append(_goal("agent at most 0.5 CPU s per GiB of disk (initial sync)",
                     per["agent"], 0.5 + 1e-9, "CPU s/GiB"))  # fmt: skip
    for rate, bound in (("20", 1.0), ("50", 2.0)):
        if rate in r.get("rpo", {}):
            x = r["rpo"][rate]
            out.append(_goal(f"RPO p99 under {bound:g} s at {rate} MB/s", x["p99_s"], bound, "s"))
    if "20" in r.get("rpo", {}):
        share = r["rpo"]["20"]["cost"]["core_share"]
        out.append(_goal("daemons under 40% of a core at 20 MB/s",
                         sum(share[n] for n in DAEMONS) * 100, 40.0, "%"))  # fmt: skip
        out.append(_goal("agent under 8% of a core at 20 MB/s", share["agent"] * 100, 8.0, "%"))
    top = _top_rate(r)
    if top:
        x = r["rpo"][top]
        cost = x["cost"]
        out.append(
            _goal(f"agent under 15% of a core at {top} MB/s",
                  cost["core_share"]["agent"] * 100, 15.0, "%")
        )  # fmt: skip
        out.append(
            _goal(f"agent under 150 MiB resident at {top} MB/s",
                  cost["peak_rss_mib"]["agent"], 150.0, "MiB")
        )  # fmt: skip
    return out


def _goal(name: str, value: float | None, bound: float, unit: str, above: bool = False) -> dict:
    met = value is not None and (value >= bound if above else value < bound)
    return {"goal": name, "value": value, "bound": bound, "unit": unit, "met": met}


def _top_rate(r: dict[str, Any]) -> str | None:
    rates = sorted(r.get("rpo", {}), key=float)
    return rates[-1] if rates else None


def cpu(m: dict[str, Any]) -> str:
    """The CPU's model name, and its family, model and instruction sets where recorded."""
    name = m.get("cpu_model", "?")
    return f"{name} ({m['cpu_id']})" if m.get("cpu_id") else name


def markdown(r: dict[str, Any], charts: dict[str, str] | None = None) -> str:
    """The results as markdown: setup line, five tables, goals, chart links."""
    m, data = r["machine"], r["data"]
    lines = [
        f"Measured {r['date']} on `{m['host']}` ({m['cpus']} cores of {cpu(m)}, "
        f"{m['memory_gib']} GiB, "
        f"Linux {m['kernel']}, Python {m['python']}), code `{r['code']['commit'][:10]}`"
        f"{' (with uncommitted changes)' if r['code']['dirty'] else ''}; "
        f"{r['settings']['runs']} run(s), medians; other work was running on the machine.",
        "",
        f"Disk: {data['size'] / GiB:g} GiB ext4 image, {data['files_bytes'] / MiB:.0f} MiB of "
        f"real files ({data['used_bytes'] / data['size']:.0%} used, "
        f"{data['zero_block_share']:.0%} of 4 KiB blocks zero). Second state: "
        f"{data['changed_file_bytes'] / MiB:.0f} MiB overwritten in {data['changed_files']} "
        f"files, {data['diff_blocks']} 4 KiB blocks ({data['diff_block_share']:.2%}) differ.",
        "",
        *_initial_table(r),
        "",
        *_delta_table(r),
        "",
        *_rpo_table(r),
        "",
        *_cost_table(r),
        "",
        *_cutover_table(r),
        "",
        *_goal_table(r),
    ]
    if charts:
        lines += ["", *(f"![{name}]({path})" for name, path in charts.items())]
    return "\n".join(lines) + "\n"


def _initial_table(r: dict[str, Any]) -> list[str]:
    i = r["initial"]
    size = r["data"]["size"]
    rows = [
        "**Initial sync** (cold page cache; each tool's output fsync'ed; ratio = median of "
        "per-run ratios to `cp` in the same run)",
        "",
        "| tool | wall s | MB/s of disk | × cp | runs (s) |",
        "|---|--:|--:|--:|---|",
    ]
    for name, label in PEER_LABELS.items():
        p = i["peers"][name]
        rows.append(
            f"| {label} | {p['seconds']:.1f} | {size / p['seconds'] / 1e6:.0f} | "
            f"{p['ratio_to_cp']:.2f} | {_runs(p['runs'])} |"
        )
    f = i["ferry"]
    rows.append(
        f"| **Ferry** agent → PS → Azurite → MT, target verified | {f['seconds']:.1f} | "
        f"{size / f['seconds'] / 1e6:.0f} | {f['ratio_to_cp']:.2f} | {_runs(f['runs'])} |"
    )
    shares = f["cost"]["core_share"]
    busy = shares.get("machine")
    ours = sum(shares.get(n, 0.0) for n in (*DAEMONS, "azurite"))
    steal = shares.get("steal")
    rest = "other work on the machine" + (
        f", and {steal:.2f} of a core taken by the hypervisor (steal)" if steal else ""
    )
    st = f.get("stages") or {}
    if st.get("first_read_s") is not None:
        rows.append(
            f"\nFerry's median run: first block read {st['first_read_s']:.1f} s after the "
            f"agent started (start-up and the resync round trip), source read by "
            f"{st['agent_read_done_s']:.1f} s, last segment uploaded by "
            f"{st['ps_uploaded_done_s']:.1f} s, target applied at {f['seconds']:.1f} s; "
            f"{f['bytes_shipped'] / MiB:.0f} MiB of non-zero data shipped"
            + (
                f"; the machine was {busy:.2f} of 2 cores busy on average, {ours:.2f} of them "
                f"Ferry's daemons and Azurite (the rest: {rest})."
                if busy
                else "."
            )
        )
    return rows


def _delta_table(r: dict[str, Any]) -> list[str]:
    d = r["delta"]
    rows = [
        "**Delta** after the 1% change (Ferry: from the change's last write to the target on "
        "a tag that includes it; peers: A → B from a cold cache)",
        "",
        "| tool | wall s | Ferry faster by | runs (s) |",
        "|---|--:|--:|---|",
        f"| **Ferry** | {d['ferry']['seconds']:.2f} | – | {_runs(d['ferry']['runs'], 2)} |",
    ]
    for name, label in DELTA_LABELS.items():
        p = d["peers"][name]
        rows.append(
            f"| {label} | {p['seconds']:.1f} | {d['speedup'][name]:.0f}× | {_runs(p['runs'])} |"
        )
    rows.append(
        f"\nFerry from the change's *first* write: {d['ferry']['from_first_write_s']:.2f} s "
        f"(the change itself took {d['ferry']['change_s']:.2f} s); it shipped "
        f"{d['ferry']['bytes_shipped'] / MiB:.1f} MiB."
    )
    return rows


def _rpo_table(r: dict[str, Any]) -> list[str]:
    st = r["settings"]
    rows = [
        f"**RPO under load**: fio random writes, direct I/O, 4–64 KiB, psync, into a "
        f"{st['fio_size'] / MiB:.0f} MiB file on the mounted source; "
        f"{st.get('rpo_rounds', 1)} round(s) of {st['rpo_seconds']:g} s per rate, p50/p99/max "
        f"are medians over rounds, pooled p99 over every write. RPO of a write = when the first "
        f"tag with t0 ≥ its completion was applied − its completion (monotonic clock)",
        "",
        "| rate MB/s | achieved | writes | p50 s | p99 s | max s | pooled p99 s | "
        "passes clean | passes frozen | longest freeze s |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for rate, x in sorted(r["rpo"].items(), key=lambda kv: float(kv[0])):
        pooled = (x.get("pooled") or {}).get("p99_s")
        rows.append(
            f"| {rate} | {x['achieved_mb_s']:.1f} | {x['writes']} | {_s(x['p50_s'])} | "
            f"{_s(x['p99_s'])} | {_s(x['max_s'])} | {_s(pooled)} | "
            f"{x['clean_passes']}/{x['passes']} ({_share(x['clean_passes'], x['passes'])}) | "
            f"{x['frozen_passes']}/{x['passes']} ({x['frozen_share']:.0%}) | "
            f"{x['longest_freeze_s']:.2f} |"
        )
    return rows


def _cost_table(r: dict[str, Any]) -> list[str]:
    names = (*DAEMONS, "azurite")
    rows = [
        "**Cost**: CPU seconds and peak resident memory (VmHWM, reset at the start of each "
        "window); Azurite apart (not part of a real deployment)",
        "",
        "| window | " + " | ".join(f"{n} CPU" for n in names) + " | "
        + " | ".join(f"{n} MiB" for n in names) + " |",
        "|---|" + "--:|" * (2 * len(names)),
    ]  # fmt: skip
    c = r["initial"]["ferry"]["cost"]
    per = c["per_gib_disk"]
    rows.append(
        "| initial sync, CPU s per GiB of disk | "
        + " | ".join(f"{per[n]:.1f}" for n in names)
        + " | "
        + " | ".join(f"{c['peak_rss_mib'][n]:.0f}" for n in names)
        + " |"
    )
    for rate, x in sorted(r["rpo"].items(), key=lambda kv: float(kv[0])):
        w = x["cost"]
        rows.append(
            f"| {rate} MB/s, CPU s per minute (% of a core) | "
            + " | ".join(
                f"{w['cpu_s'][n] / w['seconds'] * 60:.1f} ({w['core_share'][n]:.0%})" for n in names
            )
            + " | "
            + " | ".join(f"{w['peak_rss_mib'][n]:.0f}" for n in names)
            + " |"
        )
    return rows


def _cutover_table(r: dict[str, Any]) -> list[str]:
    c = r["cutover"]
    load = c["runs"][0]
    return [
        f"**Cutover** (after {load['load_seconds']:g} s of fio at {load['load_mb_s']:g} MB/s: "
        "fsfreeze the source, final tag, until the target is applied, digest-equal and "
        "`e2fsck -fn` clean)",
        "",
        "| total s | tag durable at PS s | target applied s | digest both s | e2fsck s | runs (s) |",
        "|--:|--:|--:|--:|--:|---|",
        f"| {c['seconds']:.2f} | {c['tag_durable_s']:.2f} | {c['applied_s']:.2f} | "
        f"{c['digest_s']:.2f} | {c['fsck_s']:.2f} | {_runs([x['seconds'] for x in c['runs']], 2)} |",
    ]


def _goal_table(r: dict[str, Any]) -> list[str]:
    rows = ["**Goals** (reported, not asserted)", "", "| goal | measured | met |", "|---|--:|---|"]
    for g in r["goals"]:
        rows.append(
            f"| {g['goal']} | {_s(g['value'])} {g['unit']} | {'yes' if g['met'] else '**no**'} |"
        )
    return rows


# -- charts ------------------------------------------------------------------------------------


def charts(r: dict[str, Any], lags: dict[str, list[float]], stem: Path) -> dict[str, str]:
    """Write the PNG charts next to ``stem``; ``{title: file name}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    size = r["data"]["size"]
    names = ["cp", "rsync", "casync", "Ferry"]
    runs = [r["initial"]["peers"][n]["runs"] for n in ("cp", "rsync", "casync")]
    runs.append(r["initial"]["ferry"]["runs"])
    rates = [[size / s / 1e6 for s in rr] for rr in runs]
    _bars(a, names, rates, "MB/s of disk (higher is better)", "Initial sync")
    dnames = ["Ferry", "rsync --inplace", "rdiff", "digest scan"]
    druns = [r["delta"]["ferry"]["runs"]] + [
        r["delta"]["peers"][n]["runs"] for n in ("rsync", "rdiff", "scan")
    ]
    _bars(b, dnames, druns, "seconds (log; lower is better)", "Delta after 1% changed")
    b.set_yscale("log")
    fig.tight_layout()
    out["Throughput: initial sync and delta"] = _save(fig, stem, "throughput")

    fig, ax = plt.subplots(figsize=(7, 4))
    for rate in sorted(lags, key=float):
        xs = sorted(lags[rate])
        if xs:
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=f"{rate} MB/s")
    ax.axvline(2.0, color="grey", linestyle="--", linewidth=1, label="goal p99 < 2 s")
    ax.axhline(0.99, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("RPO of a write: completion on the source to applied on the target (s)")
    ax.set_ylabel("share of writes")
    ax.set_title("RPO under fio random writes (CDF)")
    ax.legend()
    fig.tight_layout()
    out["RPO distributions"] = _save(fig, stem, "rpo")

    line = r["initial"]["ferry"].get("timeline") or []
    if line:
        out["Ferry initial sync timeline"] = _timeline(plt, line, stem)
    plt.close("all")
    return out


def _bars(ax, names, runs, ylabel, title) -> None:
    import statistics

    med = [statistics.median(x) for x in runs]
    colors = ["#1f77b4" if name == "Ferry" else "#999999" for name in names]
    ax.bar(names, med, color=colors)
    for i, xs in enumerate(runs):
        ax.scatter([i] * len(xs), xs, color="black", s=10, zorder=3)
        ax.annotate(f"{med[i]:.3g}", (i, med[i]), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def _timeline(plt, line: list[dict[str, Any]], stem: Path) -> str:
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    t = [s["t"] for s in line]
    for key, label in (
        ("agent_read", "agent: read from the source"),
        ("ps_uploaded_raw", "process server: uploaded (raw bytes)"),
        ("mt_applied", "master target: applied"),
    ):
        a.plot(t, [s[key] / MiB for s in line], label=label)
    a.plot(t, [s["mt_staged_bytes"] / MiB for s in line], label="master target: staged (compressed)",
           linestyle="--")  # fmt: skip
    a.set_ylabel("MiB")
    a.legend(fontsize=8)
    a.set_title("Ferry initial sync, one run")
    for name in (*DAEMONS, "azurite"):
        cpu = [s["cpu"].get(name, 0.0) for s in line]
        share = [0.0] + [
            (cpu[i] - cpu[i - 1]) / max(t[i] - t[i - 1], 1e-9) * 100 for i in range(1, len(t))
        ]
        b.plot(t, share, label=name)
    b.set_ylabel("% of one core")
    b.set_xlabel("seconds since the agent started")
    b.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, stem, "timeline")


def _save(fig, stem: Path, name: str) -> str:
    path = stem.with_name(f"{stem.name}-{name}.png")
    fig.savefig(path, dpi=110)
    return path.name


# -- docs/performance.md -----------------------------------------------------------------------

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def update_doc(doc: Path, table: str, results_rel: str) -> bool:
    """Replace the generated block of ``doc`` with ``table`` (chart links made relative)."""
    if not doc.exists():
        return False
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        return False
    table = re.sub(r"\]\(([^)/]+\.png)\)", lambda m: f"]({results_rel}/{m[1]})", table)
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{table}{END}{tail}")
    return True
