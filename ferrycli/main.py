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
import urllib.parse
import uuid
from typing import Any

from ferry import __version__, pki, tokens
from ferry.errors import Exit, FerryError, PeerUnavailable, UsageError
from ferry.process import run_main
from ferrycli import render
from ferrycli.render import Bar, Table

MiB = 1 << 20


class TagRefused(FerryError):
    """no tag: {problem}"""

    exit_code = Exit.NO_TAG


def _agent_socket_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", help="the agent's control socket")
    where.add_argument(
        "--state-dir", help="the agent's state directory (its control socket is in it)"
    )


def _socket_of(args: argparse.Namespace) -> str:
    from ferry.agentsocket import path_in

    return args.socket or path_in(args.state_dir)


def _agent_call(
    socket_path: str, request: dict[str, Any], timeout: float = 180, refused: type = UsageError
) -> dict[str, Any]:
    """One request to the agent's control socket; ``refused`` (a FerryError) if it says no."""
    from ferry.agentsocket import call

    try:
        answer = call(socket_path, request, timeout)
    except (OSError, ValueError) as exc:
        raise PeerUnavailable(peer=f"agent control socket {socket_path}", problem=str(exc))
    if not answer.get("ok"):
        if refused is UsageError:
            raise UsageError(detail=f"agent refused: {answer.get('error')}")
        raise refused(problem=f"agent refused: {answer.get('error')}")
    return answer


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / MiB:.1f} MiB" if n < 1 << 30 else f"{n / (1 << 30):.2f} GiB"


def agent_view(status: dict[str, Any]) -> list[render.Part]:
    """A line on the tracker and the connection, then a table with one row per disk."""
    columns = ("DISK", "PHASE", "GEN", "TO GO", "SHIPPED", "BACKLOG", "LAST TAG", "TAG AGE",
               "VERIFY")  # fmt: skip
    rows = []
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
                _agent_verify(d.get("verify")),
            )
        )
    head = (
        f"tracker: {status.get('tracker_description', status.get('tracker'))}; "
        f"process server {'connected' if status.get('connected') else 'NOT connected'}"
        f"{': ' + status['last_error'] if status.get('last_error') else ''}"
    )
    return [head, Table(columns, rows)]


def _agent_verify(v: Any) -> str:
    """The agent's side of a verify: how far it got, or that its last range was sent."""
    if not isinstance(v, dict):
        return "-"
    if v.get("state") == "running" and v.get("size"):
        return f"{v['id']} {100 * v.get('done_bytes', 0) / v['size']:.0f}%"
    return f"{v.get('id')} sent"


def cmd_agent_status(args: argparse.Namespace) -> int:
    status = _agent_call(_socket_of(args), {"cmd": "status"}, 10)["status"]
    render.show(args.json, status, *agent_view(status))
    return 0


def cmd_agent_tag(args: argparse.Namespace) -> int:
    request = {"cmd": "tag", "kind": args.kind, "timeout": args.timeout, "final": args.final}
    with render.busy(f"waiting up to {args.timeout:.0f} s for a {args.kind} tag to be durable"):
        tag = _agent_call(_socket_of(args), request, args.timeout + 30, refused=TagRefused)["tag"]
    final = "; final: the agent ships nothing more" if tag.get("final") else ""
    print(
        json.dumps(tag)
        if args.json
        else f"tag {tag['id']} ({tag['kind']}) durable at the process server{final}"
    )
    return 0


def cmd_agent_verify(args: argparse.Namespace) -> int:
    request = {"cmd": "verify", "disks": args.disk or None, "repair": False}
    answer = _agent_call(_socket_of(args), request, 30)
    render.show(args.json, answer, f"verify {answer['verify_id']} started for "
                f"{', '.join(answer['disks'])}; the master target reports what differs "
                "(its status.json, disk 'verify')")  # fmt: skip
    return 0


