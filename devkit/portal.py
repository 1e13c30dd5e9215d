"""``make portal``: the portal on the embedded default (Azurite + the configuration server).

Starts Azurite, ``python -m functions.local`` and the portal on this
machine, creates a tenant (``demo`` unless ``--tenant``), writes its
operator token to ``run/portal/<tenant>.token`` (mode 0600; it is never
printed) and prints the portal's URL.  Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import requests

from devkit.azurite import Azurite, free_port
from ferry.process import StopFlag, run_main, setup_logging
from portal import defaults

ROOT = Path(__file__).resolve().parent.parent


def start_config_server(storage: str, admin_key: str, log: Path) -> tuple[subprocess.Popen, str]:
    """``python -m functions.local`` on a free port, once it answers; (process, URL)."""
    port = free_port()
    env = {**os.environ, "FERRY_STORAGE": storage, "FERRY_ADMIN_KEY": admin_key,
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "functions.local", "--port", str(port), "--timer-interval", "5"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", proc, log)
    return proc, url


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    """Wait until ``url`` answers 200; RuntimeError with the log's tail if ``proc`` dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            what = " ".join(str(a) for a in proc.args) if isinstance(proc.args, list) else proc.args
            raise RuntimeError(f"{what!s} exited: {log.read_text()[-2000:]}")
        try:
            if requests.get(url, timeout=1).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer: {log.read_text()[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devkit.portal", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--tenant", default="demo", help="tenant to create (default demo)")
    parser.add_argument("--port", type=int, default=defaults.PORT, help="the portal's port")
    parser.add_argument("--run-dir", default=str(ROOT / "run" / "portal"), help="logs and token")
    args = parser.parse_args(argv)
    setup_logging("devkit.portal")
    return run_main("portal", lambda: _serve(args))


def _serve(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    admin_key = secrets.token_urlsafe(32)
    stop = StopFlag()
    with Azurite(log=str(run_dir / "azurite.log")) as azurite:
        server, url = start_config_server(
            azurite.connection_string, admin_key, run_dir / "server.log"
        )
        portal = None
        try:
            answer = requests.post(f"{url}/tenants", json={"tenant": args.tenant}, timeout=30,
                                   headers={"Authorization": f"Bearer {admin_key}"})  # fmt: skip
            answer.raise_for_status()
            token_file = run_dir / f"{args.tenant}.token"
            token_file.unlink(missing_ok=True)
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(answer.json()["operator_token"] + "\n")
            log = run_dir / "portal.log"
            with open(log, "ab") as out:
                portal = subprocess.Popen(
                    [sys.executable, "-m", "portal", "--server", url, "--port", str(args.port)],
                    stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                )  # fmt: skip
            wait_http(f"http://127.0.0.1:{args.port}/healthz", portal, log)
            print(f"Ferry portal: http://127.0.0.1:{args.port}/")
            print(f"  sign in with the operator token of tenant {args.tenant} in {token_file}")
            print(f"  configuration server {url}; logs in {run_dir}; Ctrl-C stops everything")
            sys.stdout.flush()
            stop.install()
            while not stop.event.wait(1):
                if server.poll() is not None or portal.poll() is not None:
                    print("portal: a process exited; see the logs", file=sys.stderr)
                    return 1
        finally:
            for proc in (portal, server):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
