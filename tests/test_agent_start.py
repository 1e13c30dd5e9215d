"""What the agent tidies at start: trace instances of agents killed and forgotten.

A real agent process, a real loop device and real tracefs instances.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from support import wait_for

from devkit.azurite import free_port

pytestmark = [pytest.mark.root, pytest.mark.tracefs]

ROOT = Path(__file__).resolve().parent.parent
INSTANCES = Path("/sys/kernel/tracing/instances")


def dead_pid() -> int:
    """The pid of a process that has exited (so no process has it now)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert not Path(f"/proc/{proc.pid}").exists()
    return proc.pid


def remove(instance: Path) -> None:
    if instance.is_dir():
        (instance / "tracing_on").write_text("0")
        instance.rmdir()


def test_an_agent_removes_only_the_instances_of_agents_that_are_gone(tmp_path, loopdisk, certs):
    tag = uuid.uuid4().hex[:8]
    # An agent killed with SIGKILL whose state directory then went: nobody adopts this one.
    killed = INSTANCES / f"ferry-k{tag}-{dead_pid()}"
    # A running agent's (its own pid) and one a running agent adopted under the
    # pid of the predecessor that made it: both are read, neither may go.
    sleeper = subprocess.Popen(["sleep", "600"])
    running = INSTANCES / f"ferry-r{tag}-{sleeper.pid}"
    adopted = INSTANCES / f"ferry-a{tag}-{dead_pid()}"
    reader = None
    agent = None
    state = tmp_path / "state"
    try:
        for instance in (killed, running, adopted):
            instance.mkdir()
            (instance / "tracing_on").write_text("1")
        reader = os.open(adopted / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
        disk = loopdisk(64 << 20, fs=False)
        config = tmp_path / "agent.toml"
        config.write_text(
            f'tenant = "demo"\nmachine = "s{tag}"\nprocess_server = "127.0.0.1:{free_port()}"\n'
            f'server_name = "localhost"\nca = "{certs}/ca/ca.pem"\ncert = "{certs}/agent.pem"\n'
            f'key = "{certs}/agent.key"\nstate_dir = "{state}"\ntracker = "tracefs"\n'
            f'[[disks]]\nid = "s{tag}-disk0"\ndevice = "{disk.device}"\n'
        )
        log = open(tmp_path / "agent.log", "wb")  # noqa: SIM115 - the agent writes it until killed
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent", "--config", str(config)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=log,
        )  # fmt: skip
        mine = INSTANCES / f"ferry-s{tag}-{agent.pid}"
        wait_for(lambda: mine.is_dir() or agent.poll() is not None, 120, "the agent's own instance")
        said = (tmp_path / "agent.log").read_text()
        assert agent.poll() is None, said
        assert not killed.exists(), said
        assert f"removed trace instance {killed.name}: its agent" in said
        assert running.is_dir() and (running / "tracing_on").read_text().strip() == "1"
        # Still there and still recording: nothing was written into it first.
        assert adopted.is_dir() and (adopted / "tracing_on").read_text().strip() == "1"
    finally:
        if agent is not None:
            agent.send_signal(signal.SIGKILL)
            agent.wait(30)
        if reader is not None:
            os.close(reader)
        sleeper.kill()
        sleeper.wait()
        time.sleep(0.1)
        for instance in (killed, running, adopted, *INSTANCES.glob(f"ferry-s{tag}-*")):
            remove(instance)
