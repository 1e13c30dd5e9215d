"""Serve the portal: ``python -m portal --server URL [--ca F] [--host H] [--port P] [--tls-cert C --tls-key K]``."""

from __future__ import annotations

import argparse
import sys

import uvicorn

from ferry.errors import UsageError
from ferry.process import run_main, setup_logging
from portal import defaults, settings
from portal.app import create_app


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m portal", description=__doc__.splitlines()[0])
    parser.add_argument("--server", help="configuration server URL (or FERRY_SERVER)")
    parser.add_argument("--ca", help="CA file to trust for the server (or FERRY_CA)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=defaults.PORT, help="port to listen on")
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", help="private key of --tls-cert (PEM)")
    parser.add_argument(
        "--proxy-headers", action="store_true",
        help="take the client's address and scheme from X-Forwarded-* (only behind a proxy "
        "that sets them, such as App Service's front ends: FORWARDED_ALLOW_IPS names them)",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    setup_logging("portal")

    def body() -> int:
        if bool(args.tls_cert) != bool(args.tls_key):
            raise UsageError(detail="--tls-cert and --tls-key go together")
        app = create_app(settings.from_environment(args.server, args.ca))
        tls = {"ssl_certfile": args.tls_cert, "ssl_keyfile": args.tls_key} if args.tls_cert else {}
        # Forwarded headers are trusted only when asked: the sign-in limit counts by address.
        uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                    proxy_headers=args.proxy_headers, server_header=False, **tls)  # fmt: skip
        return 0

    return run_main("portal", body)


if __name__ == "__main__":
    sys.exit(main())
