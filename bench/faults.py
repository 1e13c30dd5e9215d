"""Issue #10's fault campaign: break the embedded default on purpose, then prove nothing was lost.

Each scenario replicates a real loop device (random data, a raw writer
changing it all along) with :class:`devkit.embedded.Embedded`: Azurite on
disk, the three daemons as processes, tracefs, mutual TLS.  It injects its
fault with a real mechanism (SIGKILL, stopping Azurite, a fault-injecting TCP
proxy between the agent and the process server), then stops the writer,
takes a final tag, waits until the target sits on it and compares digests of
the source and the target.  ``docs/reliability.md`` gets the table.

Run as root: ``make faults`` (about 20 minutes) or ``make faults-quick``
(a few minutes, fewer injections on a smaller disk).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.data import Mounted, attach, detach, say, sh
from devkit.embedded import Embedded, RawWriter, digest

MiB = 1 << 20
MACHINE = "flt01"
"""Machine name of the campaign's agent (and prefix of its trace instances)."""
DISK = f"{MACHINE}-disk0"
ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "docs" / "reliability.md"


@dataclass
class Scale:
    """How big and how often: the full campaign or the quick one."""

    name: str
    disk: int
    write_rate: int
    ps_kills: int
    agent_kills: int
    mt_kills: int
    storage_restarts: int
    outage_s: float
    net_phase_s: float
    soak_s: float


FULL = Scale("full", 256 * MiB, 2 * MiB, 50, 6, 40, 3, 75.0, 20.0, 600.0)
QUICK = Scale("quick", 64 * MiB, MiB, 8, 2, 8, 1, 15.0, 6.0, 120.0)


@dataclass
class Result:
    """One scenario's row in docs/reliability.md."""

    scenario: str
    injected: str
    times: int = 0
    lost: str = "not run"
    converge_s: float | None = None
    bytes_resent: int | None = None
    notes: list[str] = field(default_factory=list)


# -- the source ------------------------------------------------------------------------


