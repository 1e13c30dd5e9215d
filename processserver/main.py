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
import os

from ferry import segment
from ferry.cli_support import StopFlag, run_main, setup_logging
from ferry.errors import ConfigError
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
    key = segment.load_key(settings.segment_key_file)
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
    parser = argparse.ArgumentParser(
        prog="ferry-process-server", description="Ferry process server"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="settings file (TOML)")
    source.add_argument(
        "--server-credentials",
        metavar="FILE",
        help="credentials from `ferry register`: settings, storage access and commands come "
        "from the configuration server",
    )
    parser.add_argument("--state-dir", help=f"server mode: state directory ({defaults.STATE_DIR})")
    parser.add_argument("--ca", help=f"server mode: CA of the agents ({defaults.PKI_CA})")
    parser.add_argument("--cert", help=f"server mode: certificate ({defaults.PKI_CERT})")
    parser.add_argument("--key", help=f"server mode: private key ({defaults.PKI_KEY})")
    parser.add_argument("--segment-key-file", help="server mode: seal segments with this key")
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
    if args.segment_key_file:
        local["segment_key_file"] = args.segment_key_file
    for key in ("ca", "cert", "key", "segment_key_file"):
        if key in local and not os.access(local[key], os.R_OK):
            flag = "--" + key.replace("_", "-")
            raise ConfigError(path="the command line", problem=f"{flag}: cannot read {local[key]}")
    return local


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ferry-process-server``."""
    args = parse_args(argv)
    setup_logging(COMPONENT, args.verbose)

    def from_server() -> int:
        from processserver import managed

        return managed.run(args.server_credentials, local_settings(args), StopFlag().install())

    if args.server_credentials:
        return run_main(COMPONENT, from_server)
    return run_main(COMPONENT, lambda: serve(args.config, StopFlag().install()))
