"""``make portal``: its launcher starts the whole embedded default and prints a URL that works.

``python -m devkit.portal`` (what the make target runs) is started as an
operator would, on a free port with a run directory of the test's own; the
URL it prints must answer ``/healthz`` and sign-in, the operator token must
sit in a 0600 file and never be printed, and one SIGINT (Ctrl-C) must stop
everything it started.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import stat
import subprocess
import sys
import threading
import time

import requests
from support.portal import ROOT

from devkit.azurite import free_port


def test_make_portal_prints_a_url_that_answers_and_stops_on_ctrl_c(tmp_path):
    port = free_port()
    launcher = subprocess.Popen(
        [sys.executable, "-m", "devkit.portal", "--run-dir", str(tmp_path), "--port", str(port)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(line) for line in launcher.stdout], daemon=True
    ).start()
    said: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while not any("Ctrl-C" in line for line in said) and time.monotonic() < deadline:
            try:
                said.append(lines.get(timeout=1))
            except queue.Empty:
                assert launcher.poll() is None, "".join(said)
        printed = "".join(said)
        url = re.search(r"Ferry portal: (http://\S+)/", printed).group(1)
        assert url == f"http://127.0.0.1:{port}"
        assert requests.get(f"{url}/healthz", timeout=10).text == "ok"
        assert requests.get(f"{url}/signin", timeout=10).status_code == 200
        server = re.search(r"configuration server (http://\S+);", printed).group(1)
        assert requests.get(f"{server}/health", timeout=10).ok
        token_file = tmp_path / "demo.token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert token_file.read_text().strip() not in printed
        launcher.send_signal(signal.SIGINT)  # Ctrl-C
        assert launcher.wait(60) == 0, "".join(said)
        for gone in (f"{url}/healthz", f"{server}/health"):  # everything it started stopped
            try:
                requests.get(gone, timeout=2)
                raise AssertionError(f"{gone} still answers after Ctrl-C")
            except requests.ConnectionError:
                pass
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