def _block_runs(text: str) -> list[list[int]]:
    """``10,12-15`` as ``[[10, 1], [12, 4]]``; UsageError if malformed."""
    out = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        try:
            a, b = int(first), int(last or first)
        except ValueError:
            raise UsageError(detail=f"--blocks must be like 10,12-15, not {text!r}")
        if a < 0 or b < a:
            raise UsageError(detail=f"--blocks must be like 10,12-15, not {text!r}")
        out.append([a, b - a + 1])
    return out


def cmd_agent_repair(args: argparse.Namespace) -> int:
    request = {"cmd": "repair", "disk": args.disk, "blocks": _block_runs(args.blocks)}
    answer = _agent_call(_socket_of(args), request, 30)
    render.show(args.json, answer, f"{answer['blocks']} block(s) of {args.disk} will be "
                "shipped again with the next pass")  # fmt: skip
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


def _server(args: argparse.Namespace) -> tuple[str, str | None, str | bool]:
    """The server URL, the token and what to verify its TLS certificate with; UsageError if unusable."""
    server = args.server or os.environ.get("FERRY_SERVER")
    if not server:
        raise UsageError(detail="no configuration server: pass --server URL or set FERRY_SERVER")
    if not server.startswith(("http://", "https://")):
        raise UsageError(
            detail=f"the server URL must start with http:// or https://, not {server!r}"
        )
    token = _token(args)
    verify: str | bool = args.ca or os.environ.get("FERRY_CA") or True
    if isinstance(verify, str) and not os.access(verify, os.R_OK):
        raise UsageError(detail=f"cannot read the CA file {verify}")
    return server.rstrip("/"), token, verify


def _token(args: argparse.Namespace) -> str | None:
    """The token: ``--token-file``, ``--token``, FERRY_TOKEN_FILE or FERRY_TOKEN, first given.

    A file or the environment keeps the token off the command line, where
    other users of the host can read it (``ps``); the file must be private.
    """
    path = getattr(args, "token_file", None)
    if not path and getattr(args, "token", None):
        return args.token
    path = path or os.environ.get("FERRY_TOKEN_FILE")
    if path:
        try:
            mode = os.stat(path).st_mode
            text = open(path).read().strip()
        except OSError as exc:
            raise UsageError(detail=f"cannot read the token file {path}: {exc.strerror or exc}")
        if mode & 0o077:
            raise UsageError(detail=f"the token file {path} may be read by others "
                             f"(mode {mode & 0o777:04o}); chmod 600 it")  # fmt: skip
        return text or None
    return os.environ.get("FERRY_TOKEN")


def api(
    args: argparse.Namespace,
    method: str,
    path: str,
    body: dict | None = None,
    idempotent: bool = True,
    **params: Any,
) -> Any:
    """Call the configuration server through the daemons' transport (retries, secrets scrubbed).

    A refusal raises ControlRefused, an unreachable server ControlUnavailable,
    an untrusted certificate ControlUntrusted: each prints one line.
    """
    from ferry.control.transport import Transport

    server, token, verify = _server(args)
    query = {k: v for k, v in params.items() if v is not None}
    if query:
        path = f"{path}?{urllib.parse.urlencode(query)}"
    answer = Transport(server, verify, token).call(method, path, body, idempotent=idempotent)
    return {} if answer is None else answer


def _request_key(what: str) -> str:
    """An idempotency key for one invocation, so the transport may retry its POST."""
    return f"cli-{what}-{uuid.uuid4().hex[:16]}"


def _tenant(args: argparse.Namespace) -> str:
    tenant = args.tenant or os.environ.get("FERRY_TENANT")
    for token in (_token(args),):
        claim = tokens.claim(token or "")
        if not tenant and claim is not None and claim.kind == "operator":
            tenant = claim.tenant
    if not tenant:
        raise UsageError(detail="no tenant: pass --tenant or use an operator token")
    return tenant


