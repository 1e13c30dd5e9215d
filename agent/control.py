"""The agent's local control socket, served.

The requests and answers (JSON lines: ``status``, ``tag`` with ``final``)
are the protocol that ``ferry/agentsocket.py`` owns and documents; this
module only answers them for one replicator.
"""

from __future__ import annotations

import json
import os
import socketserver
import threading
from typing import Any

from agent.replicator import Replicator, TagFailed
from ferry import agentsocket


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            try:
                request = json.loads(line)
                answer = self.server.dispatch(request)  # type: ignore[attr-defined]  # a ControlServer
            except (ValueError, TypeError, KeyError) as exc:
                answer = {"ok": False, "error": f"bad request: {exc}"}
            self.wfile.write(agentsocket.encode(answer))
            self.wfile.flush()


class ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Serves status and tag requests for one replicator."""

    daemon_threads = True

    def __init__(self, path: str, replicator: Replicator) -> None:
        if os.path.exists(path):
            os.unlink(path)
        super().__init__(path, _Handler)
        os.chmod(path, 0o600)
        self.path = path
        self.replicator = replicator
        self.thread = threading.Thread(target=self.serve_forever, name="control", daemon=True)

    def start(self) -> None:
        """Serve in a background thread."""
        self.thread.start()

    def close(self) -> None:
        """Stop serving and remove the socket file."""
        self.shutdown()
        self.server_close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer one request."""
        cmd = request.get("cmd")
        if cmd == "status":
            return {"ok": True, "status": self.replicator.status()}
        if cmd == "tag":
            return self._tag(
                request.get("kind", "crash"),
                float(request.get("timeout", 120)),
                bool(request.get("final", False)),
            )
        if cmd == "verify":  # online verify (agent.verify); results are the master target's
            try:
                started = self.replicator.start_verify(
                    request.get("disks"), repair=bool(request.get("repair", False))
                )
            except TagFailed as exc:
                return {"ok": False, "error": str(exc.fields.get("problem", exc))}
            return {"ok": True, **started}
        if cmd == "repair":
            try:
                n = self.replicator.repair_blocks(str(request["disk"]), request["blocks"])
            except TagFailed as exc:
                return {"ok": False, "error": str(exc.fields.get("problem", exc))}
            return {"ok": True, "blocks": n}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def _tag(self, kind: str, timeout: float, final: bool = False) -> dict[str, Any]:
        try:
            return {"ok": True, "tag": self.replicator.tag(kind, timeout, final=final)}
        except TagFailed as exc:
            return {"ok": False, "error": _legacy_message(exc)}


def _legacy_message(exc: TagFailed) -> str:
    """The error texts this socket has always answered (scripts may match them)."""
    problem = str(exc.fields.get("problem", exc))
    if problem.startswith("none within"):
        return f"no tag within {problem.removeprefix('none within ')}"
    return problem
