"""The embedded default: every Ferry role on one machine, Azurite as Azure Storage.

Used by ``make demo``, the end-to-end tests and the benchmarks alike, so all
three exercise the same deployment: real daemons as subprocesses, real
mutual TLS, real Azurite over HTTP.  Everything it starts is stopped by
:meth:`Embedded.close` (also on Ctrl-C through the context manager).  The
helpers at the end (real files to fill a source with, a writer that keeps
changing them, the digest that proves a copy) serve the demo and the tests.
"""

from __future__ import annotations

import compileall
import contextlib
import functools
import hashlib
import json
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from devkit.azurite import ROOT, Azurite, free_port
from ferry import memory, naming, pki
from ferry.blockio import DirectReader
from ferry.errors import Exit, FerryError, NotFound
from ferry.storage import Storage

DAEMONS = {
    "process-server": "processserver",
    "master-target": "mastertarget",
    "agent": "agent",
}


@functools.cache
def compile_daemons() -> None:
    """Ferry's own packages as bytecode, as roles/ferry_daemon leaves them on a host.

    A daemon started from source where no bytecode can be written (a read-only
    checkout, or ``PYTHONDONTWRITEBYTECODE``, which this project's CI machine
    sets) compiles every module it imports at each start: the agent took 0.21 CPU s
    to start and read its settings from source, 0.14 from bytecode.  Files already
    current are kept; a tree that cannot be written is left as it is.
    """
    for package in ("ferry", *DAEMONS.values()):
        with contextlib.suppress(OSError):
            compileall.compile_dir(ROOT / package, quiet=2)


class EmbeddedError(FerryError):
    """{detail}"""

    exit_code = Exit.DEVKIT


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


def write_toml(path: Path, settings: dict[str, Any]) -> Path:
    """Write a flat settings dict (plus lists of tables) as TOML."""
    lines, tables = [], []
    for key, value in settings.items():
        if value is None:
            continue
        if isinstance(value, list) and value and isinstance(value[0], dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml(value)}")
    for key, items in tables:
        for item in items:
            lines.append(f"\n[[{key}]]")
            lines.extend(f"{k} = {_toml(v)}" for k, v in item.items() if v is not None)
    path.write_text("\n".join(lines) + "\n")
    return path


