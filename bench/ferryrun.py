"""Ferry on the embedded default, instrumented for the benchmark.

:class:`FerryRun` puts a loop device over a copy of a disk image and
replicates it with :class:`devkit.embedded.Embedded` (its own Azurite, the
three daemons as subprocesses, mutual TLS).  Around it:

* :class:`Meter` reads CPU time and peak resident memory of each daemon and
  of Azurite (its whole process group) from ``/proc``; ``clear_refs`` resets
  the peak at the start of each measured window.
* :class:`TagWatcher` records every tag the master target applies: it polls
  the master target's ``status.json`` (the same state it publishes in its
  state blob) every 20 ms for the exact ``t0_mono_ns`` and ``applied_at``,
  and reads the master target's log for tags applied between two polls.
  Every time here is on the monotonic clock (:class:`WallToMono`): the wall
  clock of a machine that has just booted is stepped by NTP (once by 14 s,
  in the middle of an RPO round), and a lag measured across a step is off
  by the step.
* :class:`Timeline` samples progress and CPU twice a second, for the charts
  and for the reading of where the time goes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from bench.data import CACHE, attach, copy_image, detach, drop_caches, sh, umount
from devkit.embedded import Embedded

DISK = "src01-disk0"
MACHINE = "fbench"
"""Machine name of the benchmark's agent: also the prefix of its trace instance, which
Embedded.close removes, so it must not be a name that tests running beside us use."""
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
DAEMONS = ("agent", "process-server", "master-target")


# -- CPU and memory --------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid``, plus those of its children it has reaped."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # fields[0] is state (field 3); utime, stime, cutime, cstime are fields 14-17.
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def group_members(pgid: int) -> list[int]:
    """Processes in process group ``pgid`` (Azurite runs in a session of its own)."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            out.append(int(entry.name))
    return out


def machine_seconds() -> tuple[float, float]:
    """CPU seconds since boot: all cores busy (not idle, not waiting for I/O), and of
    that, what the hypervisor gave this virtual machine's cores to others (steal)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is inside user)
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK, fields[7] / CLK_TCK


class Meter:
    """CPU seconds and peak RSS of named process sets, read from /proc."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids

    def read(self) -> dict[str, dict[str, float]]:
        """``{name: {cpu_s, rss_mib, hwm_mib}}`` now (sums over a set's processes).

        ``machine`` is every core's busy time (all processes, ours or not, and the
        hypervisor's ``steal``, which is also given apart).
        """
        busy, steal = machine_seconds()
        out = {
            "machine": {"cpu_s": busy, "rss_mib": 0.0, "hwm_mib": 0.0},
            "steal": {"cpu_s": steal, "rss_mib": 0.0, "hwm_mib": 0.0},
        }
        for name, pids in self.pids.items():
            cpu = rss = hwm = 0.0
            for pid in pids:
                try:
                    cpu += _cpu_seconds(pid)
                    rss += _status_kib(pid, "VmRSS") / 1024
                    hwm += _status_kib(pid, "VmHWM") / 1024
                except (OSError, IndexError, ValueError):
                    continue  # exited meanwhile
            out[name] = {"cpu_s": cpu, "rss_mib": rss, "hwm_mib": hwm}
        return out

    def reset_peaks(self) -> None:
        """Reset each process's peak RSS to its current RSS (``clear_refs`` 5, Linux >= 4.0)."""
        for pids in self.pids.values():
            for pid in pids:
                try:
                    Path(f"/proc/{pid}/clear_refs").write_text("5\n")
                except OSError:
                    pass


@dataclass
class Window:
    """A measured stretch of time: wall seconds, and CPU and peak memory per process set."""

    seconds: float
    cpu_s: dict[str, float]
    peak_rss_mib: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        """JSON-able, with CPU also as a share of one core."""
        return {
            "seconds": self.seconds,
            "cpu_s": self.cpu_s,
            "core_share": {k: v / self.seconds for k, v in self.cpu_s.items()},
            "peak_rss_mib": self.peak_rss_mib,
        }