class Source:
    """A loop device over a sparse image, a third of it random data; detached on close."""

    def __init__(self, work: Path, size: int) -> None:
        self.size = size
        self.image = work / "source.img"
        with open(self.image, "wb") as f:
            f.truncate(size)
            for offset in range(0, size, 4 * MiB):
                if (offset // (4 * MiB)) % 3 == 0:
                    f.seek(offset)
                    f.write(os.urandom(4 * MiB))
        self.device = attach(self.image)

    def close(self) -> None:
        detach(self.device)


class Supervised(Embedded):
    """The embedded default with systemd's ``Restart=on-failure``: what exits starts again.

    Deployed, each daemon runs under a unit that restarts it 2 s after it
    exits (roles/ferry_daemon); a master target that lost its owner lease
    during a long storage outage exits 10 by design and is restarted so.
    Every restart is recorded for the report.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.restarts: list[str] = []
        self.extra_env: dict[str, dict[str, str]] = {}
        """Environment a daemon starts with on top of the usual (kill points, a skewed clock)."""
        self.storage_via: dict[str, str] = {}
        """A daemon's storage connection string when it is not Azurite's own (a proxy)."""
        self._starting: str | None = None

    def start(self, name: str, *extra: str) -> subprocess.Popen:
        """Start daemon ``name`` with its own environment (see ``env``)."""
        self._starting = name
        try:
            return super().start(name, *extra)
        finally:
            self._starting = None

    def env(self) -> dict[str, str]:
        """The usual environment, with the starting daemon's storage and extra variables."""
        env = super().env()
        if self._starting in self.storage_via:
            env["FERRY_STORAGE"] = self.storage_via[self._starting]
        extra = dict(self.extra_env.get(self._starting or "", {}))
        if "PYTHONPATH" in extra:  # in front of the code's own
            extra["PYTHONPATH"] += os.pathsep + env["PYTHONPATH"]
        env.update(extra)
        return env

    def check_alive(self, *names: str) -> None:
        """Restart (after 2 s, as the unit does) every daemon that has exited."""
        for name in names or list(self.procs):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                why = self.log_tail(name, 1)[-160:]
                self.restarts.append(f"{name} exited {proc.returncode} ({why})")
                say(f"restarting {name}: exited {proc.returncode}")
                time.sleep(2)
                self.start(name)


# -- one scenario's deployment ---------------------------------------------------------


class Run:
    """The embedded default over a fresh source, for one scenario; ``with Run(...) as r``."""

    def __init__(
        self,
        work: Path,
        scale: Scale,
        name: str,
        agent_port: int | None = None,
        spool_fs: int | None = None,
        process_server: dict[str, Any] | None = None,
    ) -> None:
        self.work = work / name
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.scale = scale
        self.source = Source(self.work, scale.disk)
        self.target = self.work / "target.img"
        self.emb = Supervised(
            self.work / "ferry", tenant="faults", machine=MACHINE, azurite_on_disk=True
        )
        self.writer = RawWriter(self.source.device, scale.disk, scale.write_rate, len(name))
        self.agent_port = agent_port
        self.resent_seen = 0
        self.spool_fs = spool_fs
        self.process_server = process_server
        self.spool_mount: Mounted | None = None

    def __enter__(self) -> Run:
        try:
            if self.spool_fs:
                self._mount_spool_fs(self.spool_fs)
            self.emb.start_storage()
            agent: dict[str, Any] = {
                "freeze_after": 5.0,
                "batch_bytes": MiB,
                "sync_batch_bytes": MiB,
            }
            if self.agent_port:
                agent["process_server"] = f"127.0.0.1:{self.agent_port}"
            self.emb.configure(
                [{"id": DISK, "device": self.source.device}],
                {DISK: str(self.target)},
                agent=agent,
                process_server=self.process_server,
            )
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the writer, every daemon, Azurite; detach the loop device."""
        self.writer.stop.set()
        if self.writer.is_alive():
            self.writer.join(10)
        self.emb.close()
        if self.spool_mount is not None:
            self.spool_mount.__exit__()
        self.source.close()

    def _mount_spool_fs(self, size: int) -> None:
        """A small ext4 of ``size`` bytes, mounted as the process server's state directory."""
        image = self.work / "spool-fs.img"
        with open(image, "wb") as f:
            f.truncate(size)
        sh("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
        self.spool_mount = Mounted(image, self.emb.base / "process-server")
        self.spool_mount.__enter__()

    def start(self) -> None:
        """Start the writer and the three daemons."""
        self.writer.start()
        self.emb.start_all()

    def disk(self) -> dict[str, Any]:
        """The agent's status of the disk ({} while it does not answer)."""
        status = self.emb.agent_status() or {}
        self.resent_seen = max(self.resent_seen, status.get("bytes_resent", 0))
        return (status.get("disks") or [{}])[0]

    def wait_until(self, what: str, check: Callable[[], bool], timeout: float = 300) -> float:
        """Poll ``check`` until true; return the seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            self.emb.check_alive()
            if check():
                return time.monotonic() - started
            time.sleep(0.2)
        raise RuntimeError(
            f"{what}: not within {timeout:.0f} s; agent: {self.emb.log_tail('agent')}"
        )

    def wait_shipping(self, at_least: int) -> None:
        """Wait until the agent has shipped ``at_least`` bytes."""
        self.wait_until("data flowing", lambda: self.disk().get("bytes_shipped", 0) >= at_least)

    def wait_replicating(self, gen_above: int = 0, timeout: float = 600) -> dict[str, Any]:
        """Wait for a first tag of a generation above ``gen_above``, applied; return the disk."""
        found: dict[str, Any] = {}

        def ready() -> bool:
            d = self.disk()
            if d.get("phase") == "replicating" and d.get("last_tag") and d["gen"] > gen_above:
                found.update(d)
                return True
            return False

        self.wait_until("first tag", ready, timeout)
        self.emb.wait_applied(found["last_tag"]["id"], timeout=timeout)
        return found

    def converge(self, result: Result) -> None:
        """Stop the writer, take a final tag, wait for it and compare; fill ``result``."""
        started = time.monotonic()
        self.writer.stop.set()
        self.writer.join()
        tag = self.emb.tag("crash", timeout=600)
        self.emb.wait_applied(tag["id"], timeout=900)
        result.converge_s = round(time.monotonic() - started, 1)
        same = digest(str(self.target), self.scale.disk) == digest(
            self.source.device, self.scale.disk
        )
        result.lost = "nothing" if same else "TARGET DIFFERS FROM SOURCE"
        self.disk()
        if result.bytes_resent is None:
            result.bytes_resent = self.resent_seen
        result.notes.append(f"final tag {tag['id']}")
        if self.emb.restarts:
            result.notes.append("restarted as systemd would: " + "; ".join(self.emb.restarts))


# -- scenarios --------------------------------------------------------------------------


def process_server_kills(work: Path, scale: Scale, rng: random.Random) -> Result:
    """SIGKILL the process server again and again, from the first batch on, under writes."""
    result = Result(
        "process server killed -9", "SIGKILL, restart; a third 0.1-0.6 s apart, then 0.3-3 s"
    )
    with Run(work, scale, "ps-kill") as run:
        run.start()
        run.wait_shipping(1)
        in_sync = 0
        for i in range(scale.ps_kills):
            # The first third in quick succession: they land in the initial sync.
            time.sleep(rng.uniform(0.1, 0.6) if i < scale.ps_kills // 3 else rng.uniform(0.3, 3.0))
            if run.disk().get("phase") != "replicating":
                in_sync += 1
            run.emb.kill("process-server", signal.SIGKILL)
            result.times += 1
            time.sleep(rng.uniform(0.0, 1.0))
            run.emb.start("process-server")
            run.emb.wait_port()
        run.wait_replicating()
        run.converge(result)
        resyncs = run.disk().get("resyncs")
        result.notes.append(f"{in_sync} kills during the initial sync")
        result.notes.append(f"agent resyncs: {resyncs} (1 = only the initial sync)")
        if resyncs != 1:
            result.lost = f"{result.lost}; an acknowledged batch was lost (resyncs {resyncs})"
    return result


def agent_kills(work: Path, scale: Scale, rng: random.Random) -> Result:
    """SIGKILL the agent under writes: each restart must resync, never resume silently."""
    result = Result("agent killed -9", "SIGKILL at a random moment, restart; expect a resync")
    resent = 0
    with Run(work, scale, "agent-kill") as run:
        run.start()
        gen = run.wait_replicating()["gen"]
        for _ in range(scale.agent_kills):
            time.sleep(rng.uniform(1.0, 5.0))
            run.emb.kill("agent", signal.SIGKILL)
            result.times += 1
            run.emb.start("agent")
            d = run.wait_replicating(gen_above=0)
            resent += d.get("bytes_shipped", 0)
            if d["gen"] <= gen:
                result.lost = f"silent resume after a crash (gen {d['gen']} after {gen})"
                return result
            gen = d["gen"]
        result.bytes_resent = resent
        run.converge(result)
        result.notes.append(f"every restart began a new generation (last gen {gen})")
        result.notes.append("bytes resent = what each resync shipped")
    return result


def master_target_kills(work: Path, scale: Scale, rng: random.Random) -> Result:
    """SIGKILL the master target at random moments of applying."""
    result = Result(
        "master target killed -9",
        "SIGKILL, restart; every other kill as a group begins (applying.json), the rest 0.2-2 s apart",
    )
    applying = None
    with Run(work, scale, "mt-kill") as run:
        applying = Path(run.emb.base) / "master-target" / DISK / "applying.json"
        run.start()
        run.wait_shipping(1)
        half = 0
        for i in range(scale.mt_kills):
            if i % 2:
                time.sleep(rng.uniform(0.2, 2.0))
            else:  # the moment a group begins: applying.json written, the target torn
                _wait_for(applying, rng.uniform(0.0, 0.01))
            run.emb.kill("master-target", signal.SIGKILL)
            result.times += 1
            if applying.exists():
                half += 1
            run.emb.start("master-target")
            # The next kill only once the restart has replayed and closed that group.
            _wait_for(applying, 0.0, exists=False, timeout=60)
        run.wait_replicating()
        run.converge(result)
        result.notes.append(f"{half} kills landed while a group was half-applied (applying.json)")
    return result


def _wait_for(path: Path, then: float, exists: bool = True, timeout: float = 10) -> None:
    """Poll every millisecond until ``path`` exists (or is gone; or ``timeout``), sleep ``then``."""
    deadline = time.monotonic() + timeout
    while path.exists() != exists and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(then)


def storage_outages(work: Path, scale: Scale, rng: random.Random) -> Result:
    """Restart Azurite (on disk) a few times, then stop it for ``outage_s`` seconds."""
    result = Result(
        "storage restarted and unreachable",
        f"Azurite stopped and restarted on its data; then stopped {scale.outage_s:.0f} s",
    )
    with Run(work, scale, "storage") as run:
        run.start()
        run.wait_shipping(1)
        azurite = run.emb.azurite
        assert azurite is not None
        for _ in range(scale.storage_restarts):
            time.sleep(rng.uniform(1.0, 4.0))
            azurite.stop()
            azurite.start()
            result.times += 1
        run.wait_replicating()
        azurite.stop()
        result.times += 1
        time.sleep(scale.outage_s)
        azurite.start()
        run.converge(result)
        result.notes.append(f"{scale.storage_restarts} restarts, one {scale.outage_s:.0f} s outage")
    return result


def spool_full(work: Path, scale: Scale, rng: random.Random) -> Result:
    """The process server's state directory on a small ext4 that fills while storage is away."""
    size = scale.disk // 2
    result = Result(
        "spool filesystem full",
        f"state dir on a {size // MiB} MiB loop-mounted ext4; Azurite stopped until it fills",
    )
    from functions.core import health
    from processserver.status import filesystem_space

    with Run(work, scale, "spool-full", spool_fs=size) as run:
        state = run.emb.base / "process-server"
        run.start()
        run.wait_replicating()
        azurite = run.emb.azurite
        assert azurite is not None
        azurite.stop()
        result.times += 1
        least, worst = size, None
        deadline = time.monotonic() + scale.outage_s * 4
        full_for = 0.0
        while time.monotonic() < deadline and full_for < scale.outage_s:
            time.sleep(0.5)
            run.emb.check_alive()
            free = filesystem_space(state).get("fs_free_bytes", size)
            least = min(least, free)
            if free < size // 10:  # a batch no longer fits (ext4 keeps some for itself)
                full_for += 0.5
            try:
                status = json.loads((state / "status.json").read_text())
            except (OSError, ValueError):
                continue
            severity = health.spool_severity(health.spool_free(status))
            if severity == "critical" or worst is None:
                worst = severity
        azurite.start()
        run.converge(result)
        log = (run.emb.base / "process-server.log").read_text()
        spooling_errors = log.count("cannot spool")
        result.notes.append(f"least free {least / MiB:.1f} MiB, full for {full_for:.0f} s")
        result.notes.append(f"{spooling_errors} batches refused for want of space")
        result.notes.append(f"{log.count('filesystem is full')} throttles on a full filesystem")
        result.notes.append(f"monitor's worst spool alert: {worst or 'none'}")
    return result


def _flip(data: bytes, rng: random.Random) -> bytes:
    """``data`` with 16 bytes in its second half inverted."""
    if len(data) < 64:
        return data[: len(data) // 2]
    at = rng.randrange(len(data) // 2, len(data) - 16)
    return data[:at] + bytes(b ^ 0xFF for b in data[at : at + 16]) + data[at + 16 :]


def corrupt_uploads(work: Path, scale: Scale, rng: random.Random) -> Result:
    """With the master target stopped, corrupt one waiting segment blob and delete another."""
    from ferry import naming

    result = Result(
        "corrupt and missing uploads",
        "master target stopped; a waiting segment blob corrupted, a later one deleted",
    )
    rounds = 1 if scale is QUICK else 3
    with Run(work, scale, "uploads") as run:
        run.start()
        run.wait_replicating()
        storage = run.emb.storage
        container = naming.segments_container(run.emb.tenant, DISK)
        for _ in range(rounds):
            run.emb.stop("master-target")
            time.sleep(3)
            waiting = sorted(storage.list(container, f"{run.emb.tenant}/{DISK}/"))
            if len(waiting) >= 2:
                victim = waiting[len(waiting) // 3]
                storage.put(container, victim, _flip(storage.get(container, victim), rng))
                storage.delete(container, waiting[-1])
                result.times += 2
            run.emb.start("master-target")
            run.wait_replicating()
            time.sleep(2)
        run.converge(result)
        result.notes.append(f"agent resyncs: {run.disk().get('resyncs')}")
    return result


def torn_spool(work: Path, scale: Scale, rng: random.Random) -> Result:
    """Spooled batches truncated and corrupted while the process server is down."""
    result = Result(
        "torn and corrupt spool files",
        "Azurite stopped, process server killed -9; one spooled batch truncated, one corrupted",
    )
    rounds = 1 if scale is QUICK else 3
    with Run(work, scale, "spool-torn") as run:
        spool = run.emb.base / "process-server" / "spool"
        run.start()
        run.wait_replicating()
        azurite = run.emb.azurite
        assert azurite is not None
        for _ in range(rounds):
            azurite.stop()
            time.sleep(4)
            run.emb.kill("process-server", signal.SIGKILL)
            batches = sorted(spool.rglob("*.batch"))
            if len(batches) >= 2:
                torn, bad = batches[len(batches) // 2], batches[-1]
                with open(torn, "r+b") as f:
                    f.truncate(max(1, torn.stat().st_size // 2))
                bad.write_bytes(_flip(bad.read_bytes(), rng))
                result.times += 2
            azurite.start()
            run.emb.start("process-server")
            run.emb.wait_port()
            run.wait_replicating()
        run.converge(result)
        result.notes.append(f"agent resyncs: {run.disk().get('resyncs')}")
        quarantine = run.emb.base / "process-server" / "quarantine"
        kept = [p for p in quarantine.rglob("*") if p.is_file()]
        result.notes.append(f"{len(kept)} files quarantined")
    return result


def bandwidth_churn(work: Path, scale: Scale, rng: random.Random) -> Result:
    """The writer churns faster than the process server may upload (bandwidth_limit)."""
    limit = int(scale.write_rate * 0.6)
    churn = scale.outage_s * 2
    result = Result(
        "churn above the bandwidth limit",
        f"writer {scale.write_rate / MiB:.1f} MiB/s of random data, "
        f"bandwidth_limit {limit / MiB:.1f} MiB/s, for {churn:.0f} s",
    )
    with Run(work, scale, "bandwidth", process_server={"bandwidth_limit": limit}) as run:
        run.start()
        run.wait_replicating()
        most, spooled = 0, 0
        status = run.emb.base / "process-server" / "status.json"
        end = time.monotonic() + churn
        while time.monotonic() < end:
            most = max(most, run.disk().get("bytes_to_go", 0))
            with contextlib.suppress(OSError, ValueError):
                spooled = max(spooled, json.loads(status.read_text())["spool"]["bytes"])
            time.sleep(1)
        result.times = 1
        run.converge(result)
        result.notes.append(f"largest backlog: {spooled / MiB:.1f} MiB spooled")
        result.notes.append(f"{most / MiB:.1f} MiB dirty at the agent")
        result.notes.append("converge = draining that backlog at the limit")
    return result


# -- the network ------------------------------------------------------------------------


class FaultProxy:
    """A TCP proxy on 127.0.0.1 that misbehaves on demand (asyncio, in a thread of its own).

    ``mode`` is one of ``pass``, ``latency`` (each chunk 80 ms late), ``drip``
    (1 KiB every 50 ms), ``blackhole`` (nothing moves, connections stay open),
    ``halfopen`` (the server's answers stop, the client's data still flows),
    ``reset`` (every connection is reset at once, new ones too) and
    ``mangle`` (client to server, whole records, TLS's and then Ferry's own:
    after 20-300 full TLS records' worth of a connection's bytes, the record
    that crosses it is dropped, duplicated, swapped with the next or has a
    byte flipped; what a frame suffers on a faulty path, as the records see it).
    """

    ACTIONS = ("drop", "duplicate", "reorder", "corrupt")

    def __init__(self, upstream: int, seed: int = 10) -> None:
        self.upstream = upstream
        self.mode = "pass"
        self.rng = random.Random(seed)
        self.mangled = dict.fromkeys(self.ACTIONS, 0)
        self.loop = asyncio.new_event_loop()
        self.conns: set[asyncio.StreamWriter] = set()
        self.resets = 0
        self.port = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()
        server.close()

    def set(self, mode: str) -> None:
        """Switch mode; ``reset`` also resets every open connection now."""
        self.mode = mode
        if mode == "reset":
            self.loop.call_soon_threadsafe(self._reset_all)

    def _reset_all(self) -> None:
        for w in list(self.conns):
            _reset(w)
            self.resets += 1

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "reset":
            _reset(writer)
            self.resets += 1
            return
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            return
        self.conns.update((writer, up_w))
        await asyncio.gather(
            self._pipe(reader, up_w, "up"), self._pipe(up_r, writer, "down"),
            return_exceptions=True,
        )  # fmt: skip
        self.conns.difference_update((writer, up_w))
        for w in (writer, up_w):
            w.close()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, way: str) -> None:
        records = _Records(self, self.rng.randint(20, 300) * _TLS_RECORD) if way == "up" else None
        while True:
            data = await src.read(64 * 1024)
            if not data:
                break
            if records is not None and (self.mode == "mangle" or records.pending):
                data = records.feed(data)
            while self.mode == "blackhole" or (self.mode == "halfopen" and way == "down"):
                await asyncio.sleep(0.1)
            if self.mode == "latency":
                await asyncio.sleep(0.08)
            if self.mode == "drip":
                for i in range(0, len(data), 1024):
                    dst.write(data[i : i + 1024])
                    await dst.drain()
                    await asyncio.sleep(0.05)
                continue
            dst.write(data)
            await dst.drain()
        with contextlib.suppress(OSError):
            dst.write_eof()

    def close(self) -> None:
        """Stop serving (connections are dropped)."""
        self.loop.call_soon_threadsafe(self._reset_all)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


_TLS_RECORD = 16 << 10
"""A full TLS record's plaintext: the mangler's countdown is in multiples of it."""


class _Records:
    """One connection's client-to-server records, one of them mangled (``mangle`` mode).

    A TLS record is a 5-byte header (type, version, length) and its body; after
    the handshake the agent and the process server go on in Ferry's own records
    (``ferry.records``: a u32 length, whose first byte is always 0, and the
    sealed bytes). Bytes are held until a record is whole, then passed on,
    mangled or not.
    """

    def __init__(self, proxy: FaultProxy, countdown: int) -> None:
        self.proxy = proxy
        self.countdown = countdown
        """Bytes of records to pass before the one mangled: counted in bytes, not records,
        so that TLS's 16 KiB records and Ferry's of up to 1 MiB are mangled as often."""
        self.buffer = b""
        self.held: bytes | None = None  # a record kept back to come after the next one

    @property
    def pending(self) -> bool:
        return bool(self.buffer) or self.held is not None

    def feed(self, data: bytes) -> bytes:
        """What to send on now, given ``data`` from the client."""
        self.buffer += data
        out = []
        while len(self.buffer) >= 5:
            if self.buffer[0] == 0:  # Ferry's own record (ferry.records): u32 length, sealed bytes
                size = 4 + int.from_bytes(self.buffer[:4], "big")
            else:  # a TLS record: type (20-24), version, u16 length
                size = 5 + int.from_bytes(self.buffer[3:5], "big")
            if len(self.buffer) < size:
                break
            record, self.buffer = self.buffer[:size], self.buffer[size:]
            out.append(self._one(record))
        if self.proxy.mode != "mangle" and self.held is None:  # leaving the mode: let all go
            out.append(self.buffer)
            self.buffer = b""
        return b"".join(out)

    def _one(self, record: bytes) -> bytes:
        if self.held is not None:  # the swap: this one first, then the one held back
            record, self.held = record + self.held, None
            return record
        if self.proxy.mode != "mangle" or self.countdown <= 0:
            return record
        self.countdown -= len(record)
        if self.countdown > 0:
            return record
        action = self.proxy.rng.choice(FaultProxy.ACTIONS)
        self.proxy.mangled[action] += 1
        if action == "drop":
            return b""
        if action == "duplicate":
            return record + record
        if action == "reorder":
            self.held = record
            return b""
        at = self.proxy.rng.randrange(5, len(record)) if len(record) > 5 else 0
        return record[:at] + bytes([record[at] ^ 0x40]) + record[at + 1 :]


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0), as a middlebox that drops state would."""
    import socket
    import struct

    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


NET_MODES = ("latency", "reset", "pass", "drip", "blackhole", "pass", "halfopen", "pass")


def network_faults(work: Path, scale: Scale, rng: random.Random) -> Result:
    """Agent → process server through :class:`FaultProxy`, cycling through its modes."""
    result = Result(
        "network faults agent → process server",
        f"TCP proxy: {', '.join(m for m in NET_MODES if m != 'pass')}, "
        f"{scale.net_phase_s:.0f} s each",
    )
    run = Run(work, scale, "network")
    proxy = FaultProxy(run.emb.port)
    run.agent_port = proxy.port
    try:
        with run:
            run.start()
            run.wait_shipping(1)
            for mode in NET_MODES:
                proxy.set(mode)
                if mode != "pass":
                    result.times += 1
                time.sleep(scale.net_phase_s)
            proxy.set("pass")
            run.wait_replicating(timeout=900)
            run.converge(result)
            result.notes.append(f"{proxy.resets} connections reset")
            resyncs = run.disk().get("resyncs")
            result.notes.append(f"agent resyncs: {resyncs}")
    finally:
        proxy.close()
    return result


# -- storage behind a proxy, kill points, recovery points, notices, clocks ------------------


def proxy_storage(run: Run, daemons: tuple[str, ...], seed: int) -> dict[str, list[FaultProxy]]:
    """Put a :class:`FaultProxy` before Azurite's blob and queue ports for each daemon named;
    its connection string names the proxies.  Call after ``Run.__enter__``, before start."""
    from devkit.azurite import connection_string

    azurite = run.emb.azurite
    assert azurite is not None
    blob, queue, table = azurite.ports
    proxies = {}
    for i, name in enumerate(daemons):
        pair = [FaultProxy(blob, seed + 2 * i), FaultProxy(queue, seed + 2 * i + 1)]
        run.emb.storage_via[name] = connection_string(pair[0].port, pair[1].port, table)
        proxies[name] = pair
    return proxies


STORAGE_MODES = ("latency", "reset", "drip", "blackhole", "halfopen")


def storage_network_faults(work: Path, scale: Scale, rng: random.Random) -> Result:
    """Process server → storage and master target → storage through :class:`FaultProxy`."""
    phase = scale.net_phase_s * 0.6
    result = Result(
        "network faults process server / master target → storage",
        f"TCP proxy before Azurite's blob and queue ports (the daemons' connection strings "
        f"name it): {', '.join(STORAGE_MODES)}, {phase:.0f} s each, for each daemon in turn",
    )
    with Run(work, scale, "storage-net") as run:
        proxies = proxy_storage(run, ("process-server", "master-target"), rng.randrange(1 << 30))
        try:
            run.start()
            run.wait_shipping(1)
            for pair in proxies.values():
                for mode in STORAGE_MODES:
                    for proxy in pair:
                        proxy.set(mode)
                    result.times += 1
                    time.sleep(phase)
                    for proxy in pair:
                        proxy.set("pass")
                    time.sleep(phase / 4)
                    run.emb.check_alive()
            run.wait_replicating(timeout=900)
            run.converge(result)
            resets = sum(p.resets for pair in proxies.values() for p in pair)
            result.notes.append(f"{resets} storage connections reset")
            result.notes.append(f"agent resyncs: {run.disk().get('resyncs')}")
        finally:
            for pair in proxies.values():
                for proxy in pair:
                    proxy.close()
    return result


def master_target_steps(work: Path, scale: Scale, rng: random.Random) -> Result:
    """The master target SIGKILLs itself at each named step of the apply path (killpoint)."""
    from mastertarget.killpoint import ENV, STEPS

    counts = (1, 3) if scale is QUICK else (1, 2, 5)
    result = Result(
        "master target killed at every step of an apply",
        f"{ENV}=<step>:<n> (mastertarget/killpoint.py), n in {counts}, at each of "
        f"{', '.join(STEPS)}; restarted without it",
    )
    with Run(work, scale, "mt-steps") as run:
        run.start()
        run.wait_shipping(1)
        reached: dict[str, int] = dict.fromkeys(STEPS, 0)
        for step in STEPS:
            for n in counts:
                run.emb.extra_env["master-target"] = {ENV: f"{step}:{n}"}
                proc = run.emb.start("master-target")
                try:
                    code = proc.wait(timeout=180)
                except subprocess.TimeoutExpired:
                    code = None
                run.emb.extra_env.pop("master-target")
                if code == -signal.SIGKILL:
                    reached[step] += 1
                    result.times += 1
                elif code is not None:
                    result.notes.append(
                        f"{step}:{n} exited {code}: {run.emb.log_tail('master-target', 1)}"
                    )
                run.emb.start("master-target")
                time.sleep(rng.uniform(0.5, 2.0))  # replay, then on to the next
        run.wait_replicating()
        run.converge(result)
        missed = [s for s, k in reached.items() if k < len(counts)]
        result.notes.append("killed at " + ", ".join(f"{s} ×{k}" for s, k in reached.items()))
        if missed:
            result.notes.append(f"not reached within 180 s: {', '.join(missed)}")
    return result


def recovery_points_in_resync(work: Path, scale: Scale, rng: random.Random) -> Result:
    """While a resync generation is incomplete, no new recovery point may be reported."""
    hold = scale.net_phase_s
    result = Result(
        "no recovery point while a resync generation is incomplete",
        f"agent SIGKILL under writes → a resync generation, held incomplete {hold:.0f} s by a "
        "slow drip (FaultProxy) to the process server; the master target's published state "
        "(its recovery point) and status.json polled every 0.1 s until the generation's first tag",
    )
    run = Run(work, scale, "rp-resync")
    proxy = FaultProxy(run.emb.port, rng.randrange(1 << 30))
    run.agent_port = proxy.port
    status_file = run.emb.base / "master-target" / "status.json"
    samples, staged, violations = 0, 0, []
    try:
        with run:
            run.start()
            run.wait_replicating()
            for _ in range(max(2, scale.agent_kills // 2)):
                time.sleep(rng.uniform(1.0, 4.0))
                gen_before = run.disk().get("gen", 0)
                proxy.set("drip")
                run.emb.kill("agent", signal.SIGKILL)
                run.emb.start("agent")
                result.times += 1
                n, most, bad = _watch_resync(run, proxy, status_file, gen_before, hold)
                samples, staged = samples + n, max(staged, most)
                violations += bad
            run.converge(result)
    finally:
        proxy.close()
    result.notes.append(f"{samples} samples while a resync generation was incomplete")
    result.notes.append(f"up to {staged} of its batches staged at the master target meanwhile")
    if violations:
        result.lost = f"RECOVERY POINT MID-RESYNC: {violations[0]} ({len(violations)} in all)"
    else:
        result.notes.append("no recovery point moved into the incomplete generation")
    return result


def _watch_resync(
    run: Run, proxy: FaultProxy, status_file: Path, gen_before: int, hold: float
) -> tuple[int, int, list[str]]:
    """Poll until the agent's new generation reached its first tag; (samples, staged, faults).

    Until then the master target may finish groups of older generations, but
    nothing of a newer one: its cursor there stays at seq 0 on the old tag.
    """
    unset = object()
    seen: Any = unset
    samples, staged = 0, 0
    violations: list[str] = []
    release = time.monotonic() + hold
    deadline = release + 600
    while time.monotonic() < deadline:
        if time.monotonic() > release:
            proxy.set("pass")
        state = run.emb.target_state(DISK) or {}  # the master target first, the agent after
        mt = _json(status_file).get("disks", {}).get(DISK, {})
        d = run.disk()
        if (d.get("gen") or 0) > gen_before and d.get("phase") == "replicating":
            return samples, staged, violations
        samples += 1
        for where, s in (("state blob", state), ("status.json", mt)):
            if (s.get("gen") or 0) <= gen_before:
                continue
            staged = max(staged, s.get("staged") or 0)
            if seen is unset:
                seen = s.get("last_tag")
            if (s.get("applied_seq") or 0) > 0 or s.get("last_tag") != seen:
                violations.append(f"{where}: gen {s.get('gen')} at seq {s.get('applied_seq')} "
                                  f"tag {(s.get('last_tag') or {}).get('id')} mid-resync")  # fmt: skip
        time.sleep(0.1)
    raise RuntimeError("the resync generation never reached its first tag")


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


class NoticeMangler(threading.Thread):
    """Takes notices off a disk's queue through Azurite's queue API and misbehaves with some.

    Each round receives what is there (hiding it from the master target),
    then for about one notice in ``every``: deletes it (lost), sends it again
    (duplicated), sends it back after the next ones (reordered), or replaces
    it with a corrupted copy (bad JSON, another checksum or another seq).  The
    rest become visible again at once.
    """

    ACTIONS = ("lose", "duplicate", "reorder", "corrupt")

    def __init__(self, storage: Any, queue: str, rng: random.Random, every: int = 6) -> None:
        super().__init__(daemon=True)
        self.storage, self.queue, self.rng, self.every = storage, queue, rng, every
        self.stop = threading.Event()
        self.actions: tuple[str, ...] = self.ACTIONS
        self.done = dict.fromkeys(self.ACTIONS, 0)
        self.errors = 0

    def run(self) -> None:
        while not self.stop.wait(self.rng.uniform(0.2, 1.0)):
            try:
                self._round()
            except Exception:  # storage restarts in the soak: try again next round
                self.errors += 1

    def _round(self) -> None:
        """Take every visible notice (hidden 60 s), act on some, let the rest go."""
        taken: list[Any] = []
        for _ in range(40):
            batch = self.storage.receive(self.queue, count=32, visibility=60)
            if not batch:
                break
            taken += batch
        kept, late = [], []
        for message in taken:
            if self.rng.randrange(self.every) or message.body.get("type") != "segment":
                kept.append(message)
                continue
            action = self.rng.choice(self.actions)
            self.done[action] += 1
            if action == "lose":
                self.storage.delete_message(self.queue, message)
            elif action == "duplicate":
                self.storage.send(self.queue, message.body)
                kept.append(message)
            elif action == "reorder":
                late.append(message)
            else:
                self._corrupt(message)
        for message in kept:
            self.storage.defer(self.queue, message, 0)
        for message in late:  # after everything that came with them
            self.storage.send(self.queue, message.body)
            self.storage.delete_message(self.queue, message)

    def _corrupt(self, message: Any) -> None:
        body = dict(message.body)
        how = self.rng.choice(("json", "checksum", "seq"))
        if how == "json":
            self.storage.send_raw(self.queue, json.dumps(body)[:-7])
        else:
            if how == "checksum":
                body["checksum"] = "0" * (len(str(body.get("checksum") or "")) or 16)
            else:
                body["seq"] = int(body.get("seq", 0)) + 1
            self.storage.send(self.queue, body)
        self.storage.delete_message(self.queue, message)


def frames_and_notices(work: Path, scale: Scale, rng: random.Random) -> Result:
    """Records mangled agent → process server; notices lost, duplicated, reordered, corrupted."""
    from mastertarget.defaults import GAP_LOOKUP_AFTER

    phase = scale.net_phase_s * 3
    rounds = 2 if scale is QUICK else 3
    result = Result(
        "loss, duplication, reordering and corruption of frames and notices",
        f"agent → process server through FaultProxy `mangle` for {phase:.0f} s (one record "
        "per connection dropped, duplicated, swapped or flipped); then, "
        f"{rounds} times, the master target stopped while notices pile up and one in three "
        "lost, duplicated, reordered (or, the last time, corrupted) through Azurite's queue API",
    )
    from ferry import naming

    run = Run(work, scale, "frames")
    proxy = FaultProxy(run.emb.port, rng.randrange(1 << 30))
    run.agent_port = proxy.port
    try:
        with run:
            run.start()
            run.wait_replicating()
            proxy.set("mangle")
            time.sleep(phase)
            proxy.set("pass")
            # Notices: the master target stopped while a few seconds of them pile up,
            # then the mangler goes through all of them, and it starts again.
            queue = naming.disk_queue(run.emb.tenant, DISK)
            mangler = NoticeMangler(run.emb.storage, queue, random.Random(rng.random()), every=3)
            for i in range(rounds):
                # Corruption last: the resync it causes would supersede the lost notices
                # before the master target looks their batches up by name.
                last = i == rounds - 1
                mangler.actions = mangler.ACTIONS if last else ("lose", "duplicate", "reorder")
                run.emb.stop("master-target")
                time.sleep(phase / rounds)
                mangler._round()
                run.emb.start("master-target")
                time.sleep(phase / rounds / 2 if last else GAP_LOOKUP_AFTER + 10)
            result.times = sum(proxy.mangled.values()) + sum(mangler.done.values())
            run.wait_replicating(timeout=900)
            run.converge(result)
            result.notes.append(
                "frames: " + ", ".join(f"{k} {v}" for k, v in proxy.mangled.items())
            )
            result.notes.append(
                "notices: " + ", ".join(f"{k} {v}" for k, v in mangler.done.items())
            )
            log = (run.emb.base / "master-target.log").read_text(errors="replace")
            result.notes.append(f"{log.count('its notice was lost')} batches found by blob name")
            result.notes.append(f"agent resyncs: {run.disk().get('resyncs')}")
    finally:
        proxy.close()
    return result


SKEW_SITE = ROOT / "bench" / "skew"
"""The ``sitecustomize`` that skews a daemon's wall clock (its docstring says why not libfaketime)."""

SKEWS = {"agent": (420, -540), "process-server": (-240, 660), "master-target": (780, -120)}
"""Each daemon's wall clock offset in seconds, first and second half (a step, as NTP makes).

Within Azure Storage's 15 minutes for a shared-key request date; the
monotonic clocks are left alone (they are per machine and never skewed)."""


def skew(run: Run, offsets: dict[str, int]) -> dict[str, Path]:
    """Start each daemon named with its wall clock off by its offset; the files to step it."""
    files = {}
    for name, offset in offsets.items():
        files[name] = run.work / f"{name}.skew"
        files[name].write_text(f"{offset}\n")
        run.emb.extra_env.setdefault(name, {}).update(
            PYTHONPATH=str(SKEW_SITE), FERRY_SKEW_FILE=str(files[name])
        )
    return files


def clock_skew(work: Path, scale: Scale, rng: random.Random) -> Result:
    """Each daemon's wall clock off by minutes, stepped halfway (bench/skew/sitecustomize.py)."""
    phase = scale.net_phase_s * 3
    result = Result(
        "clock skew between components",
        "each daemon's wall clock (time.time, bench/skew/sitecustomize.py) off by "
        + ", ".join(f"{n} {a:+d} s then {b:+d} s" for n, (a, b) in SKEWS.items())
        + f", {phase:.0f} s each",
    )
    with Run(work, scale, "skew") as run:
        files = skew(run, {name: first for name, (first, _) in SKEWS.items()})
        run.start()
        run.wait_replicating()
        result.times = len(SKEWS)
        time.sleep(phase)
        for name, (_, second) in SKEWS.items():
            files[name].write_text(f"{second}\n")
        result.times += len(SKEWS)
        time.sleep(phase)
        run.converge(result)
        state = run.emb.target_state(DISK) or {}
        ahead = state.get("updated_at", 0) - time.time()
        result.notes.append(f"master target's last published state dated {ahead:+.0f} s from now")
        result.notes.append(f"agent resyncs: {run.disk().get('resyncs')}")
    return result


# -- the mixed soak -----------------------------------------------------------------------


SOAK_EVENTS = ("ps-kill", "agent-kill", "mt-kill", "mt-step", "storage-restart",
               "agent-net", "storage-net")  # fmt: skip


def mixed_soak(work: Path, scale: Scale, rng: random.Random) -> Result:
    """Everything at once, at random, for ``scale.soak_s``: ``make faults-soak``."""
    from ferry import naming
    from mastertarget.killpoint import ENV, STEPS

    result = Result(
        "mixed soak",
        f"{scale.soak_s / 60:.0f} min of random events, one every 2-8 s: "
        f"{', '.join(SOAK_EVENTS)}; all the while notices mangled" + ", clocks skewed (bench/skew)",
    )
    run = Run(work, scale, "soak")
    agent_proxy = FaultProxy(run.emb.port, rng.randrange(1 << 30))
    run.agent_port = agent_proxy.port
    counts = dict.fromkeys(SOAK_EVENTS, 0)
    proxies: dict[str, list[FaultProxy]] = {}
    mangler = None
    try:
        with run:
            proxies = proxy_storage(
                run, ("process-server", "master-target"), rng.randrange(1 << 30)
            )
            skew(run, {name: first for name, (first, _) in SKEWS.items()})
            run.start()
            run.wait_replicating(timeout=900)
            queue = naming.disk_queue(run.emb.tenant, DISK)
            mangler = NoticeMangler(run.emb.storage, queue, random.Random(rng.random()), every=10)
            mangler.start()
            azurite = run.emb.azurite
            assert azurite is not None
            end = time.monotonic() + scale.soak_s
            while time.monotonic() < end:
                time.sleep(rng.uniform(2.0, 8.0))
                event = rng.choice(SOAK_EVENTS)
                counts[event] += 1
                for p in [agent_proxy, *(p for pair in proxies.values() for p in pair)]:
                    p.set("pass")
                if event in ("ps-kill", "agent-kill", "mt-kill"):
                    name = {"ps": "process-server", "agent": "agent", "mt": "master-target"}[
                        event.split("-")[0]
                    ]
                    run.emb.kill(name, signal.SIGKILL)
                    run.emb.start(name)
                elif event == "mt-step":
                    env = run.emb.extra_env.setdefault("master-target", {})
                    env[ENV] = f"{rng.choice(STEPS)}:{rng.randint(1, 4)}"
                    run.emb.start("master-target")  # dies there; check_alive restarts it
                    env.pop(ENV)
                elif event == "storage-restart":
                    azurite.stop()
                    time.sleep(rng.uniform(0.0, 5.0))
                    azurite.start()
                elif event == "agent-net":
                    agent_proxy.set(rng.choice(("latency", "reset", "drip", "blackhole",
                                                "halfopen", "mangle")))  # fmt: skip
                else:
                    mode = rng.choice(STORAGE_MODES)
                    for p in proxies[rng.choice(list(proxies))]:
                        p.set(mode)
                run.emb.check_alive()
            for p in [agent_proxy, *(p for pair in proxies.values() for p in pair)]:
                p.set("pass")
            mangler.stop.set()
            mangler.join(30)
            result.times = sum(counts.values()) + sum(mangler.done.values())
            run.wait_replicating(timeout=900)
            run.converge(result)
            result.notes.append("events: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
            result.notes.append(
                "notices: " + ", ".join(f"{k} {v}" for k, v in mangler.done.items())
            )
            result.notes.append(
                "frames: " + ", ".join(f"{k} {v}" for k, v in agent_proxy.mangled.items())
            )
            result.notes.append(f"agent resyncs: {run.disk().get('resyncs')}")
    finally:
        if mangler is not None:
            mangler.stop.set()
        for p in [agent_proxy, *(p for pair in proxies.values() for p in pair)]:
            p.close()
    return result


SCENARIOS: dict[str, Callable[[Path, Scale, random.Random], Result]] = {
    "ps-kill": process_server_kills,
    "agent-kill": agent_kills,
    "mt-kill": master_target_kills,
    "storage": storage_outages,
    "network": network_faults,
    "spool-full": spool_full,
    "spool-torn": torn_spool,
    "uploads": corrupt_uploads,
    "bandwidth": bandwidth_churn,
    "storage-net": storage_network_faults,
    "mt-steps": master_target_steps,
    "rp-resync": recovery_points_in_resync,
    "frames": frames_and_notices,
    "skew": clock_skew,
}

SOAKS: dict[str, Callable[[Path, Scale, random.Random], Result]] = {"soak": mixed_soak}
"""Not part of ``make faults``: ``make faults-soak`` (``--only soak``)."""

NOT_IN_CAMPAIGN = {
    "soak": "its own target, `make faults-soak` (`SOAK_MINUTES`, 10 by default): see below",
}
"""Scenarios `make faults` leaves out, and why."""


FINDINGS = [
    "**A full spool filesystem made the agent resend in a loop.** The process server"
    " refused every batch it could not write (ENOSPC) and hung up; the agent reconnected"
    " and resent its whole window, again and again: 2.4 GB resent in 15 s at the quick"
    " scale, 2542 refusals, and each refused write left its partial temporary file"
    " behind, holding the very space that was missing. Fixed: a full filesystem is"
    " backpressure like the spool limit (the write is retried every second, the"
    " connection kept), and `ferry.durable.write_atomic` removes its temporary file on"
    " failure. Regression test: `tests/test_processserver.py::"
    "test_a_full_spool_filesystem_stalls_the_agent_instead_of_refusing` (fails on the"
    " old code on both counts). The row above is after the fix: nothing resent.",
    "**The spool alerts ignored the disk.** The 30%/25% free-space alerts compared the"
    " spool with its configured limit only, so a filling filesystem raised nothing."
    " Fixed: the monitor takes the smallest free fraction the process server reports"
    " (limit, `free_fraction`, and the filesystem's `fs_free_bytes`/`fs_total_bytes`,"
    " now in status.json too). Regression test: `tests/test_functions_api.py::"
    "test_a_filling_spool_filesystem_raises_the_spool_alert`.",
    "**A lost notice stalled its disk for good.** A segment notice deleted from the"
    " queue (or expired: Azure keeps a message seven days by default) left the batch it"
    " announced unstaged, and the master target waited on that gap forever while later"
    " batches piled up in staging; nothing looked for the blob, whose name is"
    " deterministic. Fixed: a gap unchanged for `GAP_LOOKUP_AFTER` (30 s) is read by its"
    " blob's name, verified and staged (`mastertarget/gap.py`). Regression test:"
    " `tests/test_mastertarget.py::test_a_lost_notice_is_found_by_its_blobs_name` (fails"
    " on the old code). The *frames and notices* row counts the batches so found.",
    "**libfaketime cannot skew a Python daemon here.** With Debian's libfaketime 0.9.10"
    " and Python 3.11, `FAKETIME_DONT_FAKE_MONOTONIC=1` makes `time.sleep` fail with"
    " EINVAL, and without it the monotonic clocks follow the faked wall clock, so every"
    " timed `threading` wait hangs: a harness problem, not Ferry's. The *clock skew* row"
    " skews each daemon's `time.time` with `bench/skew/sitecustomize.py` instead"
    " (OpenSSL's certificate checks keep the real clock).",
    "**A late resync request stranded the agent's generation.** In the mixed soak an"
    " agent asked for a resync, was killed before the answer, and asked again; the"
    " first request's notice reached the master target two minutes later, after the"
    " second had started generation 4 and the agent was shipping it. The master target"
    " started generation 5 for the stale request, dropped every batch of 4 as stale, and"
    " the final tag never arrived: the disk would have waited for good. Fixed after this"
    " run: the cursor records when the queue took the request that started its"
    " generation, and a request queued earlier is deleted unanswered. Regression test:"
    " `tests/test_mastertarget.py::test_a_resync_request_overtaken_by_a_newer_one_is_ignored`"
    " (fails on the old code).",
]


# -- the report -------------------------------------------------------------------------


def version() -> str:
    """The code version: commit, plus ``+dirty`` when the work tree has changes."""
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return (commit or "unknown") + ("+dirty" if dirty else "")


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / MiB:.1f} MiB"


def _table(
    results: list[Result], scale: Scale, command: str, seconds: float, code: str
) -> list[str]:
    """The command, the version and one row per result."""
    lines = [
        f"- Command: `{command}` ({scale.name} scale: {scale.disk // MiB} MiB disk, writer "
        f"{scale.write_rate / MiB:.0f} MiB/s)",
        f"- Code version: `{code}`, run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f" on `{os.uname().nodename}`, {seconds / 60:.1f} minutes",
        "",
        "| Scenario | Injected | Times | Lost | Converge | Bytes resent | Notes |",
        "|---|---|---:|---|---:|---:|---|",
    ]
    for r in results:
        converge = "—" if r.converge_s is None else f"{r.converge_s:.1f} s"
        lines.append(
            f"| {r.scenario} | {r.injected} | {r.times} | {r.lost} | {converge} "
            f"| {_mib(r.bytes_resent)} | {'; '.join(r.notes)} |"
        )
    return lines


SOAK_BEGIN = "<!-- soak: written by `make faults-soak`, kept by `make faults` -->"
SOAK_END = "<!-- /soak -->"


def _soak_section(lines: list[str] | None = None) -> str:
    """The soak's section: ``lines`` (a new run), else what the report has, else a stub."""
    if lines is None:
        old = REPORT.read_text() if REPORT.exists() else ""
        if SOAK_BEGIN in old and SOAK_END in old:
            return old[old.index(SOAK_BEGIN) : old.index(SOAK_END) + len(SOAK_END)]
        lines = ["Not run yet: `make faults-soak`."]
    head = ["## Mixed soak", "",
            "Every fault above at random, one after another, on one deployment: its own",
            "make target, since it runs for as long as it is given.", ""]  # fmt: skip
    return "\n".join([SOAK_BEGIN, *head, *lines, SOAK_END])


def write_report(
    ran: list[str], results: list[Result], scale: Scale, command: str, seconds: float, code: str
) -> Path:
    """Write docs/reliability.md from the results of scenarios ``ran`` (a soak: its section)."""
    table = _table(results, scale, command, seconds, code)
    if ran == ["soak"] and REPORT.exists():
        old = REPORT.read_text()
        new = _soak_section(table)
        if SOAK_BEGIN in old and SOAK_END in old:
            before, after = old.split(SOAK_BEGIN, 1)[0], old.split(SOAK_END, 1)[1]
            REPORT.write_text(before + new + after)
        else:
            REPORT.write_text(old.rstrip("\n") + "\n\n" + new + "\n")
        return REPORT
    lines = [
        "# Reliability: the fault campaign",
        "",
        "Written by `bench/faults.py` (issue #10). Each scenario replicates a loop device",
        "on the embedded default (Azurite on disk, the daemons as processes, tracefs,",
        "mutual TLS) while a writer changes it, injects its fault with a real mechanism,",
        "then stops the writer, takes a final tag and compares the digests of source and",
        "target. *Lost* is what the comparison found; *converge* is from the writer's stop",
        "to the final tag applied; *bytes resent* is what the agent sent again after",
        "reconnecting (for agent crashes: what the resyncs shipped).",
        "",
        *table,
    ]
    lines += ["", "## Defects the campaign found", ""]
    lines += [f"- {finding}" for finding in FINDINGS]
    lines += ["", "## Not yet run", ""]
    lines += [f"- `{n}`: not in this run (`--only`)" for n in SCENARIOS if n not in ran]
    lines += [f"- `{n}`: {why}" for n, why in NOT_IN_CAMPAIGN.items() if n not in ran]
    lines += [
        "",
        "The spool free-space alert compares with the filesystem's real free space too",
        "(`fs_free_bytes`/`fs_total_bytes`, now also in the process server's status.json;",
        "the smaller fraction wins): the *spool filesystem full* row reports the alert the",
        "monitor computes from that status, and `tests/test_functions_api.py` has the",
        "regression test.",
        "",
        _soak_section(),
        "",
    ]
    REPORT.write_text("\n".join(lines))
    return REPORT


# -- main -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the campaign (or the scenarios named) and write docs/reliability.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes, fewer faults")
    parser.add_argument("--only", nargs="*", choices=[*SCENARIOS, *SOAKS], help="these scenarios")
    parser.add_argument("--soak-minutes", type=float, help="how long the soak runs")
    parser.add_argument("--no-report", action="store_true", help="do not write the report")
    parser.add_argument("--seed", type=int, default=10)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the fault campaign needs root (loop devices, tracefs)", file=sys.stderr)
        return 2
    scale = QUICK if args.quick else FULL
    if args.soak_minutes:
        scale = dataclasses.replace(scale, soak_s=args.soak_minutes * 60)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="ferry-faults-"))
    started = time.monotonic()
    code = version()  # before anything runs: what was run
    results = []
    try:
        for name in args.only or list(SCENARIOS):
            say(f"{name}: starting")
            try:
                result = {**SCENARIOS, **SOAKS}[name](work, scale, rng)
            except Exception as exc:  # a failed scenario is a finding, not the end
                result = Result(name, "see notes", lost=f"FAILED: {exc}"[:300])
            say(f"{name}: {result}")
            results.append(result)
    finally:
        if all(r.lost == "nothing" for r in results):
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"logs of the failed scenarios kept in {work}")
    if not args.no_report:
        command = "make faults-quick" if args.quick else "make faults"
        if args.only == ["soak"] and not args.quick:
            command = f"make faults-soak SOAK_MINUTES={scale.soak_s / 60:g}"
        elif args.only:
            command += f" FAULTS_ARGS='--only {' '.join(args.only)}'"
        ran = args.only or list(SCENARIOS)
        seconds = time.monotonic() - started
        say(f"wrote {write_report(ran, results, scale, command, seconds, code)}")
    return 0 if all(r.lost == "nothing" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
