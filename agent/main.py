"""``ferry-agent``: the mobility agent daemon.

Two ways to run it::

    ferry-agent --config agent.toml                 # settings from a TOML file (tests, tools)
    ferry-agent --server-credentials /etc/ferry/agent.json [--state-dir DIR]
                [--ca CA --cert CERT --key KEY]     # settings and work from the configuration server

In server mode the certificate paths and the state directory are the only
local settings (see :mod:`agent.managed`).
"""

from __future__ import annotations

import argparse
import logging
import os

from agent import defaults
from agent.session import Session
from agent.settings import Settings
from ferry import settings as ferry_settings
from ferry.cli_support import StopFlag, run_main, setup_logging
from ferry.errors import ConfigError

log = logging.getLogger("ferry.agent")


def serve(settings: Settings, stop: StopFlag) -> int:
    """Run the agent until ``stop`` is set."""
    session = Session(settings)
    try:
        session.start()
        while not stop.wait(defaults.STATUS_INTERVAL) and session.alive:
            session.write_status()
    finally:
        session.close()
    if not stop.stopping:
        # The replicator died (its traceback is above): exit non-zero so a
        # supervisor restarts the agent, which then resyncs.
        log.error("replication stopped unexpectedly; exiting")
        return 1
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The agent's command line."""
    parser = argparse.ArgumentParser(prog="ferry-agent", description="Ferry mobility agent")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="settings file (TOML)")
    source.add_argument(
        "--server-credentials",
        metavar="FILE",
        help="credentials from `ferry register`: settings and commands come from the "
        "configuration server",
    )
    parser.add_argument("--state-dir", help=f"server mode: state directory ({defaults.STATE_DIR})")
    parser.add_argument("--ca", help=f"server mode: CA of the process server ({defaults.PKI_CA})")
    parser.add_argument("--cert", help=f"server mode: client certificate ({defaults.PKI_CERT})")
    parser.add_argument("--key", help=f"server mode: private key ({defaults.PKI_KEY})")
    parser.add_argument("--verbose", action="store_true", help="log debug messages")
    return parser.parse_args(argv)


def local_settings(args: argparse.Namespace) -> dict[str, str]:
    """What server mode takes from this host; ConfigError if a file cannot be read."""
    local = {
        "state_dir": args.state_dir or defaults.STATE_DIR,
        "ca": args.ca or defaults.PKI_CA,
        "cert": args.cert or defaults.PKI_CERT,
        "key": args.key or defaults.PKI_KEY,
    }
    for key in ("ca", "cert", "key"):
        if not os.access(local[key], os.R_OK):
            raise ConfigError(path="the command line", problem=f"--{key}: cannot read {local[key]}")
    return local


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ferry-agent``."""
    args = parse_args(argv)
    setup_logging("agent", args.verbose)

    def from_file() -> int:
        settings = ferry_settings.load(args.config, Settings)
        for path in (settings.ca, settings.cert, settings.key):
            if not os.path.exists(path):
                raise ConfigError(path=args.config, problem=f"file {path} does not exist")
        return serve(settings, StopFlag().install())

    def from_server() -> int:
        from agent import managed

        return managed.run(args.server_credentials, local_settings(args), StopFlag().install())

    return run_main("agent", from_server if args.server_credentials else from_file)