class Embedded:
    """A one-machine Ferry deployment under ``base``."""

    def __init__(
        self,
        base: Path,
        tenant: str = "demo",
        machine: str = "web01",
        azurite: Azurite | None = None,
        log_level: str = "",
        azurite_on_disk: bool = False,
    ) -> None:
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.tenant = tenant
        self.machine = machine
        self._own_azurite = azurite is None
        self.azurite = azurite
        self.procs: dict[str, subprocess.Popen] = {}
        self.agent_pids: list[int] = []
        self.configs: dict[str, Path] = {}
        self.port = free_port()
        self.pki = self.base / "pki"
        self.verbose = log_level == "debug"
        self.azurite_on_disk = azurite_on_disk

    # -- setup ----------------------------------------------------------------------

    def start_storage(self) -> Azurite:
        """Start Azurite (unless one was handed in) and make the certificates; return Azurite."""
        if self.azurite is None:
            # On disk for long runs: Azurite's in-memory store grows with churn
            # until the emulator stalls for minutes (seen in the benchmarks).
            location = None
            if self.azurite_on_disk:
                location = str(self.base / "azurite")
                Path(location).mkdir(exist_ok=True)
            self.azurite = Azurite(location=location, log=str(self.base / "azurite.log")).start()
        pki.make_ca(self.pki / "ca")
        pki.issue(self.pki / "ca", self.pki, "process-server", ["localhost", "127.0.0.1"])
        pki.issue(self.pki / "ca", self.pki, f"agent-{self.machine}", tenants=[self.tenant],
                  machine=self.machine)  # fmt: skip
        return self.azurite

    @property
    def connection_string(self) -> str:
        """The storage account's connection string; storage must be started first."""
        if self.azurite is None:
            raise EmbeddedError(detail="storage is not started: call start_storage() first")
        return self.azurite.connection_string

    @property
    def storage(self) -> Storage:
        """A storage client for the deployment's account."""
        return Storage(self.connection_string)

    def configure(
        self,
        disks: list[dict[str, str]],
        targets: dict[str, str],
        agent: dict[str, Any] | None = None,
        process_server: dict[str, Any] | None = None,
        master_target: dict[str, Any] | None = None,
    ) -> None:
        """Write the settings of all three daemons.

        ``disks`` are the agent's ``{id, device}`` tables; ``targets`` maps
        each disk id to the master target's target path.
        """
        ca = str(self.pki / "ca" / "ca.pem")
        key_file = self.base / "segment.key"
        if not key_file.exists():  # sealed, as deployed: one key for both ends
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(os.urandom(32).hex() + "\n")
        self.configs["process-server"] = write_toml(
            self.base / "process-server.toml",
            {
                "listen": f"127.0.0.1:{self.port}",
                "ca": ca,
                "cert": str(self.pki / "process-server.pem"),
                "key": str(self.pki / "process-server.key"),
                "state_dir": str(self.base / "process-server"),
                "tenant": self.tenant,
                "agents": {self.machine: [d["id"] for d in disks]},
                "segment_key_file": str(key_file),
                **(process_server or {}),
            },
        )
        self.configs["master-target"] = write_toml(
            self.base / "master-target.toml",
            {
                "tenant": self.tenant,
                "state_dir": str(self.base / "master-target"),
                "segment_key_file": str(key_file),
                **(master_target or {}),
                "disks": [{"id": d, "target": t} for d, t in targets.items()],
            },
        )
        self.configs["agent"] = write_toml(
            self.base / "agent.toml",
            {
                "tenant": self.tenant,
                "machine": self.machine,
                "process_server": f"127.0.0.1:{self.port}",
                "server_name": "localhost",
                "ca": ca,
                "cert": str(self.pki / f"agent-{self.machine}.pem"),
                "key": str(self.pki / f"agent-{self.machine}.key"),
                "state_dir": str(self.base / "agent"),
                **(agent or {}),
                "disks": disks,
            },
        )
        self.disk_ids = [d["id"] for d in disks]

    # -- daemons --------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """Environment for the daemons: the storage connection string and the code path."""
        env = dict(os.environ)
        env["FERRY_STORAGE"] = self.connection_string
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self, name: str, *extra: str) -> subprocess.Popen:
        """Start daemon ``name`` (process-server, master-target or agent)."""
        self.stop(name)
        compile_daemons()
        log = open(self.base / f"{name}.log", "ab")
        args = [sys.executable, "-m", DAEMONS[name], "--config", str(self.configs[name]), *extra]
        if self.verbose:
            args.append("--verbose")
        env = self.env()
        if name in memory.HUGE_PAGE_DAEMONS:  # as the role's environment file has it
            env = {**memory.HUGE_PAGE_HEAP, **env}
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        log.close()
        self.procs[name] = proc
        if name == "agent":
            self.agent_pids.append(proc.pid)
        return proc

    def start_all(self) -> None:
        """Start the process server, the master target and the agent, in that order."""
        self.start("process-server")
        self.wait_port()
        self.start("master-target")
        self.start("agent")

    def wait_port(self, timeout: float = 30) -> None:
        """Wait until the process server accepts connections."""
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive("process-server")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 1),
            ):
                return
            time.sleep(0.1)
        raise EmbeddedError(
            detail="the process server did not start listening; see process-server.log"
        )

    def check_alive(self, *names: str) -> None:
        """Raise with the log's last lines if one of the daemons has exited."""
        for name in names or list(self.procs):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                tail = self.log_tail(name)
                raise EmbeddedError(detail=f"{name} exited with status {proc.returncode}: {tail}")

    def log_tail(self, name: str, lines: int = 5) -> str:
        """The last lines of a daemon's log, joined."""
        try:
            text = (self.base / f"{name}.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to daemon ``name`` and reap it."""
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self, name: str) -> None:
        """Stop daemon ``name`` gracefully (SIGTERM, then SIGKILL after 30 s)."""
        self.kill(name, signal.SIGTERM)
        self.procs.pop(name, None)

    def close(self) -> None:
        """Stop everything this deployment started."""
        for name in ("agent", "process-server", "master-target"):
            self.stop(name)
        for pid in self.agent_pids:  # only ours: other deployments may share the machine name
            _remove_trace_instances(f"ferry-{self.machine}-{pid}")
        if self._own_azurite and self.azurite is not None:
            self.azurite.stop()

    def __enter__(self) -> Embedded:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- observation ----------------------------------------------------------------

    def agent_call(self, request: dict[str, Any], timeout: float = 180) -> dict[str, Any]:
        """Send a request to the agent's control socket."""
        from ferry.agentsocket import call

        return call(str(self.base / "agent" / "agent.sock"), request, timeout)

    def agent_status(self) -> dict[str, Any] | None:
        """The agent's status, or None while it is not answering."""
        try:
            answer = self.agent_call({"cmd": "status"}, timeout=10)
        except (OSError, ValueError):
            return None
        return answer.get("status")

    def tag(self, kind: str = "crash", timeout: float = 300) -> dict[str, Any]:
        """Ask the agent for a tag; return it once it is durable at the process server."""
        answer = self.agent_call({"cmd": "tag", "kind": kind, "timeout": timeout}, timeout + 30)
        if not answer.get("ok"):
            raise EmbeddedError(detail=f"tag failed: {answer.get('error')}")
        return answer["tag"]

    def target_state(self, disk: str) -> dict[str, Any] | None:
        """What the master target published about ``disk`` (None before anything)."""
        try:
            return self.storage.get_json(
                naming.control_container(self.tenant, disk),
                naming.disk_state_blob(self.tenant, disk),
            )
        except NotFound:
            return None

    def wait_applied(
        self, tag_id: str, disks: list[str] | None = None, timeout: float = 600, progress=None
    ) -> float:
        """Wait until every disk's target sits on ``tag_id`` or a later tag; return when."""
        deadline = time.monotonic() + timeout
        wanted = int(tag_id.rsplit("-", 1)[1])
        while time.monotonic() < deadline:
            self.check_alive()
            done = 0
            for disk in disks or self.disk_ids:
                state = self.target_state(disk) or {}
                tag = state.get("last_tag") or {}
                if tag.get("t0_mono_ns", -1) >= wanted:
                    done += 1
            if done == len(disks or self.disk_ids):
                return time.time()
            if progress:
                progress()
            time.sleep(0.1)
        raise EmbeddedError(detail=f"the target did not reach tag {tag_id} within {timeout:.0f} s")


