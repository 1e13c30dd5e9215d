"""The source's side of a cutover: digest each disk, take the final tag, stop the agent for good.

The cutover role calls this on the source instead of knowing the agent's
unit name, pidfile or supervisor::

    python -m agent.fence digest --device /dev/disk/by-id/virtio-data   # {"size", "sha256"}
    python -m agent.fence tag --state-dir /var/lib/ferry/agent --kind app
    python -m agent.fence final --state-dir ... --device D... --freeze / --freeze /boot
    python -m agent.fence stop            # systemd, or ferry-supervise where systemd is not PID 1

Each prints one JSON object.  ``tag`` asks for the *final* tag: the agent
ships nothing after it, and the master target fences each disk once it has
applied it (docs/design.md, the fence).  ``final`` freezes the source's
filesystems, digests each disk, takes the final tag and thaws, all in this
one process: the cutover role cannot freeze in one task and digest in the
next when ``/`` is among them, since every Ansible task writes its module
to the source's ``/`` first and would wait for the thaw forever.
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
from agent.freeze import FreezeFailed, Frozen
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


def final(
    socket_path: str, devices: list[str], points: list[str], timeout: float, limit: float,
    keep_frozen: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Freeze ``points``, digest ``devices``, take the final tag, thaw (unless ``keep_frozen``).

    Nothing here writes to a frozen filesystem (everything is imported, the
    agent's socket exists already).  A watchdog thaws after ``limit`` seconds
    whatever happens, and the result is then refused: the digests would no
    longer describe the final tag.  ``keep_frozen`` still thaws ``/``, which
    the rest of the cutover writes to (the fence record, Ansible's modules).
    """
    freeze = Frozen(points, limit)
    try:
        with freeze:
            digests = [digest(device) for device in devices]
            tag = final_tag(socket_path, "crash" if points else "app", timeout)
            frozen = list(freeze.frozen)
            if keep_frozen:
                freeze.thaw(keep=[p for p in frozen if p != "/"])
    except FreezeFailed as exc:
        raise FenceFailed(detail=str(exc)) from None
    if freeze.fired:
        raise FenceFailed(
            detail=f"the freeze outlived its {limit:.0f} s limit and was thawed: "
            "resume (cutover_action=resume) and cut over again"
        )
    return {"tag": tag, "digests": digests, "frozen": frozen,
            "frozen_s": round(freeze.seconds, 3)}  # fmt: skip


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


def _add_where(p: argparse.ArgumentParser) -> None:
    """Where the agent's control socket is: its state directory, or the socket itself."""
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--state-dir", default=defaults.STATE_DIR,
        help=f"the agent's state directory, where its control socket is ({defaults.STATE_DIR})",
    )  # fmt: skip
    where.add_argument("--socket", help="the agent's control socket, if its settings name one")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m agent.fence", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("digest", help="sha256 of a source disk (and its size)")
    p.add_argument("--device", required=True)
    p.add_argument("--size", type=int)
    p = sub.add_parser("tag", help="take the final tag and wait until it is durable")
    _add_where(p)
    p.add_argument("--kind", choices=["crash", "app"], default="crash")
    p.add_argument("--timeout", type=float, default=defaults.FINAL_TAG_TIMEOUT)
    p = sub.add_parser("final", help="freeze, digest each disk, take the final tag, thaw")
    _add_where(p)
    p.add_argument("--device", action="append", default=[], help="a disk to digest (repeat)")
    p.add_argument("--freeze", action="append", default=[], help="a mount point (repeat)")
    p.add_argument("--timeout", type=float, default=defaults.FINAL_TAG_TIMEOUT)
    p.add_argument("--freeze-limit", type=float, default=defaults.FINAL_FREEZE_LIMIT,
                   help="thaw after this many seconds whatever happens (the watchdog)")  # fmt: skip
    p.add_argument("--keep-frozen", action="store_true", help="leave all but / frozen")
    p = sub.add_parser("stop", help="stop the agent for good")
    p.add_argument("--prefix", default=defaults.PREFIX, help=f"Ferry's prefix ({defaults.PREFIX})")
    p.add_argument(
        "--run-dir", default=defaults.RUN_DIR, help=f"run directory ({defaults.RUN_DIR})"
    )
    return parser


def _socket(args: argparse.Namespace) -> str:
    return args.socket or agentsocket.path_in(args.state_dir)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m agent.fence``: one JSON object on stdout."""
    args = _parser().parse_args(argv)

    def body() -> int:
        if args.command == "digest":
            result = digest(args.device, args.size)
        elif args.command == "tag":
            result = final_tag(_socket(args), args.kind, args.timeout)
        elif args.command == "final":
            result = final(_socket(args), args.device, args.freeze, args.timeout,
                           args.freeze_limit, args.keep_frozen)  # fmt: skip
        else:
            result = stop(args.prefix, args.run_dir)
        print(json.dumps(result))
        return 0

    return run_main("fence", body)


if __name__ == "__main__":
    sys.exit(main())
