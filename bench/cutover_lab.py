"""Figures of a cutover and a test failover of the lab machine: seconds to disks ready, to
adapted, to boot check passed (docs/lab.md, "Cutover figures").

    .venv/bin/python -m bench.cutover_lab [--out bench/results/cutover-lab.json]

Boots the lab guest (lab/), runs a writer in it, writes a marker, and takes
its two disks at one instant (QMP ``stop`` drains and flushes them, as the
final tag of a crash-consistent cutover has them); the guest is powered off
then.  The copies stand for the master target's targets at that tag:

- cutover: ``mastertarget.cutover.convert`` (fixed VHDs verified against the
  copies' digests, adaptation, boot check with the marker), timed from its
  ``started``;
- test failover: ``mastertarget.cutover.test_failover`` on the same copies
  under a master-target state directory whose cursors sit on the tag (a clone
  under the apply lock, VHDs, adaptation, boot check).

The time to reach the final tag on a live source (draining the agent) is not
in these figures: it is the replication's RPO, measured in docs/performance.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ferry.diskio import device_size, sha256_of
from lab.cache import ensure_image
from lab.machine import Machine
from mastertarget import cursor as cursors
from mastertarget import layout
from mastertarget.cutover import convert, test_failover

WRITER = (
    "mkdir -p /srv/data/live; i=0; while :; do "
    "head -c 65536 /dev/urandom > /srv/data/live/f$((i % 40)); "
    "echo $i >> /srv/data/live/journal; i=$((i + 1)); sleep 0.05; done"
)
MARKER = "/srv/data/ferry-marker"


def source_copies(machine: Machine, out: Path) -> tuple[dict[str, Path], str]:
    """Under a running writer: the marker, then both disks copied at one instant."""
    machine.ssh(f"nohup sh -c '{WRITER}' >/dev/null 2>&1 &")
    text = f"written before the final tag {secrets.token_hex(8)}\n"
    machine.ssh("while [ $(cat /srv/data/live/journal 2>/dev/null | wc -l) -lt 5 ]; do sleep 0.5; "
                f"done; cat > {MARKER}; sync -f {MARKER}", input=text)  # fmt: skip
    machine.qmp("stop")
    copies = {}
    for name, overlay in machine.overlays.items():
        copies[name] = out / f"{name}.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(overlay),
                        str(copies[name])], check=True)  # fmt: skip
    return copies, hashlib.sha256(text.encode()).hexdigest()


def cutover_figures(copies: dict[str, Path], out: Path, marker: str) -> dict[str, Any]:
    disks = {"lab01-system": copies["system"], "lab01-data": copies["data"]}
    digests = {d: {"size": device_size(p), "sha256": sha256_of(p, device_size(p))}
               for d, p in disks.items()}  # fmt: skip
    spec = {
        "started": time.time(), "machine": "lab01", "tenant": "lab", "out_dir": str(out),
        "final_tag": {"id": "lab01-final"}, "vm": {"name": "lab01"},
        "disks": [{"id": d} for d in disks], "targets": {d: str(p) for d, p in disks.items()},
        "digests": digests, "adapt": True, "boot_check": True, "markers": [f"{MARKER}:{marker}"],
    }  # fmt: skip
    manifest = convert(spec)
    return {"complete": manifest["complete"], "reason": manifest.get("reason"),
            "timings": manifest["timings"], "boot_s": manifest.get("boot_check", {}).get("boot_s"),
            "changes": [c["step"] for c in manifest.get("adaptation", {}).get("changes", [])]}  # fmt: skip


def test_failover_figures(copies: dict[str, Path], work: Path, marker: str) -> dict[str, Any]:
    state = work / "mt-state"
    targets = {"lab01-system": str(copies["system"]), "lab01-data": str(copies["data"])}
    for disk in targets:  # the master target's cursor, as it sits on the tag
        layout.disk_dir(state, disk).mkdir(parents=True)
        tag = {"id": "lab01-tag", "kind": "crash", "t0_wall": time.time()}
        cursors.save(layout.cursor_path(state, disk),
                     cursors.Cursor("lab", disk, gen=1, applied_seq=1, last_tag=tag))  # fmt: skip
    checks = {"adapt": True, "boot_check": True, "markers": [f"{MARKER}:{marker}"]}
    record = test_failover(state, "lab01", targets, work / "test-failover", checks)
    return {"passed": record["passed"], "reason": record.get("reason"),
            "timings": record["timings"], "boot_s": record.get("boot_check", {}).get("boot_s")}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cutover_lab", description=__doc__)
    parser.add_argument("--out", default="bench/results/cutover-lab.json")
    parser.add_argument("--work", help="scratch directory (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ferry-cutover-lab-", dir=args.work) as tmp:
        work = Path(tmp)
        with Machine(ensure_image(), work / "lab") as machine:
            copies, marker = source_copies(machine, work)
        figures = {
            "measured_at": time.time(),
            "cutover": cutover_figures(copies, work / "cutover", marker),
        }
        print(json.dumps(figures), flush=True)
        figures["test_failover"] = test_failover_figures(copies, work, marker)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