class Measure:
    """``with Measure(meter) as m: ...`` then ``m.window``."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self._window: Window | None = None

    @property
    def window(self) -> Window:
        """What the ``with`` block cost (read it after the block)."""
        if self._window is None:
            raise RuntimeError("the measured block has not ended yet")
        return self._window

    def __enter__(self) -> Measure:
        self.meter.reset_peaks()
        self.before = self.meter.read()
        self.t = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        after = self.meter.read()
        self._window = Window(
            time.monotonic() - self.t,
            {k: after[k]["cpu_s"] - self.before.get(k, {}).get("cpu_s", 0.0) for k in after},
            {k: after[k]["hwm_mib"] for k in after},
        )


# -- applied tags ---------------------------------------------------------------------------

_APPLIED = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) master-target INFO disk (\S+): "
    r"applied gen (\d+) seq (\d+)-(\d+) \((\d+) bytes\), now at tag (\S+)$"
)


@dataclass
class Applied:
    """One tag the target reached: when its point in time was, and when it was applied.

    Both times are seconds on the machine's monotonic clock (``time.monotonic``).
    """

    tag: str
    t0: float
    at: float
    exact: bool
    """True when ``at`` comes from the master target's state; else from its log."""


class WallToMono:
    """Turns wall-clock stamps taken on this machine into monotonic time.

    The master target stamps what it applied with the wall clock (its state's
    ``applied_at``, its log lines).  :meth:`note`, called often, records the
    offset between the two clocks whenever it moves (NTP slews or steps the
    wall clock); a stamp is converted with the offset that held when the wall
    clock read it.  A step backwards makes the stamps within its size
    ambiguous; they take the later offset.
    """

    def __init__(self) -> None:
        self.walls: list[float] = []
        self.offsets: list[float] = []
        self._lock = threading.Lock()
        self.note()

    def note(self) -> None:
        mono = time.monotonic()
        wall = time.time()
        offset = wall - mono
        with self._lock:
            if self.offsets and abs(offset - self.offsets[-1]) < 0.001:
                return
            self.walls.append(wall)
            self.offsets.append(offset)

    def mono(self, wall: float) -> float:
        with self._lock:
            i = max(bisect_right(self.walls, wall) - 1, 0)
            return wall - self.offsets[i]

    @property
    def steps(self) -> list[tuple[float, float]]:
        """(wall, change in seconds) of each move of the wall clock larger than 0.1 s."""
        with self._lock:
            pairs = list(zip(self.walls, self.offsets, strict=True))
        return [(w, o - p) for (_, p), (w, o) in pairwise(pairs) if abs(o - p) > 0.1]


