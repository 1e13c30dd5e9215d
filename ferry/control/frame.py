"""The daemons' command-line frame.

The three daemons share it: settings from ``--config`` or, exclusively,
``--server-credentials``; in server mode the local paths (``--state-dir``, TLS
files, segment key), the files checked readable before anything starts;
``--verbose``; and the run under :func:`ferry.process.run_main`.  Each
daemon's own options stay in its ``main.py``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from types import ModuleType

from ferry import memory
from ferry.errors import ConfigError
from ferry.process import run_main, setup_logging


def daemon_parser(prog: str, description: str, from_server: str) -> argparse.ArgumentParser:
    """A daemon's parser, requiring ``--config`` or ``--server-credentials`` (not both).

    ``from_server`` says what server mode gets from the configuration server
    ("settings and commands").
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="settings file (TOML)")
    source.add_argument(
        "--server-credentials",
        metavar="FILE",
        help=f"credentials from `ferry register`: {from_server} come from the configuration server",
    )
    return parser


def add_state_dir(parser: argparse.ArgumentParser, default: str) -> None:
    """Add ``--state-dir``, showing the component's default in the help."""
    parser.add_argument("--state-dir", help=f"server mode: state directory ({default})")


def add_tls_files(
    parser: argparse.ArgumentParser, defaults: ModuleType, *, ca: str, cert: str
) -> None:
    """Add ``--ca``, ``--cert`` and ``--key``; ``ca`` and ``cert`` say whose they are.

    ``defaults`` is the component's defaults module (``PKI_CA``, ``PKI_CERT``,
    ``PKI_KEY``), shown in the help.
    """
    parser.add_argument("--ca", help=f"server mode: {ca} ({defaults.PKI_CA})")
    parser.add_argument("--cert", help=f"server mode: {cert} ({defaults.PKI_CERT})")
    parser.add_argument("--key", help=f"server mode: private key ({defaults.PKI_KEY})")


def add_verbose(parser: argparse.ArgumentParser) -> None:
    """Add ``--verbose``; by habit the last option of a daemon."""
    parser.add_argument("--verbose", action="store_true", help="log debug messages")


def tls_files(args: argparse.Namespace, defaults: ModuleType) -> dict[str, str]:
    """``--ca``, ``--cert`` and ``--key`` as given, else the component's defaults."""
    return {
        "ca": args.ca or defaults.PKI_CA,
        "cert": args.cert or defaults.PKI_CERT,
        "key": args.key or defaults.PKI_KEY,
    }


def local_paths(state_dir: str, **files: str | None) -> dict[str, str]:
    """What server mode takes from this host: ``state_dir`` and each file given (non-empty).

    ConfigError names the option (``segment_key_file`` is ``--segment-key-file``)
    of the first file that cannot be read.
    """
    local = {"state_dir": state_dir}
    for key, path in files.items():
        if not path:
            continue
        if not os.access(path, os.R_OK):
            flag = "--" + key.replace("_", "-")
            raise ConfigError(path="the command line", problem=f"{flag}: cannot read {path}")
        local[key] = path
    return local


def run_daemon(
    component: str,
    args: argparse.Namespace,
    from_file: Callable[[], int | None],
    from_server: Callable[[], int | None],
) -> int:
    """Set up logging, then run the mode ``args`` chose under :func:`run_main`."""
    memory.tune()  # before any thread (ferry.memory)
    setup_logging(component, args.verbose)
    return run_main(component, from_server if args.server_credentials else from_file)