def status_view(status: dict[str, Any], bars: bool = False) -> list[render.Part]:
    """Machines and disks, then components, as tables a person can read."""
    columns = ["MACHINE", "DISK", "PHASE", "GEN", "TO GO", "BACKLOG", "THROUGHPUT", "RPO",
               "SHIPPED RPO", "LAST TAG", "VERIFY", "HEALTH"]  # fmt: skip
    if bars:
        columns.insert(3, "PROGRESS")
    rows = []
    for m in status.get("machines", []):
        for d in m.get("disks") or [{}]:
            rpo = d.get("rpo_s")
            tput = d.get("throughput")
            row: list[Any] = [
                m.get("machine", "-"),
                d.get("disk", "-"),
                d.get("phase") or m.get("state") or "-",
                str(d.get("gen") or "-"),
                _fmt_bytes(d.get("bytes_to_go")),
                str(d.get("backlog", "-")),
                "-" if tput is None else f"{tput / MiB:.1f} MiB/s",
                "-" if rpo is None else f"{rpo:.1f} s",
                _seconds(d.get("shipped_rpo_s")),
                _tag_id(d.get("last_tag")),
                verify_cell(d.get("verify")),
                d.get("health") or m.get("health") or "-",
            ]
            if bars:
                size, togo = d.get("size"), d.get("bytes_to_go")
                row.insert(3, Bar(1 - togo / size if size and togo is not None else None))
            rows.append(row)
    comps = []
    now = time.time()
    for c in status.get("components", []):
        beat = c.get("last_heartbeat")
        comps.append(
            (c.get("component_id", "-"), c.get("kind", "-"), c.get("state", "-"),
             f"{now - beat:.0f} s ago" if isinstance(beat, int | float) else str(beat or "-"))
        )  # fmt: skip
    return [
        Table(columns, rows),
        Table(("COMPONENT", "KIND", "STATE", "LAST HEARTBEAT"), comps),
    ]


def _seconds(value: Any) -> str:
    return f"{value:.1f} s" if isinstance(value, int | float) else "-"


def verify_cell(report: Any) -> str:
    """A disk's latest online verify in a few words: ``done: 3 differ``, ``running``, ``-``."""
    if not isinstance(report, dict):
        return "-"
    if report.get("state") != "done":
        return f"running ({report.get('compared_blocks', 0)} blocks)"
    differ = report.get("differing_blocks", 0)
    return "done: equal" if not differ else f"done: {differ} differ"


def _runs_text(runs: Any) -> str:
    if not isinstance(runs, list) or not runs:
        return "-"
    parts = [f"{a}" if n == 1 else f"{a}-{a + n - 1}" for a, n in runs[:20]]
    return ",".join(parts) + (",..." if len(runs) > 20 else "")


def verify_view(status: dict[str, Any], machine: str, verify_id: str | None) -> list[render.Part]:
    """One row per disk of ``machine``: its latest verify and exactly which blocks differ."""
    rows = []
    for m in status.get("machines", []):
        if m.get("machine") != machine:
            continue
        for d in m.get("disks") or []:
            v = d.get("verify") or {}
            if verify_id and v.get("id") != verify_id:
                v = {}
            rows.append((d.get("disk", "-"), v.get("id", "-"), v.get("state", "-"),
                         str(v.get("compared_blocks", "-")), str(v.get("differing_blocks", "-")),
                         _runs_text(v.get("differing")), str(v.get("block", "-"))))  # fmt: skip
    columns = ("DISK", "VERIFY", "STATE", "COMPARED", "DIFFERING", "BLOCKS", "BLOCK SIZE")
    return [Table(columns, rows)]


