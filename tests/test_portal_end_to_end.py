"""A migration from the portal, click by click, to a verified cut-over disk (root).

The real stack: Azurite, ``python -m functions.local`` over HTTPS, the
portal, and the agent, process server and master target in server mode
replicating a loop device (ext4, tracked through tracefs).  In headless
Chromium the operator registers the three components with passphrases and
runs the steps the registration page shows (certificates, register, and the
start command, each "host" a directory of its own), protects the machine and watches
it reach ``replicating`` on the live page, runs a test failover and cleans
it up, and cuts over after typing the machine's name; the configuration
server runs both to their end through the master target's command queue.
The cut-over VHD's data must equal the source device.  A second tenant's
operator sees none of it.

``FERRY_PORTAL_SCREENSHOTS=docs/portal`` also saves the screenshots the
README shows, at 1280 and 390 pixels wide.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest
from support.config_server import serve_config
from support.daemons import Fleet, write_files
from support.portal import PortalServer, ShownSteps, chromium, shoot, signed_in

from devkit.embedded import digest

pytestmark = [pytest.mark.browser, pytest.mark.root, pytest.mark.tracefs, pytest.mark.slow]

MiB = 1 << 20
LIVE = 180_000  # ms: replication milestones, on two shared cores


@pytest.fixture(scope="module")
def config_server(tmp_path_factory):
    yield from serve_config(tmp_path_factory, tls=True)


@pytest.fixture
def portal(config_server, tmp_path):
    made = PortalServer(tmp_path / "portal", config_server.url, config_server.ca,
                        FERRY_PORTAL_INSTALL_CA=config_server.ca).start()  # fmt: skip
    yield made
    made.stop()


def register_from_page(page, portal, tenant: str, kind: str, name: str, hosts: Path, **fields):
    """Create a passphrase on the registration page and run its steps as shown, on a "host"
    of its own under ``hosts``: certificates where the CA is kept, register; the start
    command is returned for the fleet to run."""
    page.goto(f"{portal.url}/t/{tenant}/register")
    page.check(f"input[value={kind}]")
    page.fill("#name", name)
    for field, value in fields.items():
        page.fill(f"#{field}", value)
    page.click("button:has-text('Create passphrase')")
    passphrase = page.inner_text("#passphrase").strip()
    steps = ShownSteps(page, hosts / kind)
    steps.check_install()
    if "pki" in steps.blocks:
        steps.certificates(hosts / "ca-machine")  # one CA for the deployment
    else:
        assert kind == "master-target"  # the only one that needs no certificate
    steps.run("register", stdin=passphrase + "\n")
    return steps.root / "etc" / "ferry" / f"{kind}.json", steps.start_argv()


def test_a_machine_migrated_from_the_portal(config_server, portal, tmp_path, certs, loopdisk):
    size = 64 * MiB
    source = loopdisk(size, fs=True)
    write_files(source.mountpoint, 12, 256 * 1024, seed=7)
    machine = "pw" + uuid.uuid4().hex[:6]
    disk = f"{machine}-disk0"
    op = config_server.tenant("t" + uuid.uuid4().hex[:10])
    other = config_server.tenant("t" + uuid.uuid4().hex[:10])
    fleet = Fleet(tmp_path, op, certs, machine)
    try:
        with chromium() as browser:
            context, page = signed_in(browser, portal, op.token)
            base = f"{portal.url}/t/{op.tenant}"

            # Register the three components with the page's passphrases and steps, and start
            # each with the command the page shows.
            hosts, start = tmp_path / "hosts", {}
            fleet.creds["process-server"], start["process-server"] = register_from_page(
                page, portal, op.tenant, "process-server", "ps1", hosts,
                listen=f"127.0.0.1:{fleet.ps_port}",
            )  # fmt: skip
            fleet.creds["master-target"], start["master-target"] = register_from_page(
                page, portal, op.tenant, "master-target", "mt1", hosts,
                target_dir=str(tmp_path / "targets"),
            )  # fmt: skip
            fleet.creds["agent"], start["agent"] = register_from_page(
                page, portal, op.tenant, "agent", machine, hosts, device=source.device
            )  # fmt: skip
            shoot(page, "register")
            for kind in ("process-server", "master-target", "agent"):
                fleet.start(kind, start[kind])
            master_target = hosts / "master-target" / "var" / "lib" / "ferry" / "master-target"

            # Protect, then watch the live page reach replicating and protected.
            page.goto(f"{base}/machines/{machine}")
            page.click("text=Protect…")
            shoot(page, "protect")
            page.click(f"button:has-text('Protect {machine}')")
            page.wait_for_selector("[data-live] .phase >> text=replicating", timeout=LIVE)
            page.wait_for_selector("button:has-text('Test failover')", timeout=LIVE)
            fleet.alive()
            page.goto(f"{base}/")
            shoot(page, "overview")

            # Test failover: run by the configuration server; the clone is a fixed VHD.
            page.goto(f"{base}/machines/{machine}")
            page.click("button:has-text('Test failover')")
            page.wait_for_selector("button:has-text('Clean up test failover')", timeout=LIVE)
            clone = master_target / "test-failover" / machine / f"{disk}.vhd"
            info = subprocess.run(["qemu-img", "info", "-f", "vpc", "--output=json", str(clone)],
                                  check=True, capture_output=True, text=True)  # fmt: skip
            assert json.loads(info.stdout)["virtual-size"] >= size
            shoot(page, "machine")
            page.click("button:has-text('Clean up test failover')")
            page.wait_for_selector("[data-live] >> text=cleaned", timeout=LIVE)
            assert not clone.exists()

            # Cutover behind the machine's name; the application is stopped first.
            source.unmount()
            page.click("text=Cut over…")
            page.fill("#confirm", machine + "x")
            page.click(f"button:has-text('Cut over {machine}')")
            assert "exactly to confirm" in page.inner_text(".flash.error")
            shoot(page, "cutover")
            page.fill("#confirm", machine)
            page.click(f"button:has-text('Cut over {machine}')")
            page.wait_for_selector("[data-live] .title >> text=cut-over", timeout=LIVE)

            # The cut-over disk: a verified fixed VHD with exactly the source's bytes.
            out = master_target / "cutover" / machine
            manifest = json.loads((out / "manifest.json").read_text())
            assert manifest["verified"] and manifest["disks"][0]["checks"]["qemu"]
            # The master target checked it against the digest the agent took of the source.
            assert manifest["disks"][0]["expected_sha256"] == digest(source.device, size)
            assert digest(str(out / f"{disk}.vhd"), size) == digest(source.device, size)
            (job,) = [j for j in op.call("GET", "/jobs")["jobs"] if j["kind"] == "cutover"]
            states = [h["state"] for h in op.call("GET", f"/jobs/{job['job_id']}")["history"]]
            assert states == ["requested", "draining", "applied", "cutover-complete"]
            page.goto(f"{base}/jobs/{job['job_id']}")  # each step, and each command's outcome
            assert "verified against the source" in page.inner_text(".history")
            shoot(page, "job")
            page.click("nav >> text=Jobs")
            shoot(page, "jobs")
            context.close()

            # Another tenant's operator sees none of it, even by URL.
            context, page = signed_in(browser, portal, other.token)
            assert machine not in page.inner_text("main")
            for path in (f"/machines/{machine}", "/jobs", "/"):
                assert page.goto(base + path).status == 404
            context.close()
        assert "Traceback" not in portal.logged()
        assert op.token not in portal.logged()
    finally:
        fleet.close()
