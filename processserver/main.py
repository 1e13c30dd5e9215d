"""``ferry-process-server``: the process server daemon.

Two ways to run it::

    FERRY_STORAGE=... ferry-process-server --config ps.toml     # settings file (tests, tools)
    ferry-process-server --server-credentials /etc/ferry/process-server.json \
        [--state-dir DIR] [--ca CA --cert CERT --key KEY] [--segment-key-file FILE]

In server mode settings and storage access come from the configuration
server (see :mod:`processserver.managed`).
"""

from __future__ import annotations

import argparse
import logging

from ferry.control import frame
from ferry.errors import ConfigError
from ferry.process import StopFlag
from ferry.storage import Storage
from processserver import defaults
from processserver import settings as ps_settings
from processserver.server import Server, tls_context

log = logging.getLogger("ferry.processserver")

COMPONENT = "process-server"


def open_storage(connection_string: str, env: str, source: str) -> Storage:
    """A storage client; ConfigError (never showing the secret) if the string is malformed."""
    try:
        return Storage(connection_string)
    except ValueError:
        raise ConfigError(path=source, problem=f"environment variable {env} is not a valid "
                          "storage connection string")  # fmt: skip


def serve(config: str, stop: StopFlag) -> int:
    """Run the process server described by the settings file ``config`` until ``stop``."""
    settings = ps_settings.load(config)
    secret = ps_settings.connection_string(settings, config)
    key = settings.sealing_key(config)
    tls = tls_context(settings, config)
    server = Server(settings, open_storage(secret, settings.storage_env, config), tls, key)
    server.start()
    try:
        _wait(stop)
    finally:
        log.info("stopping (a second signal exits at once)")
        server.stop(defaults.STOP_GRACE)
    return 0


def _wait(stop: StopFlag) -> None:
    # Short waits keep the main thread responsive to signals.
    while not stop.wait(1.0):
        pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The process server's command line."""
    parser = frame.daemon_parser(
        "ferry-process-server",
        "Ferry process server",
        from_server="settings, storage access and commands",
    )
    frame.add_state_dir(parser, defaults.STATE_DIR)
    frame.add_tls_files(parser, defaults, ca="CA of the agents", cert="certificate")
    parser.add_argument("--segment-key-file", help="server mode: seal segments with this key")
    frame.add_verbose(parser)
    return parser.parse_args(argv)


def local_settings(args: argparse.Namespace) -> dict[str, str]:
    """What server mode takes from this host; ConfigError if a file cannot be read."""
    return frame.local_paths(
        args.state_dir or defaults.STATE_DIR,
        **frame.tls_files(args, defaults),
        segment_key_file=args.segment_key_file,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ferry-process-server``."""
    args = parse_args(argv)

    def from_file() -> int:
        return serve(args.config, StopFlag().install())

    def from_server() -> int:
        from processserver import managed

        return managed.run(args.server_credentials, local_settings(args), StopFlag().install())

    return frame.run_daemon(COMPONENT, args, from_file, from_server)
