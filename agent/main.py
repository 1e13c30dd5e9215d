"""``ferry-agent``: the mobility agent daemon."""

from __future__ import annotations

import argparse
import logging
import os
import threading
from pathlib import Path

from agent import defaults
from agent.control import ControlServer
from agent.replicator import DiskState, Replicator
from agent.settings import Settings
from agent.shipper import Shipper
from agent.tracker import DiskTrack, choose
from ferry import settings as ferry_settings
from ferry.blockio import DirectReader, is_block_device
from ferry.cli_support import StopFlag, run_main, setup_logging
from ferry.durable import write_json
from ferry.errors import ConfigError, DeviceError

log = logging.getLogger("ferry.agent")


def find_mountpoint(device: str) -> str | None:
    """The mount point of the filesystem on ``device`` (per /proc/self/mountinfo), if any."""
    if not is_block_device(device):
        return None
    rdev = os.stat(device).st_rdev
    wanted = f"{os.major(rdev)}:{os.minor(rdev)}"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 4 and fields[2] == wanted:
            return fields[4].replace("\\040", " ")
    return None


def open_disks(settings: Settings) -> list[DiskState]:
    """Check every disk and build its state; DeviceError names the first bad one."""
    states = []
    for disk in settings.disks:
        if not os.path.exists(disk.device):
            raise DeviceError(device=disk.device, problem="no such device or file")
        reader = DirectReader(disk.device, settings.block_size)
        size = reader.size
        reader.close()
        if size == 0:
            raise DeviceError(device=disk.device, problem="it is empty (0 bytes)")
        track = DiskTrack(disk.id, disk.device, size, settings.block_size)
        states.append(DiskState(track, disk.mountpoint or find_mountpoint(disk.device)))
    return states


def serve(settings: Settings, stop: StopFlag) -> int:
    """Run the agent until ``stop`` is set."""
    state_dir = Path(settings.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    disks = open_disks(settings)
    tracker = choose(
        settings.tracker,
        [d.track for d in disks],
        defaults.TRACEFS,
        f"ferry-{settings.machine}-{os.getpid()}",
        settings.trace_buffer_kb,
    )
    log.info("tracking %s with %s", ", ".join(d.id for d in disks), tracker.description)
    shipper = Shipper(
        settings.address,
        settings.server_name or settings.address[0],
        settings.ca,
        settings.cert,
        settings.key,
        {"tenant": settings.tenant, "machine": settings.machine, "disks": [d.id for d in disks]},
        settings.window,
    )
    replicator = Replicator(settings, tracker, shipper, disks)
    control = ControlServer(settings.control_socket or str(state_dir / "agent.sock"), replicator)
    worker = threading.Thread(target=replicator.run, name="replicator", daemon=True)
    try:
        shipper.start()
        control.start()
        worker.start()
        while not stop.wait(defaults.STATUS_INTERVAL) and worker.is_alive():
            write_json(state_dir / "status.json", replicator.status(), durable=False)
    finally:
        replicator.stop.set()
        worker.join(timeout=30)
        control.close()
        shipper.close()
        tracker.close()
        write_json(state_dir / "status.json", replicator.status(), durable=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ferry-agent``."""
    parser = argparse.ArgumentParser(prog="ferry-agent", description="Ferry mobility agent")
    parser.add_argument("--config", required=True, help="settings file (TOML)")
    parser.add_argument("--verbose", action="store_true", help="log debug messages")
    args = parser.parse_args(argv)
    setup_logging("agent", args.verbose)

    def body() -> int:
        settings = ferry_settings.load(args.config, Settings)
        for path in (settings.ca, settings.cert, settings.key):
            if not os.path.exists(path):
                raise ConfigError(path=args.config, problem=f"file {path} does not exist")
        return serve(settings, StopFlag().install())

    return run_main("agent", body)
