"""``make test``: the whole suite, with the lab's tests in a session of their own beside the rest.

    python -m devkit.suite [PYTEST_ARGS...]

With no arguments, two pytest sessions run at once: the ``qemu`` tests (the
lab guest under TCG: one emulated CPU, most of their time spent waiting for
it) and every other test. Run one after the other they take the sum of
their times; side by side, about the longer of the two (docs/lab.md has the
figures). The lab session's output goes to ``run/test-lab.log``; once the
rest has finished it is printed, and followed until the lab's tests end.
The exit status is the first failure's. With arguments (a developer's selection), one session runs them
as given.

Two sessions may share the machine: each tells its own loop devices, tracefs
instances and processes from the other's (tests/support/leaks.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAB_LOG = ROOT / "run" / "test-lab.log"
"""Where the lab session's output goes while the rest of the suite prints to the terminal."""


def pytest(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pytest", *args], cwd=ROOT, **kwargs)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args:
        return pytest(*args).wait()
    LAB_LOG.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"the lab's tests (pytest -m qemu) run beside the rest; their output: {LAB_LOG}")
    with open(LAB_LOG, "w") as log:
        lab = pytest("-m", "qemu", "-p", "no:cacheprovider", stdout=log, stderr=subprocess.STDOUT)
        try:
            rest = pytest("-m", "not qemu").wait()
            print(f"\n{'=' * 20} the lab's tests ({LAB_LOG}), the rest done after "
                  f"{time.monotonic() - started:.0f} s {'=' * 20}", flush=True)  # fmt: skip
            follow(lab)
            status = lab.wait()
        finally:
            if lab.poll() is None:  # interrupted: the lab's session stops with this one,
                lab.send_signal(signal.SIGINT)  # its fixtures power the guest off
                try:
                    lab.wait(120)
                except subprocess.TimeoutExpired:
                    lab.kill()
    print(f"\nboth sessions: {time.monotonic() - started:.0f} s; the rest exited {rest}, "
          f"the lab's tests {status}")  # fmt: skip
    return rest or status


def follow(lab: subprocess.Popen) -> None:
    """Print the lab session's output so far, then as it comes, until the session ends."""
    with open(LAB_LOG, errors="replace") as log:
        while True:
            ended = lab.poll() is not None
            sys.stdout.write(log.read())
            sys.stdout.flush()
            if ended:
                return
            time.sleep(2)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
