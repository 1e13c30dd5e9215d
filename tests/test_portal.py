"""The portal in a real browser, against the real configuration server on Azurite.

Headless Chromium (Debian's) driven by Playwright signs in, switches tenants,
creates a passphrase and registers a component with the command the page
shows, watches the overview refresh by itself, acknowledges an alert; and
is refused a form without its CSRF token, another tenant's pages, and a
sixth wrong token in a row.  The whole migration (protect, test failover,
cutover) is in test_portal_end_to_end.py (root).
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import sys
import time
from pathlib import Path

import pytest
import requests
from cryptography import x509
from support.config_server import serve_config
from support.portal import ROOT, PortalServer, ShownSteps, chromium, shoot, signed_in

from agent import main as agent_main
from ferry import control
from ferry.control.client import Client

pytestmark = [pytest.mark.browser]


@pytest.fixture(scope="module")
def config_server(tmp_path_factory):
    yield from serve_config(tmp_path_factory, tls=True)


@pytest.fixture(scope="module")
def portal(config_server, tmp_path_factory):
    made = PortalServer(
        tmp_path_factory.mktemp("portal"), config_server.url, config_server.ca,
        FERRY_PORTAL_INSTALL_CA=config_server.ca,
    ).start()  # fmt: skip
    yield made
    made.stop()


@pytest.fixture(scope="module")
def browser():
    with chromium() as launched:
        yield launched


def live_text(page) -> str:
    return page.inner_text("[data-live]")


def test_an_operator_sees_only_its_tenants_and_switches_between_them(
    config_server, portal, browser, tmp_path
):
    a, b = (
        config_server.tenant("pa" + os.urandom(3).hex()),
        config_server.tenant("pb" + os.urandom(3).hex()),
    )
    a.register(
        "agent", "web01", disks=[{"id": "web01-disk0", "device": "/dev/null", "size": 1 << 20}]
    )
    context, page = signed_in(browser, portal, a.token)
    assert page.url == f"{portal.url}/t/{a.tenant}/"
    assert "web01" in live_text(page)

    # A second token adds its tenant to the same session; the switcher moves between them.
    page.click("text=Add tenant")
    page.fill("#token", b.token)
    page.click("button:has-text('Sign in')")
    assert page.url == f"{portal.url}/t/{b.tenant}/"
    assert "web01" not in live_text(page) and "No machine is registered yet" in live_text(page)
    page.select_option("#tenant-switch", a.tenant)  # portal.js submits on change
    page.wait_for_url(f"{portal.url}/t/{a.tenant}/")
    assert "web01" in live_text(page)
    context.close()

    # B's operator alone: A's pages answer 404 as if they did not exist, and say nothing.
    context, page = signed_in(browser, portal, b.token)
    for path in (f"/t/{a.tenant}/", f"/t/{a.tenant}/machines/web01", f"/t/{a.tenant}/jobs",
                 f"/t/{a.tenant}/live/overview", "/t/no-such-tenant/"):  # fmt: skip
        answer = page.goto(portal.url + path)
        assert answer.status == 404, path
        assert "web01" not in page.content()
    context.close()


def test_a_form_without_its_csrf_token_is_refused(config_server, portal, browser):
    op = config_server.tenant("pc" + os.urandom(3).hex())
    op.register(
        "agent", "db01", disks=[{"id": "db01-disk0", "device": "/dev/null", "size": 1 << 20}]
    )
    op.register("process-server", "ps1", listen="127.0.0.1:9")  # protect needs both to exist
    op.register("master-target", "mt1")
    context, page = signed_in(browser, portal, op.token)
    page.goto(f"{portal.url}/t/{op.tenant}/machines/db01")
    page.click("text=Protect…")
    token = page.get_attribute("form[action$='/protect'] input[name=csrf]", "value")
    action = f"{portal.url}/t/{op.tenant}/machines/db01/protect"
    # The browser's own cookie goes along; only the form's token is missing or wrong.
    for form in ({"key": "portal-x1"}, {"key": "portal-x2", "csrf": token[:-2] + "xx"}):
        answer = context.request.post(action, form=form, max_redirects=0)
        assert answer.status == 403, answer.status
        assert "expired or did not come from this portal" in answer.text()

    def protects() -> list:  # (registrations' passphrases are recorded as jobs too)
        return [j for j in op.call("GET", "/jobs")["jobs"] if j["kind"] == "protect"]

    assert protects() == []  # nothing reached the server
    # The same form with its token goes through, and the server records the job as asked.
    page.select_option("#master_target", "mt-mt1")
    page.fill("#rpo_threshold_s", "90")
    page.click("button:has-text('Protect db01')")
    page.wait_for_selector(".flash.ok")
    (job,) = protects()
    assert (job["kind"], job["master_target"], job["rpo_threshold_s"]) == ("protect", "mt-mt1", 90)
    context.close()


def test_headers_and_the_session_cookie(config_server, portal, browser):
    op = config_server.tenant("pd" + os.urandom(3).hex())
    context, page = signed_in(browser, portal, op.token)
    answer = page.goto(f"{portal.url}/t/{op.tenant}/")
    headers = answer.headers
    csp = headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["cache-control"] == "no-store"
    (cookie,) = context.cookies()
    assert (cookie["httpOnly"], cookie["secure"], cookie["sameSite"]) == (True, True, "Strict")
    assert op.token not in json.dumps(context.storage_state())  # the browser never holds it
    assert "<script>" not in page.content()  # no inline script at all
    context.close()
    assert op.token not in portal.logged()


def test_a_passphrase_from_the_page_registers_a_component_live(
    config_server, portal, browser, tmp_path
):
    op = config_server.tenant("pe" + os.urandom(3).hex())
    context, page = signed_in(browser, portal, op.token)
    page.click("nav >> text=Register")
    page.check("input[value=agent]")
    page.fill("#name", "app01")
    page.fill("#device", "/dev/null")
    page.click("button:has-text('Create passphrase')")
    passphrase = page.inner_text("#passphrase").strip()
    steps = ShownSteps(page, tmp_path / "host")
    assert passphrase not in " ".join(steps.blocks.values())  # read from the terminal
    steps.check_install()  # from the lock file, with the extra the agent needs
    overview = context.new_page()
    overview.goto(f"{portal.url}/t/{op.tenant}/")
    assert "app01" not in live_text(overview)
    # The steps as shown: certificates where the CA is kept, then register on the host.
    steps.certificates(tmp_path / "ca-machine")
    said = steps.run("register", stdin=passphrase + "\n")
    assert "registered ag-app01" in said
    creds = tmp_path / "host" / "etc" / "ferry" / "agent.json"
    assert json.loads(creds.read_text())["component_id"] == "ag-app01"
    # The start command parses as the agent's and names the files the steps made.
    argv = steps.start_argv()
    assert argv[:3] == [sys.executable, "-m", "agent"]
    args = agent_main.parse_args(argv[3:])
    assert args.server_credentials == str(creds)
    local = agent_main.local_settings(args)
    for what in ("ca", "cert", "key"):
        assert Path(local[what]).is_file(), (what, local)
    assert Path(local["state_dir"]).is_relative_to(tmp_path / "host")
    pem = Path(local["cert"]).read_bytes()  # bound to this tenant and machine
    cert = x509.load_pem_x509_certificate(pem)
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {f"urn:ferry:tenant:{op.tenant}", "urn:ferry:machine:app01"} <= set(
        uris.get_values_for_type(x509.UniformResourceIdentifier)
    )
    # The Ansible alternative: the controller's playbook, limited to this host, with
    # variables the roles read (each is a default some role derives its own from).
    ansible = shlex.split(steps.blocks["ansible"])
    assert ansible[0] == ".venv-controller/bin/ansible-playbook"
    assert (ROOT / ansible[ansible.index("-i") + 2]).name == "site.yml"
    assert (ROOT / "playbooks" / "site.yml").is_file() and ansible[
        ansible.index("-l") + 1
    ] == "app01"
    defaults_text = "".join(p.read_text() for p in (ROOT / "roles").glob("*/defaults/main.yml"))
    for i, word in enumerate(ansible):
        if word == "-e":
            variable = ansible[i + 1].split("=")[0]
            assert f"{{{{ {variable} " in defaults_text, f"no role reads {variable}"
    # The overview shows it without a reload (portal.js refreshes the live part).
    overview.wait_for_selector("[data-live] >> text=app01", timeout=15_000)
    # The passphrase was shown once: it is not on any page now, and it cannot register again.
    page.goto(f"{portal.url}/t/{op.tenant}/register")
    assert passphrase not in page.content()
    with pytest.raises(control.errors.ControlRefused):
        control.client.register(config_server.url, op.tenant, passphrase, "agent", "app01",
                                ca=config_server.ca)  # fmt: skip
    context.close()


def test_a_passphrase_from_the_page_registers_only_the_component_it_names(
    config_server, portal, browser
):
    op = config_server.tenant("pk" + os.urandom(3).hex())
    context, page = signed_in(browser, portal, op.token)
    page.goto(f"{portal.url}/t/{op.tenant}/register")
    page.check("input[value=process-server]")
    page.fill("#name", "ps7")
    page.fill("#listen", "127.0.0.1:9")
    page.click("button:has-text('Create passphrase')")
    passphrase = page.inner_text("#passphrase").strip()
    assert "registers process-server ps7 only" in page.inner_text(".steps")
    for kind, name, extra in (("process-server", "ps8", {"listen": "127.0.0.1:9"}),
                              ("master-target", "ps7", {})):  # fmt: skip
        with pytest.raises(control.errors.ControlRefused) as refused:
            control.client.register(config_server.url, op.tenant, passphrase, kind, name,
                                    ca=config_server.ca, **extra)  # fmt: skip
        assert refused.value.status == 403 and "this passphrase is for ps-ps7" in str(
            refused.value.fields.get("message")
        )
    creds = control.client.register(config_server.url, op.tenant, passphrase, "process-server",
                                     "ps7", ca=config_server.ca, listen="127.0.0.1:9")  # fmt: skip
    assert creds.component_id == "ps-ps7"
    # A process server without the address agents connect to gets no passphrase at all.
    page.goto(f"{portal.url}/t/{op.tenant}/register")
    page.check("input[value=process-server]")
    page.fill("#name", "ps9")
    page.click("button:has-text('Create passphrase')")
    assert "host:port" in page.inner_text(".flash.error")
    assert page.locator("#passphrase").count() == 0
    context.close()


def test_an_alert_is_acknowledged_from_the_alerts_page(config_server, portal, browser, tmp_path):
    op = config_server.tenant("pf" + os.urandom(3).hex())
    creds = op.register(
        "agent", "web02", disks=[{"id": "web02-disk0", "device": "/dev/null", "size": 1 << 20}]
    )
    op.register("process-server", "ps1", listen="127.0.0.1:9")
    op.register("master-target", "mt1")
    op.protect("web02")  # RPO alerts watch protected machines
    Client(creds).report_disk("web02-disk0", {"phase": "replicating", "rpo_s": 900})
    deadline = time.monotonic() + 30
    while not op.call("GET", "/alerts?open=true")["alerts"] and time.monotonic() < deadline:
        time.sleep(0.5)  # the monitoring timer runs every 2 s here
    assert op.call("GET", "/alerts?open=true")["alerts"], "no RPO alert was raised"
    context, page = signed_in(browser, portal, op.token)
    page.click("nav >> text=Alerts")
    row = page.locator("tr", has_text="web02-disk0")
    assert "open" in row.inner_text()
    row.locator("button:has-text('Acknowledge')").click()
    page.wait_for_selector("text=acknowledged by portal operator")
    shoot(page, "alerts")
    (alert,) = op.call("GET", "/alerts")["alerts"]
    assert alert["acknowledged_by"] == "portal operator" and alert["acknowledged_at"]
    assert alert["cleared_at"] is None  # acknowledging does not clear it
    context.close()


def test_sign_in_is_rate_limited(config_server, browser, tmp_path):
    op = config_server.tenant("pg" + os.urandom(3).hex())
    portal = PortalServer(tmp_path, config_server.url, config_server.ca).start()
    try:
        context = browser.new_context()
        page = context.new_page()
        page.goto(f"{portal.url}/signin")
        for attempt in range(5):
            page.fill("#token", f"op.{op.tenant}.wrong{attempt}")
            page.click("button:has-text('Sign in')")
            assert "did not accept that token" in page.content()
        page.fill("#token", op.token)  # even the right token now waits
        with page.expect_response(lambda r: r.url.endswith("/signin")) as answer:
            page.click("button:has-text('Sign in')")
        assert answer.value.status == 429
        assert "Too many failed sign-ins" in page.content()
        assert int(answer.value.headers["retry-after"]) > 0
        context.close()
    finally:
        portal.stop()


def test_entra_principal_maps_to_its_tenants(config_server, tmp_path):
    a, b = (
        config_server.tenant("ph" + os.urandom(3).hex()),
        config_server.tenant("pi" + os.urandom(3).hex()),
    )
    principals = tmp_path / "principals.json"
    principals.write_text(json.dumps({"alice@contoso.example": [a.tenant]}))
    env = {"FERRY_PORTAL_ENTRA": "1", "FERRY_PORTAL_PRINCIPALS": str(principals),
           f"FERRY_PORTAL_TOKEN_{a.tenant.upper()}": a.token,
           f"FERRY_PORTAL_TOKEN_{b.tenant.upper()}": b.token}  # fmt: skip
    portal = PortalServer(tmp_path, config_server.url, config_server.ca, **env).start()
    try:
        claims = {"auth_typ": "aad", "name_typ": "preferred_username", "claims": [
            {"typ": "preferred_username", "val": "alice@contoso.example"}]}  # fmt: skip
        header = {"X-MS-CLIENT-PRINCIPAL": base64.b64encode(json.dumps(claims).encode()).decode()}
        http = requests.Session()
        answer = http.get(f"{portal.url}/", headers=header)
        assert answer.status_code == 200 and f"Machines of {a.tenant}" in answer.text
        # Signing out is App Service's: a link to its logout, no form of the portal's own.
        assert 'href="/.auth/logout?' in answer.text and 'action="/signout"' not in answer.text
        assert http.get(f"{portal.url}/t/{b.tenant}/", headers=header).status_code == 404
        # Without the header (not through App Service authentication) nothing is shown.
        assert "Machines of" not in requests.get(f"{portal.url}/t/{a.tenant}/").text
        assert requests.get(f"{portal.url}/signin").status_code == 404  # local sign-in is off
    finally:
        portal.stop()


def test_an_unreachable_configuration_server_gives_a_clear_page(browser, tmp_path):
    from devkit.azurite import free_port

    portal = PortalServer(tmp_path, f"http://127.0.0.1:{free_port()}", None).start()
    try:
        context = browser.new_context()
        page = context.new_page()
        page.goto(f"{portal.url}/signin")
        page.fill("#token", "op.nowhere.secret")
        with page.expect_response(lambda r: r.url.endswith("/signin")) as answer:
            page.click("button:has-text('Sign in')")
        assert answer.value.status == 502
        assert "configuration server cannot be reached" in page.inner_text("main")
        assert "op.nowhere.secret" not in portal.logged()
        context.close()
    finally:
        portal.stop()


def test_pages_work_without_javascript_and_from_the_keyboard(config_server, portal, browser):
    op = config_server.tenant("pj" + os.urandom(3).hex())
    op.register(
        "agent", "kb01", disks=[{"id": "kb01-disk0", "device": "/dev/null", "size": 1 << 20}]
    )
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    page.goto(f"{portal.url}/signin")
    page.wait_for_function("document.activeElement.id === 'token'")  # autofocus
    page.keyboard.type(op.token)
    page.keyboard.press("Enter")  # the form posts without any script
    page.wait_for_url(f"{portal.url}/t/{op.tenant}/")
    assert "kb01" in page.inner_text("main")
    page.keyboard.press("Tab")  # the first stop is the skip link, then the pages
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Overview"
    page.goto(f"{portal.url}/t/{op.tenant}/machines/kb01")
    assert "Recovery points, last hour" in page.inner_text("main")
    assert page.locator("svg.chart").count() == 2  # the charts are drawn on the server
    context.close()


def test_recorded_actions_show_their_detail_and_no_link_to_a_missing_machine(
    config_server, portal, browser
):
    op = config_server.tenant("pl" + os.urandom(3).hex())
    op.register(
        "agent", "web03", disks=[{"id": "web03-disk0", "device": "/dev/null", "size": 1 << 20}]
    )  # registering spent a passphrase: a job with machine "-"
    op.register("process-server", "ps1", listen="127.0.0.1:9")
    op.register("master-target", "mt1")
    op.protect("web03")  # a job with a real machine
    context, page = signed_in(browser, portal, op.token)
    page.click("nav >> text=Jobs")
    rows = page.locator("main tbody tr")
    assert rows.count() == 4
    passphrases = page.locator("tr", has_text="passphrase")
    assert passphrases.count() == 3
    assert "one-time passphrase made for" in passphrases.first.inner_text()
    assert page.locator("a[href$='/machines/-']").count() == 0
    assert page.locator("tr", has_text="protect").locator("a[href$='/machines/web03']").count()
    # Every link on the page leads somewhere: the jobs, the machine, the frame's pages.
    links = {a.get_attribute("href") for a in page.locator("a[href^='/']").all()}
    for link in links:
        answer = context.request.get(portal.url + link)
        assert answer.status == 200, (link, answer.status)
    # A recorded action's own page names no machine either.
    passphrases.first.locator("a").first.click()
    assert "passphrase" in page.inner_text("h1") and page.locator("h1 a").count() == 0
    context.close()


READABLE = ("overview", "machine", "jobs", "register", "alerts")


def test_every_page_is_readable_without_scrolling_sideways(config_server, portal, browser):
    op = config_server.tenant("pm" + os.urandom(3).hex())
    creds = op.register(
        "agent", "wide-machine-name-01",
        disks=[{"id": "wide-machine-name-01-disk0", "device": "/dev/null", "size": 1 << 20}],
    )  # fmt: skip
    op.register("process-server", "ps1", listen="127.0.0.1:9")
    op.register("master-target", "mt1")
    op.protect("wide-machine-name-01")
    Client(creds).report_disk("wide-machine-name-01-disk0", {"phase": "replicating", "rpo_s": 900})
    context, page = signed_in(browser, portal, op.token)
    base = f"{portal.url}/t/{op.tenant}"
    pages = {
        "overview": f"{base}/", "machine": f"{base}/machines/wide-machine-name-01",
        "jobs": f"{base}/jobs", "register": f"{base}/register", "alerts": f"{base}/alerts",
    }  # fmt: skip
    assert set(pages) == set(READABLE)
    for name, url in pages.items():
        page.set_viewport_size({"width": 1280, "height": 900})
        page.goto(url)
        if name == "register":  # with the longest content it has: the steps, after a passphrase
            page.fill("#name", "wide-machine-name-02")
            page.fill("#device", "/dev/disk/by-id/scsi-3600224801234567890abcdef01234567")
            page.click("button:has-text('Create passphrase')")
            page.wait_for_selector("#step-start")
        for width in (1280, 390):  # the same page laid out again, as a phone would
            page.set_viewport_size({"width": width, "height": 900})
            wide = page.evaluate("document.documentElement.scrollWidth")
            assert wide <= width, f"{name} is {wide} px wide at {width} px"
    context.close()


def _post_routes() -> list[str]:
    """Every POST route of the portal, from the app itself (so a new one is covered)."""
    from portal.app import create_app
    from portal.settings import Settings

    app = create_app(Settings(server="https://config.invalid"))
    return sorted(r.path for r in app.app.routes if "POST" in (getattr(r, "methods", None) or ()))


@pytest.fixture(scope="module")
def csrf_victim(config_server, portal, browser):
    """A signed-in operator with a machine, a process server and a test failover's job."""
    op = config_server.tenant("pn" + os.urandom(3).hex())
    op.register(
        "agent", "vic01", disks=[{"id": "vic01-disk0", "device": "/dev/null", "size": 1 << 20}]
    )
    op.register("process-server", "ps1", listen="127.0.0.1:9")
    op.register("master-target", "mt1")
    job = op.protect("vic01")
    context, page = signed_in(browser, portal, op.token)
    yield op, context, job["job_id"]
    context.close()


@pytest.mark.parametrize("route", _post_routes())
def test_every_form_without_its_csrf_token_is_refused(csrf_victim, portal, route):
    op, context, job_id = csrf_victim
    path = (route.replace("{tenant}", op.tenant).replace("{machine}", "vic01")
            .replace("{job}", job_id).replace("{alert}", "rpo.vic01-disk0.1"))  # fmt: skip
    assert "{" not in path, f"no value for a parameter of {route}"
    form = {"key": "portal-csrf1", "confirm": "vic01", "kind": "agent", "name": "evil01",
            "token": op.token, "tenant": op.tenant, "process_server": "ps-ps1"}  # fmt: skip
    jobs_before = op.call("GET", "/jobs")["jobs"]
    for csrf in ({}, {"csrf": "not-the-token"}):
        answer = context.request.post(portal.url + path, form={**form, **csrf}, max_redirects=0)
        assert answer.status == 403, (path, answer.status)
        assert "expired or did not come from this portal" in answer.text()
    assert op.call("GET", "/jobs")["jobs"] == jobs_before  # nothing reached the server
    # ... and the session is still signed in (sign-out was refused too).
    assert context.request.get(f"{portal.url}/t/{op.tenant}/jobs").status == 200
