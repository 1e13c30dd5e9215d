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
from ferry.control import frame
from ferry.errors import ConfigError, Exit
from ferry.process import StopFlag

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
        return Exit.BUG
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The agent's command line."""
    parser = frame.daemon_parser(
        "ferry-agent", "Ferry mobility agent", from_server="settings and commands"
    )
    frame.add_state_dir(parser, defaults.STATE_DIR)
    frame.add_tls_files(parser, defaults, ca="CA of the process server", cert="client certificate")
    local = parser.add_argument_group("server mode, set only on this host")
    local.add_argument("--control-socket", help="the agent's control socket (its own default)")
    local.add_argument("--pre-hook", help="shell line run as root before an app-consistent tag")
    local.add_argument("--post-hook", help="shell line run as root after it")
    frame.add_verbose(parser)
    return parser.parse_args(argv)


def local_settings(args: argparse.Namespace) -> dict[str, str]:
    """What server mode takes from this host; ConfigError if a file cannot be read."""
    local = frame.local_paths(
        args.state_dir or defaults.STATE_DIR, **frame.tls_files(args, defaults)
    )
    for key in sorted(Settings.LOCAL_ONLY):
        if getattr(args, key, None):
            local[key] = getattr(args, key)
    return local


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ferry-agent``."""
    args = parse_args(argv)

    def from_file() -> int:
        settings = ferry_settings.load(args.config, Settings)
        for path in (settings.ca, settings.cert, settings.key):
            if not os.path.exists(path):
                raise ConfigError(path=args.config, problem=f"file {path} does not exist")
        return serve(settings, StopFlag().install())

    def from_server() -> int:
        from agent import managed

        return managed.run(args.server_credentials, local_settings(args), StopFlag().install())

    return frame.run_daemon("agent", args, from_file, from_server)
