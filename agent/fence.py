"""The source's side of a cutover: digest each disk, take the final tag, stop the agent for good.

The cutover role calls this on the source instead of knowing the agent's
unit name, pidfile or supervisor::

    python -m agent.fence digest --device /dev/disk/by-id/virtio-data   # {"size", "sha256"}
    python -m agent.fence tag --state-dir /var/lib/ferry/agent --kind app
    python -m agent.fence stop            # systemd, or ferry-supervise where systemd is not PID 1

Each prints one JSON object.  ``tag`` asks for the *final* tag: the agent
ships nothing after it, and the master target fences each disk once it has
applied it (docs/design.md, the fence).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from typing import Any

from agent import defaults
from ferry import agentsocket
from ferry.diskio import device_size, sha256_of
from ferry.errors import Exit, FerryError, PeerUnavailable
from ferry.process import run_main


class FenceFailed(FerryError):
    """fence: {detail}"""

    exit_code = Exit.CUTOVER


def digest(device: str, size: int | None = None) -> dict[str, Any]:
    """sha256 of a source disk's first ``size`` bytes (all of it by default)."""
    size = size or device_size(device)
    return {"device": device, "size": size, "sha256": sha256_of(device, size)}


def final_tag(socket_path: str, kind: str, timeout: float) -> dict[str, Any]:
    """Take the final tag; return it once it is durable at the process server."""
    request = {"cmd": "tag", "kind": kind, "timeout": timeout, "final": True}
    try:
        answer = agentsocket.call(socket_path, request, timeout + 30)
    except (OSError, ValueError) as exc:
        raise PeerUnavailable(peer=f"agent control socket {socket_path}", problem=str(exc))
    if not answer.get("ok"):
        raise FenceFailed(detail=f"the agent refused the final tag: {answer.get('error')}")
    return answer["tag"]


def under_systemd() -> bool:
    """True where systemd is the service manager (it creates /run/systemd/system at boot)."""
    return os.path.isdir("/run/systemd/system") and shutil.which("systemctl") is not None


def stop(prefix: str = defaults.PREFIX, run_dir: str = defaults.RUN_DIR) -> dict[str, Any]:
    """Stop the agent and keep it from starting again (idempotent)."""
    if under_systemd():
        argv = ["systemctl", "disable", "--now", defaults.UNIT]
    else:
        supervisor = os.path.join(prefix, "bin", "ferry-supervise")
        argv = [sys.executable, supervisor, "stop", "--pidfile", os.path.join(run_dir, "agent.pid")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise FenceFailed(detail=f"{' '.join(argv)} failed: {result.stderr.strip()[-300:]}")
    return {"stopped": True, "by": "systemd" if argv[0] == "systemctl" else "ferry-supervise"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m agent.fence", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("digest", help="sha256 of a source disk (and its size)")
    p.add_argument("--device", required=True)
    p.add_argument("--size", type=int)
    p = sub.add_parser("tag", help="take the final tag and wait until it is durable")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--state-dir", default=defaults.STATE_DIR,
        help=f"the agent's state directory, where its control socket is ({defaults.STATE_DIR})",
    )  # fmt: skip
    where.add_argument("--socket", help="the agent's control socket, if its settings name one")
    p.add_argument("--kind", choices=["crash", "app"], default="crash")
    p.add_argument("--timeout", type=float, default=defaults.FINAL_TAG_TIMEOUT)
    p = sub.add_parser("stop", help="stop the agent for good")
    p.add_argument("--prefix", default=defaults.PREFIX, help=f"Ferry's prefix ({defaults.PREFIX})")
    p.add_argument(
        "--run-dir", default=defaults.RUN_DIR, help=f"run directory ({defaults.RUN_DIR})"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m agent.fence``: one JSON object on stdout."""
    args = _parser().parse_args(argv)

    def body() -> int:
        if args.command == "digest":
            result = digest(args.device, args.size)
        elif args.command == "tag":
            socket_path = args.socket or agentsocket.path_in(args.state_dir)
            result = final_tag(socket_path, args.kind, args.timeout)
        else:
            result = stop(args.prefix, args.run_dir)
        print(json.dumps(result))
        return 0

    return run_main("fence", body)


if __name__ == "__main__":
    sys.exit(main())