class TagWatcher(threading.Thread):
    """Follows the tags the master target applies to one disk."""

    def __init__(self, status: Path, log: Path, disk: str) -> None:
        super().__init__(name="tag-watcher", daemon=True)
        self.status, self.log, self.disk = status, log, disk
        self.seen: dict[str, Applied] = {}
        self.clock = WallToMono()
        self.stop = threading.Event()
        self.changed = threading.Condition()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            self.clock.note()
            try:
                state = json.loads(self.status.read_text())["disks"][self.disk]
            except (OSError, ValueError, KeyError):
                continue
            tag = state.get("last_tag") or {}
            if tag.get("id") and tag["id"] not in self.seen and state.get("applied_at"):
                at = self.clock.mono(state["applied_at"])
                record = Applied(tag["id"], tag["t0_mono_ns"] / 1e9, at, True)
                with self.changed:
                    self.seen[tag["id"]] = record
                    self.changed.notify_all()

    def wait_for(self, test, timeout: float, check=None) -> Applied:
        """The first applied tag (in time order) that passes ``test``; waits up to ``timeout``."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                hit = next((a for a in self.history() if test(a)), None)
                if hit is not None:
                    return hit
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the target did not reach the awaited tag")
                self.changed.wait(min(left, 0.5))
                if check:
                    check()

    def covering(self, mono: float, timeout: float = 600, check=None) -> Applied:
        """The first tag applied whose point in time is at or after ``mono`` (monotonic s)."""
        return self.wait_for(lambda a: a.t0 >= mono, timeout, check)

    def history(self) -> list[Applied]:
        """Every tag applied so far, oldest first: exact where polled, else from the log.

        A tag only in the log gets its t0 from its id (the agent's t0 on the
        monotonic clock) and ``at`` from the log line's millisecond stamp plus
        1 ms (the line is written after the cursor is durable): never earlier
        than true.
        """
        out = dict(self.seen)
        for tag, logged in self._logged():
            if tag not in out:
                t0 = int(tag.rsplit("-", 1)[1]) / 1e9
                out[tag] = Applied(tag, t0, self.clock.mono(logged) + 0.001, False)
        return sorted(out.values(), key=lambda a: a.t0)

    def _logged(self) -> list[tuple[str, float]]:
        found: list[tuple[str, float]] = []
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return found
        for line in text.splitlines():
            m = _APPLIED.match(line)
            if m and m[3] == self.disk and m[8] != "None":
                stamp = time.mktime(time.strptime(m[1], "%Y-%m-%d %H:%M:%S")) + int(m[2]) / 1000
                found.append((m[8], stamp))
        return found


def rpo_lags(writes: list[float], applied: list[Applied]) -> tuple[list[float], int]:
    """For each write completed at w (monotonic s): when the first tag with t0 >= w was applied, - w.

    Returns (lags, writes not yet covered by any applied tag).
    """
    applied = sorted(applied, key=lambda a: a.t0)
    t0s = [a.t0 for a in applied]
    # Earliest application among all tags at or after each position (tags apply in order,
    # so this is the tag's own time; the suffix minimum only guards the assumption).
    best, soonest = [0.0] * len(applied), float("inf")
    for i in range(len(applied) - 1, -1, -1):
        soonest = min(soonest, applied[i].at)
        best[i] = soonest
    lags, uncovered = [], 0
    for w in writes:
        i = bisect_left(t0s, w)
        if i == len(applied):
            uncovered += 1
        else:
            lags.append(best[i] - w)
    return lags, uncovered


# -- progress timeline ----------------------------------------------------------------------


class Timeline(threading.Thread):
    """Samples the pipeline's progress and each process's CPU every ``period`` seconds."""

    def __init__(self, run: FerryRun, period: float = 0.5) -> None:
        super().__init__(name="timeline", daemon=True)
        self.run_ = run
        self.period = period
        self.samples: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while True:
            self.samples.append(self.sample())
            if self.stop.wait(self.period):
                self.samples.append(self.sample())
                return

    def sample(self) -> dict[str, Any]:
        r = self.run_
        agent = r.emb.agent_status() if "agent" in r.emb.procs else None
        disk = ((agent or {}).get("disks") or [{}])[0]
        ps = _read_json(r.emb.base / "process-server" / "status.json")
        mt = (_read_json(r.emb.base / "master-target" / "status.json").get("disks") or {}).get(
            DISK, {}
        )
        return {
            "t": time.monotonic() - self.t0,
            "agent_read": disk.get("bytes_read", 0),
            "agent_shipped": disk.get("bytes_shipped", 0),
            "ps_uploaded_raw": ps.get("bytes_uploaded_raw", 0),
            "ps_uploaded": ps.get("bytes_uploaded_compressed", 0),
            "ps_spool": (ps.get("spool") or {}).get("bytes", 0),
            "mt_applied": mt.get("bytes_applied", 0),
            "mt_staged_bytes": mt.get("staged_bytes", 0),
            "cpu": {k: v["cpu_s"] for k, v in r.meter().read().items()},
        }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# -- one deployment -------------------------------------------------------------------------


class FerryRun:
    """A loop device over a copy of an image, replicated by its own embedded deployment."""

    def __init__(
        self,
        image: Path,
        work: Path,
        agent: dict[str, Any] | None = None,
        process_server: dict[str, Any] | None = None,
        mount: bool = False,
        master_target: dict[str, Any] | None = None,
    ) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.size = image.stat().st_size
        self.source = work / "source.img"
        copy_image(image, self.source)
        self.loop = attach(self.source, direct=True)
        self.mnt: Path | None = None
        if mount:
            # Mounted before the agent starts, so that it finds the filesystem to freeze.
            self.mnt = work / "mnt"
            self.mnt.mkdir()
            sh("mount", self.loop, str(self.mnt))
        self.target = work / "target.img"
        self.emb = Embedded(work / "ferry", tenant="bench", machine=MACHINE, azurite_on_disk=True)
        self.emb.start_storage()
        self.emb.configure(
            [{"id": DISK, "device": self.loop}],
            {DISK: str(self.target)},
            agent=agent,
            process_server=process_server,
            master_target=master_target,
        )
        self.tags = TagWatcher(
            self.emb.base / "master-target" / "status.json",
            self.emb.base / "master-target.log",
            DISK,
        )
        self.tags.start()

    def meter(self) -> Meter:
        """A meter over the daemons running now and Azurite."""
        pids = {name: [p.pid] for name, p in self.emb.procs.items() if p.poll() is None}
        azurite = self.emb.azurite
        pids["azurite"] = group_members(azurite.proc.pid) if azurite and azurite.proc else []
        return Meter(pids)

    def start_servers(self) -> None:
        """Start the process server and the master target (not the agent)."""
        self.emb.start("process-server")
        self.emb.wait_port()
        self.emb.start("master-target")

    def initial_sync(self, timeline: bool = True) -> dict[str, Any]:
        """Start the agent on a cold cache; seconds until the target applied its first tag."""
        drop_caches()
        meter = self.meter()
        meter.pids["agent"] = []
        with Measure(meter) as m:
            started = time.monotonic()
            self.emb.start("agent")
            meter.pids["agent"] = [self.emb.procs["agent"].pid]
            line = Timeline(self) if timeline else None
            if line:
                line.start()
            first = self.tags.wait_for(lambda a: True, 1800, self.emb.check_alive)
            if line:
                line.stop.set()
                line.join()
        status = self.emb.agent_status() or {}
        disk = (status.get("disks") or [{}])[0]
        return {
            "seconds": first.at - started,
            "tag": first.tag,
            "bytes_read": disk.get("bytes_read"),
            "bytes_shipped": disk.get("bytes_shipped"),
            "cost": m.window.as_dict(),
            "timeline": line.samples if line else [],
        }

    def converge_after(self, mono: float) -> Applied:
        """The first applied tag whose point in time includes everything written before ``mono``."""
        return self.tags.covering(mono, 600, self.emb.check_alive)

    def agent_counters(self) -> dict[str, Any]:
        """Pass and freeze counters of the agent, and its disk's byte counters."""
        status = self.emb.agent_status() or {}
        disk = (status.get("disks") or [{}])[0]
        keys = ("passes", "clean_passes", "frozen_passes", "longest_freeze_s")
        return {
            **{k: status.get(k, 0) for k in keys},
            "bytes_read": disk.get("bytes_read", 0),
            "bytes_shipped": disk.get("bytes_shipped", 0),
        }

    def close(self) -> None:
        """Stop everything and release the loop device; safe after a failure.

        The daemons' logs are kept in ``bench/cache/logs/`` for a post-mortem.
        """
        self.tags.stop.set()
        if self.mnt is not None:
            sh("fsfreeze", "-u", str(self.mnt), check=False)
        self.emb.close()
        if self.mnt is not None:
            umount(self.mnt)
        detach(self.loop)
        keep = CACHE / "logs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{self.work.parent.name}"
        keep.mkdir(parents=True, exist_ok=True)
        for log in self.emb.base.glob("*.log"):
            shutil.copyfile(log, keep / log.name)
