"""The portal as a process, and a headless Chromium to drive it (Playwright, Debian's browser).

:class:`PortalServer` runs ``python -m portal`` against a real configuration
server; :func:`chromium` launches Debian's ``/usr/bin/chromium`` through
Playwright (its own browser download is never used); :func:`signed_in`
signs a fresh browser context in with an operator token, through the page.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
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
