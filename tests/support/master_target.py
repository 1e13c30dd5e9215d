"""The master target as a process: ``python -m mastertarget``, its stderr in a file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from support import ROOT, wait_for


class MasterTarget:
    """A master target process, its stderr in a file."""

    def __init__(self, config: Path, connection_string: str, log: Path, *args: str) -> None:
        self.log = log
        env = dict(os.environ, FERRY_STORAGE=connection_string)
        cmd = [sys.executable, "-m", "mastertarget", "--config", str(config), *args]
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=err)

    def output(self) -> str:
        return self.log.read_text()

    def wait_for_log(self, text: str, timeout: float = 30) -> None:
        wait_for(lambda: text in self.output(), timeout, lambda: f"{text!r} in\n{self.output()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
