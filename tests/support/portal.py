"""The portal as a process, and a headless Chromium to drive it (Playwright, Debian's browser).

:class:`PortalServer` runs ``python -m portal`` against a real configuration
server; :func:`chromium` launches Debian's ``/usr/bin/chromium`` through
Playwright (its own browser download is never used); :func:`signed_in`
signs a fresh browser context in with an operator token, through the page.
:class:`ShownSteps` runs the registration page's commands as shown, with
the host's directories moved under a test's own.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import requests

from devkit.azurite import free_port

ROOT = Path(__file__).resolve().parent.parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",  # the tests run as root
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


class PortalServer:
    """``python -m portal`` on a free port of 127.0.0.1."""

    def __init__(self, base: Path, server_url: str, ca: str | None, **env: str) -> None:
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.base / f"portal-{self.port}.log"
        self.args = [
            sys.executable,
            "-m",
            "portal",
            "--server",
            server_url,
            "--port",
            str(self.port),
        ]
        if ca:
            self.args += ["--ca", ca]
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> PortalServer:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"portal exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/healthz", timeout=1).ok:
                    return self
            time.sleep(0.2)
        raise RuntimeError(f"portal did not answer: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def logged(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def chromium():
    """A headless Debian Chromium under Playwright; fails (never skips) if it is missing."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is not installed; `make setup` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def signed_in(browser, portal: PortalServer, token: str, width: int = 1280):
    """A new browser context and page, signed in through the sign-in form."""
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    page.goto(f"{portal.url}/signin")
    page.fill("#token", token)
    page.click("button:has-text('Sign in')")
    return context, page


def shoot(page, name: str) -> None:
    """Save a screenshot for the README when FERRY_PORTAL_SCREENSHOTS names a directory."""
    where = os.environ.get("FERRY_PORTAL_SCREENSHOTS")
    if not where:
        return
    out = ROOT / where
    out.mkdir(parents=True, exist_ok=True)
    for width in (1280, 390):
        page.set_viewport_size({"width": width, "height": 900})
        page.screenshot(path=str(out / f"{name}-{width}.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 900})


class ShownSteps:
    """The registration page's steps (``#step-<name>`` blocks), run as an operator would.

    The host's directories (``/etc/ferry``, ``/var/lib/ferry``) move under
    ``root``; the installed ``ferry`` and Python become this checkout's
    (the install step itself is checked by :meth:`check_install`, not run).
    """

    def __init__(self, page, root: Path) -> None:
        from portal import defaults

        self.root = Path(root)
        self.blocks = {
            name: page.inner_text(f"#step-{name}").strip()
            for name in ("install", "pki", "register", "start", "ansible")
            if page.locator(f"#step-{name}").count()
        }
        self._venv, self._etc = defaults.HOST_VENV, defaults.HOST_CONFIG_DIR
        self._state = defaults.HOST_STATE_DIR

    def here(self, text: str) -> str:
        """``text`` with the host's paths and programs made this test's."""
        ferry = f"{shlex.quote(sys.executable)} -m ferrycli"
        text = text.replace(f"{self._venv}/bin/python", shlex.quote(sys.executable))
        text = text.replace(f"{self._venv}/bin/ferry", ferry)
        text = re.sub(r"^ferry ", ferry + " ", text, flags=re.M)
        for path in (self._etc, self._state):
            text = text.replace(path, str(self.root / path.lstrip("/")))
        return text

    def run(self, name: str, stdin: str = "", cwd: Path | None = None) -> str:
        """Run block ``name`` in bash (``-eu``), as pasted; its output."""
        self.root.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", self.here(self.blocks[name])],
            input=stdin, cwd=cwd or self.root, capture_output=True, text=True, timeout=120,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert done.returncode == 0, f"step {name} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def certificates(self, ca_machine: Path) -> None:
        """The certificate step where the CA is kept, then its output copied to the host."""
        ca_machine.mkdir(parents=True, exist_ok=True)
        self.run("pki", cwd=ca_machine)
        issue = shlex.split(self.blocks["pki"].splitlines()[1])
        made = ca_machine / issue[issue.index("--out-dir") + 1]
        shutil.copytree(made, self.root / self._etc.lstrip("/") / "pki")  # scp -r, as the page says

    def start_argv(self) -> list[str]:
        """The start step's command line (one line), ready for Popen."""
        (line,) = self.blocks["start"].splitlines()
        return shlex.split(self.here(line))

    def check_install(self) -> None:
        """Every ``-c`` lock file exists and pins every requirement of the extras installed."""
        (venv, pip) = self.blocks["install"].splitlines()
        assert venv.split()[:3] == ["python3", "-m", "venv"]
        words = shlex.split(pip)
        assert words[1:3] == ["install", "-c"], pip
        locks = [words[i + 1] for i, w in enumerate(words) if w == "-c"]
        pinned = set()
        for lock in locks:
            for line in (ROOT / lock).read_text().splitlines():
                if "==" in line and not line.startswith("#"):
                    pinned.add(_name(line.split("==")[0]))
        (target,) = [w for w in words if w.startswith(".[")]
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        wanted = list(project["dependencies"])
        for extra in target[2:-1].split(","):
            wanted += project["optional-dependencies"][extra]  # KeyError: no such extra
        missing = {_name(re.split(r"[<>=!~; \[]", r)[0]) for r in wanted} - pinned
        assert not missing, f"{pip}: not pinned by {locks}: {sorted(missing)}"


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", requirement.strip()).lower()
