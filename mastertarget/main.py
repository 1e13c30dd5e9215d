"""``ferry-master-target`` / ``python -m mastertarget``: apply replicated disks to their targets.

Usage::

    FERRY_STORAGE='<connection string>' python -m mastertarget --config mt.toml [--wait]

Exit status: 0 after a stop request (SIGTERM/SIGINT: the group in hand is
finished first; a second signal exits at once), 2 for bad settings, 6 when a
disk is owned by another master target (without ``--wait``) or its lease was
lost, other non-zero codes for the errors in :mod:`ferry.errors`.
"""

from __future__ import annotations

import argparse

from ferry import segment
from ferry import settings as ferry_settings
from ferry.cli_support import StopFlag, run_main, setup_logging
from mastertarget import service
from mastertarget.settings import Settings

COMPONENT = "master-target"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of the master target."""
    parser = argparse.ArgumentParser(
        prog="ferry-master-target",
        description="Apply replicated disks to their targets, whole consistency groups only.",
    )
    parser.add_argument("--config", required=True, help="settings file (TOML)")
    parser.add_argument(
        "--wait", action="store_true", help="wait for disks owned by another master target"
    )
    parser.add_argument("--verbose", action="store_true", help="log debug messages")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """Load everything that can be wrong before serving, then serve until stopped."""
    config = ferry_settings.load(args.config, Settings)
    connection_string = config.connection_string(args.config)
    key = segment.load_key(config.segment_key_file)
    stop = StopFlag().install()
    return service.serve(config, connection_string, key, stop.event, wait=args.wait)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    setup_logging(COMPONENT, verbose=args.verbose)
    return run_main(COMPONENT, lambda: run(args))
