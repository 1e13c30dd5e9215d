"""A connected pair of TLS sockets over loopback TCP with the deployment's mutual TLS."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

from ferry import pki


def loopback_pair(
    certs: Path, server_max: ssl.TLSVersion | None = None
) -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    """(agent's end, process server's end), handshake done; ``server_max`` caps the
    version the server accepts (TLS 1.3 otherwise)."""
    ca = str(certs / "ca" / "ca.pem")
    server_ctx = pki.server_context(
        ca, str(certs / "process-server.pem"), str(certs / "process-server.key")
    )
    if server_max is not None:
        server_ctx.maximum_version = server_max
    client_ctx = pki.client_context(ca, str(certs / "agent.pem"), str(certs / "agent.key"))
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[ssl.SSLSocket] = []

    def accept() -> None:
        raw, _ = listener.accept()
        accepted.append(server_ctx.wrap_socket(raw, server_side=True))

    thread = threading.Thread(target=accept)
    thread.start()
    client = client_ctx.wrap_socket(
        socket.create_connection(listener.getsockname()), server_hostname="localhost"
    )
    thread.join(10)
    listener.close()
    return client, accepted[0]
