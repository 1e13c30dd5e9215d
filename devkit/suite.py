"""``make test``: the whole suite, with the lab's tests in a session of their own beside the rest.

    python -m devkit.suite [PYTEST_ARGS...]

With no arguments, two chains of pytest sessions run at once. One is the
``qemu`` tests (the lab guest under TCG: one emulated CPU, most of their
time spent waiting for it), then the modules in :data:`BESIDE_LAB`; the
other is every other test. Run one after the other they take the sum of
their times; side by side, about the longer of the two (docs/lab.md has the
figures), which :data:`BESIDE_LAB` keeps close to each other. The lab
chain's output goes to ``run/test-lab.log``; once the rest has finished it
is printed, and followed until the chain ends. The exit status is the first
failure's. With arguments (a developer's selection), one session runs them
as given.

Two sessions may share the machine: each tells its own loop devices, tracefs
instances and processes from the other's (tests/support/leaks.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAB_LOG = ROOT / "run" / "test-lab.log"
"""Where the lab chain's output goes while the rest of the suite prints to the terminal."""
BESIDE_LAB = ("tests/test_end_to_end.py", "tests/test_packaging.py")
"""Modules run after the lab's tests, in their chain, to even out the two chains' times.

Measured in CI's run of 2026-12-03 (the README's command, the two chains side by side):
the lab's tests 1,019 s, the rest 1,450 s, of which these two modules took 196 s."""


def pytest(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pytest", *args], cwd=ROOT, **kwargs)


class LabChain(threading.Thread):
    """The lab's tests, then :data:`BESIDE_LAB`, one session after the other, into ``log``."""

    def __init__(self, log) -> None:
        super().__init__(daemon=True)
        self.log = log
        self.session: subprocess.Popen | None = None
        self.status: int | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        statuses = []
        for args in (("-m", "qemu"), ("-m", "not qemu", *BESIDE_LAB)):
            if self.stopping.is_set():
                break
            self.session = pytest(*args, "-p", "no:cacheprovider",
                                  stdout=self.log, stderr=subprocess.STDOUT)  # fmt: skip
            if self.stopping.is_set():  # stop() came while this session was starting
                self.session.send_signal(signal.SIGINT)
            statuses.append(self.session.wait())
        self.status = next((s for s in statuses if s), 0) if statuses else 1

    def stop(self) -> None:
        """Interrupted: the session running stops with this one (its fixtures power the guest off)."""
        self.stopping.set()
        session = self.session
        if session is not None and session.poll() is None:
            session.send_signal(signal.SIGINT)
            try:
                session.wait(120)
            except subprocess.TimeoutExpired:
                session.kill()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args:
        return pytest(*args).wait()
    LAB_LOG.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"the lab's tests (pytest -m qemu), then {', '.join(BESIDE_LAB)}, run beside the "
          f"rest; their output: {LAB_LOG}")  # fmt: skip
    with open(LAB_LOG, "w") as log:
        lab = LabChain(log)
        lab.start()
        try:
            ignored = [f"--ignore={module}" for module in BESIDE_LAB]
            rest = pytest("-m", "not qemu", *ignored).wait()
            print(f"\n{'=' * 20} the lab's chain ({LAB_LOG}), the rest done after "
                  f"{time.monotonic() - started:.0f} s {'=' * 20}", flush=True)  # fmt: skip
            follow(lab)
        finally:
            if lab.is_alive():
                lab.stop()
                lab.join(150)
    status = 1 if lab.status is None else lab.status
    print(f"\nboth chains: {time.monotonic() - started:.0f} s; the rest exited {rest}, "
          f"the lab's chain {status}")  # fmt: skip
    return rest or status


def follow(lab: LabChain) -> None:
    """Print the lab chain's output so far, then as it comes, until the chain ends."""
    with open(LAB_LOG, errors="replace") as log:
        while True:
            ended = not lab.is_alive()
            sys.stdout.write(log.read())
            sys.stdout.flush()
            if ended:
                return
            time.sleep(2)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
