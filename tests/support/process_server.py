"""The process server as a process, and a tiny agent that speaks to it.

:class:`ProcessServer` is ``python -m processserver`` with its own settings,
state directory and log; :class:`Agent` is a mutual-TLS client speaking
``ferry.wire`` the way the mobility agent does.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

from devkit.azurite import connection_string, free_port
from devkit.embedded import write_toml
from ferry import pki, records, wire
from ferry.batch import Batch
from support import ROOT, wait_for

DISK = "web01-disk0"
"""The disk the agent says hello with, unless told otherwise."""


def legacy_spool_file(batch: Batch) -> bytes:
    """A spool file as versions before 2026-12-04 wrote it: u32 big-endian header length,
    the batch header (compact JSON), the raw payload (written here, not by the code read)."""
    header = json.dumps(batch.header(), separators=(",", ":")).encode()
    return len(header).to_bytes(4, "big") + header + bytes(batch.payload)


class ProcessServer:
    """``python -m processserver`` with its own settings, state directory and log."""

    def __init__(self, base: Path, certs: Path, storage: str, **settings) -> None:
        self.base = base
        self.port = free_port()
        self.state_dir = base / "state"
        self.storage = storage
        self.segment_key: bytes | None = None
        if "segment_key_file" not in settings and not settings.get("allow_unsealed"):
            self.segment_key = os.urandom(32)  # sealed, as deployed
            (base / "segment.key").write_text(self.segment_key.hex() + "\n")
            settings["segment_key_file"] = str(base / "segment.key")
        self.config = write_toml(
            base / "process-server.toml",
            {
                "listen": f"127.0.0.1:{self.port}",
                "ca": str(certs / "ca" / "ca.pem"),
                "cert": str(certs / "process-server.pem"),
                "key": str(certs / "process-server.key"),
                "state_dir": str(self.state_dir),
                **settings,
            },
        )
        self.proc: subprocess.Popen | None = None
        self.runs = 0

    @property
    def log(self) -> Path:
        return self.base / f"run{self.runs}.log"

    def start(self, storage: str | None = None) -> ProcessServer:
        """Start (again), optionally with another storage, and wait for "listening on"."""
        self.storage = storage or self.storage
        self.runs += 1
        env = {**os.environ, "FERRY_STORAGE": self.storage, "PYTHONPATH": str(ROOT)}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "processserver", "--config", str(self.config)],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            )  # fmt: skip
        wait_for(lambda: "listening on" in self.log.read_text(), 30, self.tail)
        return self

    def tail(self) -> str:
        return self.log.read_text()[-3000:]

    def signal(self, sig: int) -> int:
        """Send ``sig`` and return the exit status."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(30)

    def status(self) -> dict:
        return json.loads((self.state_dir / "status.json").read_text())

    def spooled(self, tenant: str) -> list[str]:
        disk_dir = self.state_dir / "spool" / tenant / DISK
        return sorted(p.name for p in disk_dir.iterdir()) if disk_dir.exists() else []

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def dead_storage() -> str:
    """A connection string whose ports nobody listens on: storage is down."""
    return connection_string(free_port(), free_port(), free_port())


class Agent:
    """A mutual-TLS client speaking ferry.wire, the way the mobility agent does.

    Like the agent, it reads in a thread of its own, so sends may block (on a
    throttled server) while acks are still read.
    """

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock: wire.Conn = context.wrap_socket(raw, server_hostname="localhost")
        self.sock.settimeout(None)
        self.frames: queue.Queue = queue.Queue()
        self.welcome: dict = {}
        """The answer to hello, where a test keeps it."""
        self.reader = threading.Thread(target=self._read, daemon=True)
        """Started by the first recv(), or by hello() once it has its answer."""

    def _read(self) -> None:
        try:
            while (frame := wire.recv(self.sock, "process server")) is not None:
                self.frames.put(frame)
            self.frames.put(None)
        except Exception as exc:  # handed to the test thread by recv()
            self.frames.put(exc)

    def send(self, header: dict, payload: bytes = b"") -> None:
        wire.send(self.sock, header, payload)

    def recv(self, timeout: float = 10) -> tuple[dict, bytes] | None:
        """The next frame; None once the server closed; TimeoutError if none comes in time."""
        if not self.reader.is_alive() and self.reader.ident is None:
            self.reader.start()
        try:
            item = self.frames.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no frame within {timeout} s")
        if isinstance(item, Exception):
            raise item
        return item

    def hello(
        self,
        tenant: str,
        disks: tuple[str, ...] = (DISK,),
        machine: str = "web01",
        offer_records: bool | list[str] = False,
    ) -> dict:
        """Say hello (offering Ferry's own records if ``offer_records``: every protocol, as
        the agent does, or the ones listed) and return the answer; go on in records if the
        server took them."""
        hello = {"type": "hello", "tenant": tenant, "machine": machine, "disks": list(disks)}
        offered: list[str] = []
        if offer_records:
            assert isinstance(self.sock, ssl.SSLSocket)
            offered = records.offer(self.sock)
            assert offered, "this interpreter's ssl layout was not recognised"
            if isinstance(offer_records, list):
                offered = offer_records
            hello["records"] = offered
        self.send(hello)
        # Read here, unless the reader runs: the answer decides what it reads from.
        started = self.reader.ident is not None
        frame = self.recv() if started else wire.recv(self.sock, "process server")
        assert frame is not None
        taken = frame[0].get("records")
        if taken is not None:
            assert taken in offered and isinstance(self.sock, ssl.SSLSocket)
            self.sock = records.switch(self.sock, taken, server_side=False)
        if self.reader.ident is None:
            self.reader.start()
        return frame[0]

    def send_batch(self, batch: Batch) -> None:
        self.send({"type": "batch", "batch": batch.header()}, batch.payload)

    def close(self) -> None:
        raw = self.sock.sock if isinstance(self.sock, records.RecordSocket) else self.sock
        try:
            socket.socket.shutdown(raw, socket.SHUT_RDWR)  # wakes the reader
        except OSError:
            pass
        # Closing under a reader would let it read the next socket that gets this fd.
        if self.reader.ident is not None:
            self.reader.join(5)
        self.sock.close()


def agent_context(certs: Path, name: str | None = "agent") -> ssl.SSLContext:
    """Client context trusting the deployment's CA, presenting ``name``'s certificate (or none)."""
    ca = str(certs / "ca" / "ca.pem")
    if name is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(ca)
        return context
    return pki.client_context(ca, str(certs / f"{name}.pem"), str(certs / f"{name}.key"))
