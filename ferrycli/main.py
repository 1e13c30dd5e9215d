"""``ferry``: the operator's command line.

Most commands are thin clients of the configuration server's HTTP API
(docs/api.md): ``--server`` and ``--token`` (or ``FERRY_SERVER`` and
``FERRY_TOKEN``).  ``ferry agent ...`` talks to a local agent's control
socket, and ``ferry pki ...`` makes certificates.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from typing import Any

from ferry import pki
from ferry.errors import FerryError, PeerUnavailable, UsageError
from ferry.process import run_main

MiB = 1 << 20


def _agent_call(socket_path: str, request: dict[str, Any], timeout: float = 180) -> dict[str, Any]:
    from ferry.agentsocket import call

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
    request = {"cmd": "tag", "kind": args.kind, "timeout": args.timeout, "final": args.final}
    tag = _agent_call(args.socket, request, args.timeout + 30)["tag"]
    final = "; final: the agent ships nothing more" if tag.get("final") else ""
    print(
        json.dumps(tag)
        if args.json
        else f"tag {tag['id']} ({tag['kind']}) durable at the process server{final}"
    )
    return 0


def cmd_pki_init(args: argparse.Namespace) -> int:
    cert, _ = pki.make_ca(args.dir)
    print(f"CA certificate: {cert}")
    return 0


def cmd_pki_issue(args: argparse.Namespace) -> int:
    try:
        cert, key = pki.issue(args.ca_dir, args.out_dir, args.name, args.host or None,
                              args.tenant or None, args.role, args.machine)  # fmt: skip
    except ValueError as exc:
        raise UsageError(detail=str(exc))
    print(f"certificate: {cert}\nkey: {key}")
    return 0


# -- the configuration server's API ------------------------------------------------------


class ApiError(FerryError):
    """{detail}"""

    exit_code = 8


def _server(args: argparse.Namespace) -> tuple[str, str | None, str | bool]:
    server = args.server or os.environ.get("FERRY_SERVER")
    if not server:
        raise UsageError(detail="no configuration server: pass --server URL or set FERRY_SERVER")
    token = args.token or os.environ.get("FERRY_TOKEN")
    verify: str | bool = args.ca or os.environ.get("FERRY_CA") or True
    return server.rstrip("/"), token, verify


def api(
    args: argparse.Namespace, method: str, path: str, body: dict | None = None, **params
) -> Any:
    """Call the configuration server; one clear error line when it cannot be reached or refuses."""
    import requests

    server, token, verify = _server(args)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        answer = requests.request(
            method,
            f"{server}{path}",
            json=body,
            params={k: v for k, v in params.items() if v is not None},
            headers=headers,
            timeout=30,
            verify=verify,
        )
    except requests.RequestException as exc:
        raise PeerUnavailable(peer=f"configuration server {server}", problem=type(exc).__name__)
    if answer.status_code >= 400:
        try:
            message = answer.json().get("error") or answer.text
        except ValueError:
            message = answer.text.strip()[:200]
        raise ApiError(detail=f"configuration server refused ({answer.status_code}): {message}")
    if answer.status_code == 204 or not answer.content:
        return {}
    return answer.json()


def _tenant(args: argparse.Namespace) -> str:
    tenant = args.tenant or os.environ.get("FERRY_TENANT")
    if not tenant and args.token and args.token.startswith("op."):
        tenant = args.token.split(".")[1]
    if not tenant and os.environ.get("FERRY_TOKEN", "").startswith("op."):
        tenant = os.environ["FERRY_TOKEN"].split(".")[1]
    if not tenant:
        raise UsageError(detail="no tenant: pass --tenant or use an operator token")
    return tenant


def _bar(fraction: float | None, width: int = 20) -> str:
    if fraction is None:
        return " " * (width + 2)
    fraction = min(max(fraction, 0.0), 1.0)
    full = int(fraction * width)
    return "[" + "#" * full + "." * (width - full) + "]"


def status_table(status: dict[str, Any], bars: bool = False) -> str:
    """Machines and disks as a table a person can read."""
    head = [
        "MACHINE",
        "DISK",
        "PHASE",
        "GEN",
        "TO GO",
        "BACKLOG",
        "THROUGHPUT",
        "RPO",
        "LAST TAG",
        "HEALTH",
    ]
    if bars:
        head.insert(3, "PROGRESS")
    rows = [head]
    for m in status.get("machines", []):
        disks = m.get("disks") or [{}]
        for d in disks:
            rpo = d.get("rpo_s")
            tput = d.get("throughput")
            row = [
                m.get("machine", "-"),
                d.get("disk", "-"),
                d.get("phase") or m.get("state") or "-",
                str(d.get("gen") or "-"),
                _fmt_bytes(d.get("bytes_to_go")),
                str(d.get("backlog", "-")),
                "-" if tput is None else f"{tput / MiB:.1f} MiB/s",
                "-" if rpo is None else f"{rpo:.1f} s",
                ((d.get("last_tag") or {}).get("id") or "-")
                if isinstance(d.get("last_tag"), dict)
                else str(d.get("last_tag") or "-"),
                d.get("health") or m.get("health") or "-",
            ]
            if bars:
                size, togo = d.get("size"), d.get("bytes_to_go")
                row.insert(3, _bar(1 - togo / size if size and togo is not None else None))
            rows.append(row)
    comps = [("COMPONENT", "KIND", "STATE", "LAST HEARTBEAT")]
    now = time.time()
    for c in status.get("components", []):
        beat = c.get("last_heartbeat")
        comps.append(
            (c.get("component_id", "-"), c.get("kind", "-"), c.get("state", "-"),
             f"{now - beat:.0f} s ago" if isinstance(beat, int | float) else str(beat or "-"))
        )  # fmt: skip
    return _table(rows) + "\n\n" + _table(comps)


def _tag_id(tag: Any) -> str:
    if isinstance(tag, dict):
        return tag.get("id") or "-"
    return str(tag or "-")


def _table(rows: list) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def cmd_status(args: argparse.Namespace) -> int:
    _server(args)
    path = f"/tenants/{_tenant(args)}/status"
    if not args.watch:
        status = api(args, "GET", path)
        print(json.dumps(status, indent=1) if args.json else status_table(status))
        return 0
    try:
        while True:
            status = api(args, "GET", path)
            text = json.dumps(status) if args.json else status_table(status, bars=True)
            if not args.json:
                print(
                    "\x1b[H\x1b[2J" + time.strftime("%H:%M:%S ") + "ferry status (Ctrl-C to stop)\n"
                )
            print(text, flush=True)
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def _print(args: argparse.Namespace, value: Any, text: str) -> None:
    print(json.dumps(value, indent=1) if args.json else text)


def cmd_tenant_create(args: argparse.Namespace) -> int:
    answer = api(args, "POST", "/tenants", {"tenant": args.name, "display_name": args.display_name})
    _print(
        args,
        answer,
        f"tenant {answer['tenant']} created\noperator token (shown once): {answer['operator_token']}",
    )
    return 0


def cmd_passphrase(args: argparse.Namespace) -> int:
    answer = api(args, "POST", f"/tenants/{_tenant(args)}/passphrases", {"ttl_seconds": args.ttl})
    _print(
        args,
        answer,
        f"passphrase (single use, expires {answer['expires_at']}): {answer['passphrase']}",
    )
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from ferry.control.client import register_and_save

    server, _, verify = _server(args)
    passphrase = args.passphrase or os.environ.get("FERRY_PASSPHRASE")
    if not passphrase:
        raise UsageError(detail="no passphrase: pass --passphrase or set FERRY_PASSPHRASE")
    extra: dict[str, Any] = {}
    if args.disk:
        extra["disks"] = [_disk_arg(d) for d in args.disk]
    for key in ("listen", "target_dir"):
        if getattr(args, key):
            extra[key] = getattr(args, key)
    extra["host"] = args.host or socket.getfqdn()
    creds = register_and_save(
        server, _tenant(args), passphrase, args.kind, args.name, args.out,
        ca=verify if isinstance(verify, str) else None, **extra,
    )  # fmt: skip
    print(f"registered {creds.component_id}; credentials written to {args.out}")
    return 0


def _disk_arg(text: str) -> dict[str, Any]:
    disk_id, _, device = text.partition("=")
    if not disk_id or not device:
        raise UsageError(detail=f"--disk must be ID=DEVICE, not {text!r}")
    from ferry.blockio import DirectReader

    try:
        reader = DirectReader(device, 4096)
        size = reader.size
        reader.close()
    except FerryError:
        raise
    return {"id": disk_id, "device": device, "size": size}


def cmd_protect(args: argparse.Namespace) -> int:
    body = {"idempotency_key": args.idempotency_key or f"protect-{args.machine}"}
    if args.rpo_threshold:
        body["rpo_threshold_s"] = args.rpo_threshold
    answer = api(args, "POST", f"/tenants/{_tenant(args)}/machines/{args.machine}/protect", body)
    job = answer.get("job", answer)
    _print(
        args,
        answer,
        f"protect job {job.get('id', job.get('job_id', '?'))}: {job.get('state', '?')}",
    )
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    body = {"command": "tag", "args": {"kind": args.kind}}
    answer = api(args, "POST", f"/tenants/{_tenant(args)}/machines/{args.machine}/commands", body)
    _print(
        args, answer, f"{args.kind}-consistent tag requested (command {answer.get('command_id')})"
    )
    return 0


def cmd_recovery_points(args: argparse.Namespace) -> int:
    answer = api(
        args,
        "GET",
        f"/tenants/{_tenant(args)}/recovery-points",
        machine=args.machine,
        disk=args.disk,
        limit=args.limit,
    )
    rows = [("DISK", "TAG", "KIND", "TAKEN", "GEN", "SEQ")]
    for rp in answer.get("recovery_points", []):
        tag = rp.get("tag") or {}
        when = tag.get("t0_wall")
        rows.append((rp.get("disk", "-"), tag.get("id", "-"), tag.get("kind", "-"),
                     time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if when else "-",
                     str(rp.get("gen", "-")), str(rp.get("seq", "-"))))  # fmt: skip
    _print(args, answer, _table(rows))
    return 0


def cmd_alerts(args: argparse.Namespace) -> int:
    answer = api(
        args, "GET", f"/tenants/{_tenant(args)}/alerts", open="true" if args.open else None
    )
    rows = [("SEVERITY", "KIND", "SUBJECT", "RAISED", "CLEARED", "MESSAGE")]
    for a in answer.get("alerts", []):
        rows.append((a.get("severity", "-"), a.get("kind", "-"), a.get("subject", "-"),
                     str(a.get("raised_at", "-")), str(a.get("cleared_at") or "-"), a.get("message", "")))  # fmt: skip
    _print(args, answer, _table(rows))
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    if args.job:
        answer = api(args, "GET", f"/tenants/{_tenant(args)}/jobs/{args.job}")
        job = answer.get("job", answer)
        lines = [
            f"job {job.get('id')} ({job.get('kind')}, {job.get('machine')}): {job.get('state')}"
        ]
        lines += [
            f"  {h.get('at')}  {h.get('state'):<18} {h.get('detail') or ''}"
            for h in job.get("history", [])
        ]
        _print(args, answer, "\n".join(lines))
        return 0
    answer = api(args, "GET", f"/tenants/{_tenant(args)}/jobs")
    rows = [("JOB", "KIND", "MACHINE", "STATE", "UPDATED")]
    for j in answer.get("jobs", []):
        rows.append(
            (
                j.get("id", "-"),
                j.get("kind", "-"),
                j.get("machine", "-"),
                j.get("state", "-"),
                str(j.get("updated_at", "-")),
            )
        )
    _print(args, answer, _table(rows))
    return 0


def cmd_component(args: argparse.Namespace) -> int:
    body = {"command": args.command}
    path = f"/tenants/{_tenant(args)}/components/{args.component}/commands"
    answer = api(args, "POST", path, body)
    _print(args, answer, f"{args.command} sent to {args.component} (command {answer.get('command_id')}; "
                         f"ferry command {answer.get('command_id')} shows its outcome)")  # fmt: skip
    return 0


def cmd_command(args: argparse.Namespace) -> int:
    answer = api(args, "GET", f"/tenants/{_tenant(args)}/commands/{args.command_id}")
    command = answer.get("command", {})
    rows = [("TARGET", "STATE", "AT", "DETAIL")]
    for target, outcome in sorted(command.get("targets", {}).items()):
        rows.append((target, outcome.get("state", "-"), str(outcome.get("at", "-")),
                     (outcome.get("detail") or "")[:200]))  # fmt: skip
    head = f"command {command.get('command_id')} ({command.get('type')}, {command.get('machine')})"
    _print(args, answer, head + "\n" + _table(rows))
    return 0


def _server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", help="configuration server URL (or FERRY_SERVER)")
    p.add_argument("--token", help="operator or admin token (or FERRY_TOKEN)")
    p.add_argument("--ca", help="CA file to trust for the server (or FERRY_CA)")
    p.add_argument("--tenant", help="tenant id (or FERRY_TENANT; implied by an operator token)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _add_api_commands(sub) -> None:
    status = sub.add_parser(
        "status", help="machines and disks: phase, progress, RPO, backlog, health"
    )
    _server_args(status)
    status.add_argument("--watch", action="store_true", help="redraw live with progress bars")
    status.add_argument(
        "--interval", type=float, default=2.0, help="seconds between redraws (default 2)"
    )
    status.set_defaults(func=cmd_status)

    tenant = sub.add_parser("tenant", help="tenants (admin token)").add_subparsers(
        dest="sub", required=True
    )
    create = tenant.add_parser("create", help="create a tenant; prints its operator token once")
    _server_args(create)
    create.add_argument("name")
    create.add_argument("--display-name")
    create.set_defaults(func=cmd_tenant_create)

    pp = sub.add_parser("passphrase", help="a one-time registration passphrase for components")
    _server_args(pp)
    pp.add_argument(
        "--ttl", type=int, default=86400, help="seconds until it expires (default 86400)"
    )
    pp.set_defaults(func=cmd_passphrase)

    reg = sub.add_parser("register", help="register this host's component and save its credentials")
    _server_args(reg)
    reg.add_argument("--kind", required=True, choices=["agent", "process-server", "master-target"])
    reg.add_argument("--name", required=True, help="machine id (agent) or server name")
    reg.add_argument("--passphrase", help="one-time passphrase (or FERRY_PASSPHRASE)")
    reg.add_argument("--out", required=True, help="credentials file to write (mode 0600)")
    reg.add_argument(
        "--disk", action="append", default=[], help="agent disk as ID=DEVICE (repeatable)"
    )
    reg.add_argument("--listen", help="process server: host:port agents connect to")
    reg.add_argument(
        "--target-dir", dest="target_dir", help="master target: where target disks live"
    )
    reg.add_argument("--host", help="this host's name")
    reg.set_defaults(func=cmd_register)

    protect = sub.add_parser(
        "protect", help="protect a machine (all its disks, one consistency group)"
    )
    _server_args(protect)
    protect.add_argument("machine")
    protect.add_argument("--idempotency-key", help="the same key asks for the same job")
    protect.add_argument(
        "--rpo-threshold", type=float, help="alert when RPO exceeds this (seconds)"
    )
    protect.set_defaults(func=cmd_protect)

    tag = sub.add_parser("tag", help="ask a machine's agent for a crash- or app-consistent tag")
    _server_args(tag)
    tag.add_argument("machine")
    tag.add_argument("--kind", choices=["crash", "app"], default="crash")
    tag.set_defaults(func=cmd_tag)

    rp = sub.add_parser("recovery-points", help="recovery points the master target reached")
    _server_args(rp)
    rp.add_argument("--machine")
    rp.add_argument("--disk")
    rp.add_argument("--limit", type=int, default=20)
    rp.set_defaults(func=cmd_recovery_points)

    alerts = sub.add_parser("alerts", help="alerts raised by the monitoring timer")
    _server_args(alerts)
    alerts.add_argument("--open", action="store_true", help="only alerts not cleared")
    alerts.set_defaults(func=cmd_alerts)

    jobs = sub.add_parser("jobs", help="protect, cutover and test-failover jobs and their history")
    _server_args(jobs)
    jobs.add_argument("job", nargs="?", help="show one job with its history")
    jobs.set_defaults(func=cmd_jobs)

    component = sub.add_parser(
        "component", help="stop a process server or master target, or rotate its credentials"
    )
    _server_args(component)
    component.add_argument("component", help="the component's id (ps-..., mt-..., ag-...)")
    component.add_argument("command", choices=["stop", "rotate-credentials"])
    component.set_defaults(func=cmd_component)

    command = sub.add_parser("command", help="one command and each component's outcome")
    _server_args(command)
    command.add_argument("command_id", help="the id a command request answered (cmd-...)")
    command.set_defaults(func=cmd_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferry", description="Ferry: replicate running Linux servers to Azure"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_api_commands(sub)

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
    tag.add_argument(
        "--final",
        action="store_true",
        help="a cutover's last tag: shipping stops after it and the master target fences the disks",
    )
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
    issue.add_argument(
        "--tenant",
        action="append",
        default=[],
        help="bind an agent's certificate to this tenant (repeatable; * for any)",
    )
    issue.add_argument("--machine", help="the machine an agent's certificate is for")
    issue.add_argument(
        "--role", choices=pki.ROLES,
        help="agent (client only: --tenant and --machine) or server (server only: --host); "
        "by default agent when --tenant or --machine is given",
    )  # fmt: skip
    issue.set_defaults(func=cmd_pki_issue)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ferry``."""
    args = build_parser().parse_args(argv)
    return run_main("ferry", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
