"""``ferry-master-target`` / ``python -m mastertarget``: apply replicated disks to their targets.

Usage::

    FERRY_STORAGE='<connection string>' python -m mastertarget --config mt.toml [--wait]
    python -m mastertarget --server-credentials /etc/ferry/master-target.json \
        [--state-dir DIR] [--targets-dir DIR] [--segment-key-file FILE]

With ``--server-credentials`` the disks, the storage access and the
commands come from the configuration server (see :mod:`mastertarget.managed`).

Exit status: 0 after a stop request (SIGTERM/SIGINT: the group in hand is
finished first; a second signal exits at once), 2 for bad settings, 6 when a
disk is owned by another master target (without ``--wait``) or its lease was
lost, other non-zero codes for the errors in :mod:`ferry.errors`.
"""

from __future__ import annotations

import argparse

from ferry import settings as ferry_settings
from ferry.control import frame
from ferry.errors import ConfigError
from ferry.process import StopFlag
from mastertarget import defaults, service
from mastertarget.settings import Settings

COMPONENT = "master-target"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of the master target."""
    parser = frame.daemon_parser(
        "ferry-master-target",
        "Apply replicated disks to their targets, whole consistency groups only.",
        from_server="disks, storage access and commands",
    )
    parser.add_argument(
        "--wait", action="store_true", help="wait for disks owned by another master target"
    )
    frame.add_state_dir(parser, defaults.STATE_DIR)
    parser.add_argument(
        "--targets-dir",
        help="server mode: image files of disks given no target (STATE_DIR/targets)",
    )
    parser.add_argument(
        "--segment-key-file", help="server mode: open sealed segments with this key"
    )
    frame.add_verbose(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """Load everything that can be wrong before serving, then serve until stopped."""
    config = ferry_settings.load(args.config, Settings)
    connection_string = config.connection_string(args.config)
    keys = config.keyring()
    if not keys and not config.allow_unsealed:
        raise ConfigError(path=args.config, problem="no segment key: set segment_key_file (or "
                          "allow_unsealed = true to accept unauthenticated segments)")  # fmt: skip
    stop = StopFlag().install()
    return service.serve(config, connection_string, keys, stop.event, wait=args.wait)


def run_from_server(args: argparse.Namespace) -> int:
    """Server mode: everything but local paths from the configuration server."""
    from mastertarget import managed

    local = frame.local_paths(
        args.state_dir or defaults.STATE_DIR, segment_key_file=args.segment_key_file
    )
    stop = StopFlag().install()
    return managed.run(args.server_credentials, local, args.targets_dir, stop)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    return frame.run_daemon(COMPONENT, args, lambda: run(args), lambda: run_from_server(args))
