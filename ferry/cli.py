"""``ferry``: the operator's command line.

Until the configuration server exists (see the issues), it talks to the
local daemons directly: the agent's control socket and the status files the
daemons write.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ferry import pki
from ferry.cli_support import run_main
from ferry.errors import PeerUnavailable, UsageError

MiB = 1 << 20


def _agent_call(socket_path: str, request: dict[str, Any], timeout: float = 180) -> dict[str, Any]:
    from agent.control import call

    try:
        answer = call(socket_path, request, timeout)
    except (OSError, ValueError) as exc:
        raise PeerUnavailable(peer=f"agent control socket {socket_path}", problem=str(exc))
    if not answer.get("ok"):
        raise UsageError(detail=f"agent refused: {answer.get('error')}")
    return answer


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / MiB:.1f} MiB" if n < 1 << 30 else f"{n / (1 << 30):.2f} GiB"


def agent_table(status: dict[str, Any]) -> str:
    """A table a person can read, one row per disk."""
    rows = [("DISK", "PHASE", "GEN", "TO GO", "SHIPPED", "BACKLOG", "LAST TAG", "TAG AGE")]
    now = time.time()
    for d in status.get("disks", []):
        tag = d.get("last_tag") or {}
        age = f"{now - tag['t0_wall']:.1f} s" if tag.get("t0_wall") else "-"
        rows.append(
            (
                d["disk"],
                d["phase"],
                str(d.get("gen") or "-"),
                _fmt_bytes(d.get("bytes_to_go")),
                _fmt_bytes(d.get("bytes_shipped")),
                str(d.get("backlog_batches", 0)),
                tag.get("id", "-"),
                age,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    head = (
        f"tracker: {status.get('tracker_description', status.get('tracker'))}; "
        f"process server {'connected' if status.get('connected') else 'NOT connected'}"
        f"{': ' + status['last_error'] if status.get('last_error') else ''}"
    )
    return head + "\n" + "\n".join(lines)


def cmd_agent_status(args: argparse.Namespace) -> int:
    status = _agent_call(args.socket, {"cmd": "status"}, 10)["status"]
    print(json.dumps(status, indent=1) if args.json else agent_table(status))
    return 0


def cmd_agent_tag(args: argparse.Namespace) -> int:
    answer = _agent_call(
        args.socket, {"cmd": "tag", "kind": args.kind, "timeout": args.timeout}, args.timeout + 30
    )
    tag = answer["tag"]
    print(
        json.dumps(tag)
        if args.json
        else f"tag {tag['id']} ({tag['kind']}) durable at the process server"
    )
    return 0


def cmd_pki_init(args: argparse.Namespace) -> int:
    cert, _ = pki.make_ca(args.dir)
    print(f"CA certificate: {cert}")
    return 0


def cmd_pki_issue(args: argparse.Namespace) -> int:
    cert, key = pki.issue(args.ca_dir, args.out_dir, args.name, args.host or None)
    print(f"certificate: {cert}\nkey: {key}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferry", description="Ferry: replicate running Linux servers to Azure"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    agent = sub.add_parser("agent", help="talk to a local mobility agent").add_subparsers(
        dest="sub", required=True
    )
    status = agent.add_parser("status", help="replication state of each protected disk")
    status.add_argument("--socket", required=True, help="the agent's control socket")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_agent_status)
    tag = agent.add_parser("tag", help="take a consistency tag and wait until it is durable")
    tag.add_argument("--socket", required=True, help="the agent's control socket")
    tag.add_argument("--kind", choices=["crash", "app"], default="crash")
    tag.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (default 120)")
    tag.add_argument("--json", action="store_true", help="machine-readable output")
    tag.set_defaults(func=cmd_agent_tag)

    pk = sub.add_parser("pki", help="certificates for mutual TLS").add_subparsers(
        dest="sub", required=True
    )
    init = pk.add_parser("init", help="create a CA (kept if it exists)")
    init.add_argument("dir")
    init.set_defaults(func=cmd_pki_init)
    issue = pk.add_parser("issue", help="issue a certificate signed by the CA")
    issue.add_argument("--ca-dir", required=True)
    issue.add_argument("--out-dir", required=True)
    issue.add_argument("--name", required=True)
    issue.add_argument(
        "--host", action="append", default=[], help="subject alternative name (repeatable)"
    )
    issue.set_defaults(func=cmd_pki_issue)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ferry``."""
    args = build_parser().parse_args(argv)
    return run_main("ferry", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