def cmd_schedule(args: argparse.Namespace) -> int:
    body = {}
    if args.app_consistent_every is not None:
        body["app_consistent_interval_s"] = args.app_consistent_every
    if args.verify_every is not None:
        body["verify_interval_s"] = args.verify_every
    path = f"/tenants/{_tenant(args)}/machines/{args.machine}/schedule"
    answer = api(args, "POST", path, body)
    s = answer.get("schedule", {})
    render.show(args.json, answer, f"{args.machine}: app-consistent point every "
                f"{s.get('app_consistent_interval_s') or 'never'} s, verify every "
                f"{s.get('verify_interval_s') or 'never'} s")  # fmt: skip
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Start an online verify of a machine's disks (``--wait``: until every one reports)."""
    tenant = _tenant(args)
    if args.show:
        status = api(args, "GET", f"/tenants/{tenant}/status")
        render.show(args.json, status, *verify_view(status, args.machine, None))
        return 0
    verify_args: dict[str, Any] = {"repair": args.repair}
    if args.disk:
        verify_args["disks"] = args.disk
    body = {"command": "verify", "args": verify_args, "idempotency_key": _request_key("verify")}
    answer = api(args, "POST", f"/tenants/{tenant}/machines/{args.machine}/commands", body)
    verify_id = answer.get("verify_id")
    if not args.wait:
        render.show(args.json, answer, f"verify {verify_id} requested (command "
                    f"{answer.get('command_id')}); ferry verify {args.machine} --show")  # fmt: skip
        return 0
    deadline = time.monotonic() + args.timeout
    with render.busy(f"waiting for verify {verify_id}"):
        while True:
            status = api(args, "GET", f"/tenants/{tenant}/status")
            disks = [d for m in status.get("machines", []) if m.get("machine") == args.machine
                     for d in m.get("disks") or [] if not args.disk or d.get("disk") in args.disk]  # fmt: skip
            if disks and all((d.get("verify") or {}).get("id") == verify_id
                             and d["verify"].get("state") == "done" for d in disks):  # fmt: skip
                break
            if time.monotonic() > deadline:
                raise UsageError(
                    detail=f"verify {verify_id} did not finish in {args.timeout:.0f} s"
                )
            time.sleep(2)
    render.show(args.json, status, *verify_view(status, args.machine, verify_id))
    return 0


def _tag_id(tag: Any) -> str:
    if isinstance(tag, dict):
        return tag.get("id") or "-"
    return str(tag or "-")


def cmd_status(args: argparse.Namespace) -> int:
    _server(args)
    path = f"/tenants/{_tenant(args)}/status"
    if not args.watch:
        status = api(args, "GET", path)
        render.show(args.json, status, *status_view(status))
        return 0
    try:
        if args.json:
            while True:
                print(json.dumps(api(args, "GET", path)), flush=True)
                time.sleep(args.interval)
        render.watch(lambda: status_view(api(args, "GET", path), bars=True), args.interval,
                     "ferry status")  # fmt: skip
    except KeyboardInterrupt:
        return 0
    return 0


def cmd_tenant_create(args: argparse.Namespace) -> int:
    body = {"tenant": args.name, "display_name": args.display_name}
    answer = api(args, "POST", "/tenants", body, idempotent=False)
    render.show(
        args.json,
        answer,
        f"tenant {answer['tenant']} created\noperator token (shown once): {answer['operator_token']}",
    )
    return 0


