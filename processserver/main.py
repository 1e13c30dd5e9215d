"""``ferry-process-server``: the process server daemon."""

from __future__ import annotations

import argparse
import logging

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


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ferry-process-server``."""
    parser = argparse.ArgumentParser(
        prog="ferry-process-server", description="Ferry process server"
    )
    parser.add_argument("--config", required=True, help="settings file (TOML)")
    parser.add_argument("--verbose", action="store_true", help="log debug messages")
    args = parser.parse_args(argv)
    setup_logging(COMPONENT, args.verbose)
    return run_main(COMPONENT, lambda: serve(args.config, StopFlag().install()))
