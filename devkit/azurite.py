"""Start and stop Azurite, Microsoft's Azure Storage emulator, for tests, demo and bench.

One helper for all three: free ports are chosen, readiness is awaited over
real HTTP, and the process is stopped on exit (also on Ctrl-C).  Run as a
program it prints the connection string and serves until interrupted::

    python -m devkit.azurite --env-file run/azurite.env
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from azure.storage.blob._shared.parser import DEVSTORE_ACCOUNT_KEY

from ferry.errors import Exit, FerryError

ACCOUNT = "devstoreaccount1"
ROOT = Path(__file__).resolve().parent.parent


class AzuriteError(FerryError):
    """Azurite did not start: {problem}"""

    exit_code = Exit.DEVKIT


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connection_string(blob: int, queue: int, table: int, host: str = "127.0.0.1") -> str:
    """The connection string for Azurite's well-known development account."""
    base = f"http://{host}"
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={DEVSTORE_ACCOUNT_KEY};"
        f"BlobEndpoint={base}:{blob}/{ACCOUNT};QueueEndpoint={base}:{queue}/{ACCOUNT};"
        f"TableEndpoint={base}:{table}/{ACCOUNT};"
    )


def binary() -> str:
    """Path of the Azurite launcher installed by ``npm ci``."""
    local = ROOT / "node_modules" / ".bin" / "azurite"
    if local.exists():
        return str(local)
    found = shutil.which("azurite")
    if not found:
        raise AzuriteError(problem="not installed; run `npm ci` in the repository")
    return found


class Azurite:
    """A running Azurite; use as a context manager."""

    def __init__(self, location: str | None = None, log: str | None = None) -> None:
        self.location = location
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.ports = (free_port(), free_port(), free_port())
        self._tmp: str | None = None

    @property
    def connection_string(self) -> str:
        """Connection string for this instance."""
        return connection_string(*self.ports)

    def start(self, timeout: float = 60.0) -> Azurite:
        """Launch Azurite and wait until its blob and queue services answer."""
        blob, queue, table = self.ports
        args = [
            binary(), "--silent", "--skipApiVersionCheck", "--disableTelemetry", "--loose",
            "--blobHost", "127.0.0.1", "--blobPort", str(blob),
            "--queueHost", "127.0.0.1", "--queuePort", str(queue),
            "--tableHost", "127.0.0.1", "--tablePort", str(table),
        ]  # fmt: skip
        if self.location:
            args += ["--location", self.location]
        else:
            self._tmp = tempfile.mkdtemp(prefix="ferry-azurite-")
            args += ["--inMemoryPersistence", "--location", self._tmp]
            args.remove("--location")
            args.remove(self._tmp)
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, cwd=self._tmp or self.location,
            start_new_session=True,
        )  # fmt: skip
        self._await(timeout)
        return self

    def _await(self, timeout: float) -> None:
        from ferry.storage import Storage

        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise AzuriteError(problem=f"exited with status {self.proc.returncode}")
            try:
                for port in self.ports:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                storage = Storage(self.connection_string)
                storage.blobs.get_service_properties()
                storage.queues.get_service_properties()
                return
            except Exception as exc:  # any failure means "not yet"
                last = type(exc).__name__
            time.sleep(0.2)
        self.stop()
        raise AzuriteError(problem=f"not ready after {timeout:.0f} s ({last})")

    def stop(self) -> None:
        """Stop Azurite and remove its temporary files."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Serve Azurite until interrupted, writing its connection string to a file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-file", help="write FERRY_STORAGE=<connection string> here")
    parser.add_argument("--location", help="persist data in this folder (default: memory)")
    args = parser.parse_args(argv)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    with Azurite(location=args.location) as azurite:
        if args.env_file:
            Path(args.env_file).write_text(f"FERRY_STORAGE='{azurite.connection_string}'\n")
        print(azurite.connection_string, flush=True)
        try:
            while not stop["now"] and azurite.proc is not None and azurite.proc.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
