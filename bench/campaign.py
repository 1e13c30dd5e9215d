"""What ``bench.scaling`` and ``bench.soak`` share: the start, the results' names and files.

Both are longer runs beside ``make bench`` (``bench.replication``): each
checks the machine the same way, stamps its result with the date, the
commit measured and the machine, and writes ``bench/results/<date>-<host>-
<kind><label>.{json,md,png}``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.data import HERE
from bench.replication import code_state, machine, preflight
from bench.report import cpu

RESULTS = HERE / "results"


def start(tool: str) -> dict[str, Any] | None:
    """The result's header (date, commit, load), or None after one error line if the
    benchmark cannot run here."""
    problem = preflight()
    if problem:
        print(f"{tool}: error: {problem}", file=sys.stderr)
        return None
    os.environ["PATH"] = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "code": code_state(),
        "load_before": os.getloadavg(),
    }


def stem(kind: str, label: str) -> Path:
    """``bench/results/<date>-<host>-<kind><label>``, without a suffix."""
    RESULTS.mkdir(exist_ok=True)
    return RESULTS / f"{time.strftime('%Y-%m-%d')}-{socket.gethostname()}-{kind}{label}"


def write(
    result: dict[str, Any],
    at: Path,
    chart: Callable[[dict[str, Any], Path], str],
    markdown: Callable[[dict[str, Any], str], str],
) -> str:
    """The result's JSON, chart and markdown table at ``at`` (the machine as it is now); the
    table."""
    result["machine"] = machine()
    name = chart(result, at.with_suffix(".png"))
    at.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    table = markdown(result, name)
    at.with_suffix(".md").write_text(table)
    return table


def measured(result: dict[str, Any]) -> str:
    """``Measured <date> on `<host>` (<CPU>), code `<commit>``` (and whether it had uncommitted
    changes)."""
    m = result["machine"]
    return (
        f"Measured {result['date']} on `{m['host']}` ({cpu(m)}), code "
        f"`{result['code']['commit'][:10]}`"
        f"{' (with uncommitted changes)' if result['code']['dirty'] else ''}"
    )
