"""The agent's control-socket protocol: JSON lines over a Unix socket.

One owner for both sides: the agent serves it (agent/control.py), the
``ferry`` CLI, the cutover's source side (agent/fence.py) and the
development kit call it through :func:`call`.

Requests and answers, one JSON object per line::

    {"cmd": "status"}                       -> {"ok": true, "status": {...}}
    {"cmd": "tag", "kind": "crash"|"app",
     "timeout": 120, "final": false}        -> {"ok": true, "tag": {...}} once the tagged
                                               batches are durable at the process server
    {"cmd": "verify", "disks": [...]|null,
     "repair": false}                       -> {"ok": true, "verify_id", "disks"} once started
                                               (the master target reports the differences)
    {"cmd": "repair", "disk": "...",
     "blocks": [[first, count], ...]}       -> {"ok": true, "blocks": n}: shipped again

``"final": true`` makes it a cutover's last tag: the agent ships nothing
more, and the master target fences each disk once it has applied it.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

SOCKET_NAME = "agent.sock"
"""The socket's name in the agent's state directory, unless its settings name another."""


def path_in(state_dir: str | Path) -> str:
    """The control socket of the agent whose state directory is ``state_dir``."""
    return str(Path(state_dir) / SOCKET_NAME)


def call(path: str, request: dict[str, Any], timeout: float = 180.0) -> dict[str, Any]:
    """Send one request to an agent's control socket and return its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(encode(request))
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def encode(message: dict[str, Any]) -> bytes:
    """One request or answer as a line."""
    return json.dumps(message).encode() + b"\n"