def cmd_passphrase(args: argparse.Namespace) -> int:
    path = f"/tenants/{_tenant(args)}/passphrases"
    answer = api(args, "POST", path, {"ttl_seconds": args.ttl}, idempotent=False)
    render.show(
        args.json,
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

    reader = DirectReader(device, 4096)
    size = reader.size
    reader.close()
    return {"id": disk_id, "device": device, "size": size}


def cmd_protect(args: argparse.Namespace) -> int:
    body = {"idempotency_key": args.idempotency_key or f"protect-{args.machine}"}
    if args.rpo_threshold:
        body["rpo_threshold_s"] = args.rpo_threshold
    if args.app_consistent_every is not None:
        body["app_consistent_interval_s"] = args.app_consistent_every
    if args.verify_every is not None:
        body["verify_interval_s"] = args.verify_every
    answer = api(args, "POST", f"/tenants/{_tenant(args)}/machines/{args.machine}/protect", body)
    job = answer.get("job", answer)
    render.show(
        args.json,
        answer,
        f"protect job {job.get('id', job.get('job_id', '?'))}: {job.get('state', '?')}",
    )
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    body = {"command": "tag", "args": {"kind": args.kind}, "idempotency_key": _request_key("tag")}
    answer = api(args, "POST", f"/tenants/{_tenant(args)}/machines/{args.machine}/commands", body)
    render.show(
        args.json,
        answer,
        f"{args.kind}-consistent tag requested (command {answer.get('command_id')})",
    )
    return 0


def _when(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return str(seconds or "-")
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def cmd_recovery_points(args: argparse.Namespace) -> int:
    path = f"/tenants/{_tenant(args)}/recovery-points"
    restorable = "true" if args.restorable else None
    answer = api(args, "GET", path, machine=args.machine, disk=args.disk, limit=args.limit,
                 restorable=restorable)  # fmt: skip
    if args.machine and not args.disk:
        machine_rows = [(p.get("tag_id", "-"), p.get("kind") or "-", _when(p.get("t0_wall")),
                 ",".join(p.get("disks", [])), "yes" if p.get("restorable") else "no")
                for p in answer.get("points", [])]  # fmt: skip
        render.show(args.json, answer,
                    Table(("TAG", "KIND", "TAKEN", "DISKS", "RESTORABLE"), machine_rows))  # fmt: skip
        return 0
    rows = []
    for rp in answer.get("recovery_points", []):
        tag = rp.get("tag") or {}
        rows.append((rp.get("disk", "-"), tag.get("id", "-"), tag.get("kind", "-"),
                     _when(tag.get("t0_wall")), str(rp.get("gen", "-")), str(rp.get("seq", "-")),
                     "yes" if rp.get("restorable") else "no"))  # fmt: skip
    columns = ("DISK", "TAG", "KIND", "TAKEN", "GEN", "SEQ", "RESTORABLE")
    render.show(args.json, answer, Table(columns, rows))
    return 0


def _moment(text: str) -> float:
    """Unix seconds or ISO 8601 (UTC unless it says) as Unix seconds; one-line error if neither."""
    from datetime import UTC, datetime

    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(detail=f"--point-time {text!r} is neither Unix seconds nor ISO 8601")
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def cmd_test_failover(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"idempotency_key": _request_key("test-failover"), "drive": True}
    if args.point:
        body["point"] = args.point
    if args.point_time:
        body["point_time"] = _moment(args.point_time)
    path = f"/tenants/{_tenant(args)}/machines/{args.machine}/test-failover"
    answer = api(args, "POST", path, body)
    job = answer.get("job") or {}
    render.show(args.json, answer, f"test failover job {job.get('job_id')} is {job.get('state')}")
    return 0


def cmd_alerts(args: argparse.Namespace) -> int:
    path = f"/tenants/{_tenant(args)}/alerts"
    answer = api(args, "GET", path, open="true" if args.open else None)
    rows = []
    for a in answer.get("alerts", []):
        rows.append((a.get("severity", "-"), a.get("kind", "-"), a.get("subject", "-"),
                     _when(a.get("raised_at")), _when(a.get("cleared_at")), a.get("message", "")))  # fmt: skip
    columns = ("SEVERITY", "KIND", "SUBJECT", "RAISED", "CLEARED", "MESSAGE")
    render.show(args.json, answer, Table(columns, rows))
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    if args.job:
        answer = api(args, "GET", f"/tenants/{_tenant(args)}/jobs/{args.job}")
        job = answer.get("job", answer)
        head = (
            f"job {job.get('job_id')} ({job.get('kind')}, {job.get('machine')}): {job.get('state')}"
        )
        rows = [
            (_when(h.get("at")), h.get("state") or "-", h.get("detail") or "")
            for h in job.get("history", [])
        ]
        render.show(args.json, answer, head, Table(("AT", "STATE", "DETAIL"), rows))
        return 0
    answer = api(args, "GET", f"/tenants/{_tenant(args)}/jobs")
    job_rows = [
        (j.get("job_id", "-"), j.get("kind", "-"), j.get("machine", "-"), j.get("state", "-"),
         _when(j.get("updated_at")))
        for j in answer.get("jobs", [])
    ]  # fmt: skip
    render.show(args.json, answer, Table(("JOB", "KIND", "MACHINE", "STATE", "UPDATED"), job_rows))
    return 0


def cmd_component(args: argparse.Namespace) -> int:
    body = {"command": args.command, "idempotency_key": _request_key(args.command)}
    path = f"/tenants/{_tenant(args)}/components/{args.component}/commands"
    answer = api(args, "POST", path, body)
    command_id = answer.get("command_id")
    render.show(args.json, answer, f"{args.command} sent to {args.component} (command "
                f"{command_id}; ferry command {command_id} shows its outcome)")  # fmt: skip
    return 0


def cmd_cutover_resume(args: argparse.Namespace) -> int:
    body = {"idempotency_key": args.idempotency_key or _request_key("resume-replication")}
    path = f"/tenants/{_tenant(args)}/machines/{args.machine}/resume-replication"
    answer = api(args, "POST", path, body)
    command_id = answer.get("command_id")
    render.show(args.json, answer, f"replication of {args.machine} resumes: the fence of its "
                f"uncommitted cutover is lifted (command {command_id}; ferry command "
                f"{command_id} shows each component's outcome)")  # fmt: skip
    return 0


def cmd_command(args: argparse.Namespace) -> int:
    answer = api(args, "GET", f"/tenants/{_tenant(args)}/commands/{args.command_id}")
    command = answer.get("command", {})
    rows = [
        (target, outcome.get("state", "-"), _when(outcome.get("at")),
         (outcome.get("detail") or "")[:200])
        for target, outcome in sorted(command.get("targets", {}).items())
    ]  # fmt: skip
    head = f"command {command.get('command_id')} ({command.get('type')}, {command.get('machine')})"
    render.show(args.json, answer, head, Table(("TARGET", "STATE", "AT", "DETAIL"), rows))
    return 0


def _server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", help="configuration server URL (or FERRY_SERVER)")
    p.add_argument(
        "--token-file", metavar="FILE",
        help="file holding the operator or admin token, mode 0600 (or FERRY_TOKEN_FILE)",
    )  # fmt: skip
    p.add_argument(
        "--token", help="the token itself: visible to other users in ps; prefer "
        "--token-file or FERRY_TOKEN",
    )  # fmt: skip
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
    protect.add_argument(
        "--app-consistent-every",
        type=int,
        metavar="SECONDS",
        help="the agent takes an app-consistent point (freeze and hooks) this often",
    )
    protect.add_argument(
        "--verify-every",
        type=int,
        metavar="SECONDS",
        help="the agent runs an online verify of every disk this often",
    )
    protect.set_defaults(func=cmd_protect)

    sched = sub.add_parser(
        "schedule",
        help="how often a machine's agent takes app-consistent "
        "points and verifies its disks (0: never)",
    )
    _server_args(sched)
    sched.add_argument("machine")
    sched.add_argument("--app-consistent-every", type=int, metavar="SECONDS")
    sched.add_argument("--verify-every", type=int, metavar="SECONDS")
    sched.set_defaults(func=cmd_schedule)

    verify = sub.add_parser(
        "verify",
        help="online verify: compare source and target at one tag "
        "per range; report the blocks that differ (--repair ships them again)",
    )
    _server_args(verify)
    verify.add_argument("machine")
    verify.add_argument("--disk", action="append", default=[], help="only this disk (repeatable)")
    verify.add_argument(
        "--repair",
        action="store_true",
        help="ship the blocks found differing again (nothing changes otherwise)",
    )
    verify.add_argument("--wait", action="store_true", help="wait for the report and show it")
    verify.add_argument("--timeout", type=float, default=3600.0, help="seconds --wait waits")
    verify.add_argument("--show", action="store_true", help="show each disk's latest verify only")
    verify.set_defaults(func=cmd_verify)

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
    rp.add_argument("--restorable", action="store_true", help="only points that can be restored")
    rp.set_defaults(func=cmd_recovery_points)

    tf = sub.add_parser(
        "test-failover", help="a test VM's disks at one recovery point (server-driven)"
    )
    _server_args(tf)
    tf.add_argument("machine")
    tf.add_argument("--point", help="the recovery point's tag id (default: the newest)")
    tf.add_argument("--point-time", help="the newest point at or before (Unix s or ISO 8601)")
    tf.set_defaults(func=cmd_test_failover)

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

    cut = sub.add_parser("cutover", help="a machine's cutover").add_subparsers(
        dest="cutover_command", required=True
    )
    resume = cut.add_parser(
        "resume",
        help="resume replication after a cutover that was not committed (its boot check failed)",
    )
    _server_args(resume)
    resume.add_argument("machine")
    resume.add_argument("--idempotency-key", help="the same key asks once")
    resume.set_defaults(func=cmd_cutover_resume)

    command = sub.add_parser("command", help="one command and each component's outcome")
    _server_args(command)
    command.add_argument("command_id", help="the id a command request answered (cmd-...)")
    command.set_defaults(func=cmd_command)


SHELLS = ("bash", "zsh", "fish", "tcsh")
"""Shells ``--print-completion`` writes a script for (argcomplete's)."""


class _PrintCompletion(argparse.Action):
    """Print the completion script for a shell and exit (like ``--version``, before subcommands)."""

    def __init__(self, option_strings, dest, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=1, metavar="SHELL", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        import argcomplete

        print(argcomplete.shellcode([parser.prog], shell=values[0]), end="")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferry", description="Ferry: replicate running Linux servers to Azure"
    )
    parser.add_argument("--version", action="version", version=f"ferry {__version__}")
    parser.add_argument(
        "--print-completion",
        action=_PrintCompletion,
        choices=SHELLS,
        help='print the shell completion script (e.g. eval "$(ferry --print-completion bash)")',
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_api_commands(sub)

    agent = sub.add_parser("agent", help="talk to a local mobility agent").add_subparsers(
        dest="sub", required=True
    )
    status = agent.add_parser("status", help="replication state of each protected disk")
    _agent_socket_arguments(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_agent_status)
    tag = agent.add_parser("tag", help="take a consistency tag and wait until it is durable")
    _agent_socket_arguments(tag)
    tag.add_argument("--kind", choices=["crash", "app"], default="crash")
    tag.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (default 120)")
    tag.add_argument(
        "--final",
        action="store_true",
        help="a cutover's last tag: shipping stops after it and the master target fences the disks",
    )
    tag.add_argument("--json", action="store_true", help="machine-readable output")
    tag.set_defaults(func=cmd_agent_tag)

    av = agent.add_parser("verify", help="start an online verify (settings-file mode)")
    _agent_socket_arguments(av)
    av.add_argument("--disk", action="append", default=[], help="only this disk (repeatable)")
    av.add_argument("--json", action="store_true", help="machine-readable output")
    av.set_defaults(func=cmd_agent_verify)
    ar = agent.add_parser("repair", help="ship blocks again that a verify found differing")
    _agent_socket_arguments(ar)
    ar.add_argument("--disk", required=True)
    ar.add_argument("--blocks", required=True, help="block numbers, e.g. 10,12-15")
    ar.add_argument("--json", action="store_true", help="machine-readable output")
    ar.set_defaults(func=cmd_agent_repair)

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
    parser = build_parser()
    if argv is None and "_ARGCOMPLETE" in os.environ:
        import argcomplete

        argcomplete.autocomplete(parser)  # answers the shell's completion request and exits
    args = parser.parse_args(argv)
    return run_main("ferry", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