def _remove_trace_instances(name: str) -> None:
    base = Path("/sys/kernel/tracing/instances")
    try:
        leftovers = [base / name] if (base / name).is_dir() else []
    except OSError:
        return  # not root: there is no tracefs instance of ours to remove
    for inst in leftovers:
        with contextlib.suppress(OSError):
            (inst / "tracing_on").write_text("0")
            inst.rmdir()


def copy_tree_sample(
    dest: Path, budget: int, sources: tuple[str, ...] = ("/usr/lib", "/usr/share")
) -> int:
    """Copy real files from the system into ``dest`` until ``budget`` bytes; return bytes copied."""
    copied = 0
    for source in sources:
        for root, _dirs, files in os.walk(source):
            for name in sorted(files):
                path = os.path.join(root, name)
                try:
                    if os.path.islink(path) or not os.path.isfile(path):
                        continue
                    size = os.path.getsize(path)
                    if copied + size > budget or size == 0:
                        continue
                    target = dest / os.path.relpath(path, "/")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, target)
                    copied += size
                except OSError:
                    continue
                if copied >= budget * 0.98:
                    return copied
    return copied


DIGEST_CHUNK = 8 << 20
"""Bytes :func:`digest` reads at a time."""


def digest(path: str, size: int) -> str:
    """sha256 of the first ``size`` bytes of a device or file, read with O_DIRECT."""
    reader = DirectReader(path, DIGEST_CHUNK)
    h = hashlib.sha256()
    try:
        for offset in range(0, size, DIGEST_CHUNK):
            h.update(reader.read(offset, min(DIGEST_CHUNK, size - offset)))
    finally:
        reader.close()
    return h.hexdigest()


class RawWriter(threading.Thread):
    """Random O_DIRECT writes of 4-64 KiB all over a block device at about ``rate`` bytes/s.

    ``writes`` counts them and ``written`` their bytes; ``stop`` ends the thread.
    """

    def __init__(self, device: str, size: int, rate: int, seed: int = 1) -> None:
        super().__init__(name="raw-writer", daemon=True)
        self.device, self.size, self.rate = device, size, rate
        self.stop = threading.Event()
        self.rng = random.Random(seed)
        self.writes = self.written = 0

    def run(self) -> None:
        fd = os.open(self.device, os.O_WRONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, 64 * 1024)  # page-aligned, as O_DIRECT needs
        try:
            while not self.stop.is_set():
                n = self.rng.choice([4096, 16384, 65536])
                offset = self.rng.randrange(0, self.size - n) // 4096 * 4096
                buf[:n] = self.rng.randbytes(n)
                os.pwritev(fd, [memoryview(buf)[:n]], offset)
                self.writes += 1
                self.written += n
                self.stop.wait(n / self.rate)
        finally:
            os.close(fd)


class FileWriter(threading.Thread):
    """Keeps changing files under ``root/live`` at about ``rate`` bytes/s until ``stop`` is set.

    It rewrites files (fsyncing some), appends to a journal and now and then
    deletes one: the mix a filesystem's replica must survive.
    """

    def __init__(self, root: Path, rate: int) -> None:
        super().__init__(name="writer", daemon=True)
        self.root = root / "live"
        self.root.mkdir(exist_ok=True)
        self.rate = rate
        self.stop = threading.Event()
        self.written = 0
        self.rng = random.Random(7)

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            size = self.rng.choice([4096, 16384, 65536, 262144])
            path = self.root / f"f{self.rng.randrange(200):03d}.bin"
            with open(path, "wb") as f:
                f.write(self.rng.randbytes(size))
                if n % 4 == 0:
                    os.fsync(f.fileno())
            with open(self.root / "journal.log", "a") as log:
                log.write(f"{time.time():.6f} wrote {path.name} {size}\n")
            if n % 25 == 0:
                victim = self.root / f"f{self.rng.randrange(200):03d}.bin"
                with contextlib.suppress(FileNotFoundError):
                    victim.unlink()
            self.written += size
            self.stop.wait(size / self.rate)
