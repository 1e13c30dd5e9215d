"""The portal: Ferry's web pages for operators, one tenant at a time.

Pages are rendered on the server (Jinja2) and work without JavaScript;
``static/portal.js`` only refreshes the live parts (``data-live``) and copies
commands.  Every read and every action is a call to the configuration
server's operator API (``docs/api.md``) with the signed-in tenant's token:
the server records each action as a job or command, and the portal keeps
nothing but sessions.

URLs are ``/t/<tenant>/...``; a tenant the session did not sign in to
answers 404, like one that does not exist.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import shlex
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ferry import __version__, naming, tokens
from ferry.control.errors import ControlRefused, ControlUnavailable
from portal import charts, defaults
from portal.api import Api, new_key
from portal.sessions import Session, Sessions, SignInLimiter
from portal.settings import Settings
from portal.web import (
    HERE,
    Refused,
    SecurityHeaders,
    checked_form,
    clear_cookie,
    client_address,
    entra_principal,
    redirect,
    render,
    session_of,
    set_cookie,
)

log = logging.getLogger("ferry.portal")

TERMINAL = {"protected", "cutover-complete", "cleaned", "failed"}
"""Job states after which nothing more happens by itself."""

RECORDED = "-"
"""The machine of a job that records an action done at once (a passphrase, an acknowledgement)."""


class NotSignedIn(Exception):
    """The request needs a signed-in session."""


class Portal:
    """The pages, bound to one configuration server."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sessions = Sessions()
        self.limiter = SignInLimiter()

    # -- sessions and tenants -----------------------------------------------------------

    def session(self, request: Request) -> Session | None:
        """The request's session; behind Entra, made from the principal's header."""
        session = session_of(request)
        if not self.settings.entra:
            return session
        name, ids = entra_principal(request)
        if name is None:
            return None
        if session is None or session.principal != name:
            session = self.sessions.new()
            session.principal = name
            for principal in ids:
                for tenant in self.settings.principals.get(principal, []):
                    token = self.settings.tenant_tokens.get(tenant)
                    if token:
                        session.tokens[tenant] = token
            session.current = min(session.tokens, default=None)
            request.state.new_session = session
        return session

    def api(self, request: Request, tenant: str) -> tuple[Session, Api]:
        """The tenant's API for this session; NotSignedIn, or 404 if the session lacks it."""
        session = self.session(request)
        if session is None or not session.signed_in:
            raise NotSignedIn()
        if not naming.ID_RE.match(tenant) or tenant not in session.tokens:
            raise Refused(404, "There is no such page.")
        session.current = tenant
        api = session.apis.get(tenant)
        if api is None or api.token_digest != _digest(session.tokens[tenant]):
            api = session.apis[tenant] = Api(
                self.settings.server, self.settings.verify, tenant, session.tokens[tenant]
            )
        return session, api

    def page(
        self, request: Request, session: Session, template: str, code: int = 200, **context: Any
    ) -> Response:
        """A full page with the frame's context (tenants, CSRF token, flash)."""
        flash, session.flash = session.flash, None
        response = render(
            template, code, session=session, tenants=sorted(session.tokens), tenant=session.current,
            csrf=session.csrf, flash=flash, path=request.url.path, version=__version__,
            refresh=defaults.REFRESH_INTERVAL, entra=self.settings.entra, **context,
        )  # fmt: skip
        new = getattr(request.state, "new_session", None)
        return set_cookie(response, new) if new else response

    # -- sign-in ------------------------------------------------------------------------

    async def home(self, request: Request) -> Response:
        session = self.session(request)
        if session is None or not session.signed_in:
            return redirect("/signin")
        return redirect(f"/t/{session.current or min(session.tokens)}/")

    async def signin_form(self, request: Request) -> Response:
        if self.settings.entra:
            raise Refused(404, "Sign in through your organisation's account.")
        session = session_of(request) or self.sessions.new()
        response = render("signin.html", csrf=session.csrf, session=session, error=None,
                          tenants=sorted(session.tokens), tenant=session.current, flash=None,
                          path="/signin", version=__version__, refresh=0, entra=False)  # fmt: skip
        return set_cookie(response, session)

    async def signin(self, request: Request) -> Response:
        if self.settings.entra:
            raise Refused(404, "Sign in through your organisation's account.")
        session = session_of(request)
        form = await checked_form(request, session)
        assert session is not None  # checked_form refused a request without one
        address = client_address(request)
        wait = self.limiter.retry_after(address)
        if wait:
            raise Refused(429, f"Too many failed sign-ins. Try again in {wait} seconds.",
                          {"Retry-After": str(wait)})  # fmt: skip
        token = str(form.get("token", "")).strip()
        tenant = _token_tenant(token)
        error = None
        if tenant is None:
            error = "That is not an operator token (op.<tenant>.<secret>)."
        else:
            try:
                await Api(self.settings.server, self.settings.verify, tenant, token).status()
            except ControlRefused as exc:
                error = ("The configuration server did not accept that token."
                         if exc.status in (401, 403, 404) else str(exc.fields.get("message")))  # fmt: skip
        if error:
            self.limiter.failed(address)
            log.info("sign-in refused from %s", address)
            return render("signin.html", 401, csrf=session.csrf, session=session,
                          error=error, tenants=sorted(session.tokens), tenant=session.current,
                          flash=None, path="/signin", version=__version__, refresh=0,
                          entra=False)  # fmt: skip
        assert tenant is not None  # no error: the token named its tenant
        session.tokens[tenant] = token
        session.current = tenant
        session = self.sessions.renew(session)  # a new id once signed in
        log.info("signed in to tenant %s from %s", tenant, address)
        return set_cookie(redirect(f"/t/{tenant}/"), session)

    async def signout(self, request: Request) -> Response:
        session = session_of(request)
        await checked_form(request, session)
        assert session is not None  # checked_form refused a request without one
        self.sessions.drop(session.id)
        return clear_cookie(redirect("/signin"))

    async def switch(self, request: Request) -> Response:
        session = self.session(request)
        form = await checked_form(request, session)
        assert session is not None  # checked_form refused a request without one
        tenant = form.get("tenant", "")
        if tenant not in session.tokens:
            raise Refused(404, "There is no such page.")
        session.current = tenant
        return redirect(f"/t/{tenant}/")

    # -- overview -----------------------------------------------------------------------

    async def overview_data(self, api: Api) -> dict[str, Any]:
        status = await api.status()
        alerts = [a for a in await api.alerts() if a["cleared_at"] is None]
        jobs = await api.jobs()
        for machine in status["machines"]:
            machine["alerts"] = [a for a in alerts if _about(a, machine)]
            machine["jobs"] = [j for j in jobs if j["machine"] == machine["machine"]
                               and j["state"] not in TERMINAL][:3]  # fmt: skip
            for disk in machine["disks"]:
                disk.update(_progress(disk))
        return {"status": status, "alerts": alerts, "now": time.time()}

    async def overview(self, request: Request) -> Response:
        session, api = self.api(request, request.path_params["tenant"])
        return self.page(request, session, "overview.html", **await self.overview_data(api))

    async def overview_live(self, request: Request) -> Response:
        session, api = self.api(request, request.path_params["tenant"])
        return render("_overview.html", tenant=session.current, **await self.overview_data(api))

    # -- machine ------------------------------------------------------------------------

    async def machine_data(self, api: Api, machine_id: str) -> dict[str, Any]:
        if not naming.ID_RE.match(machine_id):
            raise Refused(404, "There is no such machine.")
        status = await api.status()
        machine = next((m for m in status["machines"] if m["machine"] == machine_id), None)
        if machine is None:
            raise Refused(404, "There is no such machine.")
        for disk in machine["disks"]:
            disk.update(_progress(disk))
        now = time.time()
        window = await self.chart_points(api, machine, now - defaults.RPO_WINDOW)
        points = window["points"]
        jobs = await api.jobs(machine_id)
        commands = []
        for job in jobs[:5]:
            job["history"] = (await api.job(job["job_id"])).get("history", [])
        for job in jobs[:3]:
            for cid in _command_ids(job):
                try:
                    commands.append(await api.command(cid))
                except ControlRefused:
                    pass
        alerts = [a for a in await api.alerts() if _about(a, machine)]
        threshold = next((j.get("rpo_threshold_s") for j in jobs if j["kind"] == "protect"), None)
        since = window["since"]
        return {
            "machine": machine, "points": (points + window["earlier"])[:20], "jobs": jobs,
            "commands": commands, "alerts": alerts, "now": now, "threshold": threshold,
            "timeline": charts.timeline(points, now, since),
            "rpo": charts.rpo_chart(points + window["earlier"], threshold or 60, now, since),
            "active": {j["kind"]: j for j in jobs if j["state"] not in TERMINAL},
            "test_failover": next((j for j in jobs if j["kind"] == "test-failover"
                                   and j["state"] == "ready" and j.get("driven")), None),
        }  # fmt: skip

    async def chart_points(self, api: Api, machine: dict[str, Any], start: float):
        """The last hour's recovery points for the charts: ``points`` (the window, thinned),
        ``earlier`` (in force at ``start``) and ``since`` (when the data starts, if late)."""
        every = charts.slice_seconds(len(machine["disks"]))
        answer = await api.recovery_points(machine["machine"], defaults.RECOVERY_POINTS,
                                           since=start, every=every)  # fmt: skip
        points = answer["recovery_points"]
        # A full listing lost its oldest rows: the data then starts at the oldest one listed.
        earlier = [] if len(points) >= defaults.RECOVERY_POINTS else answer.get("earlier", [])
        return {"points": points, "earlier": earlier,
                "since": charts.data_start(points, earlier, start)}  # fmt: skip

    async def machine(self, request: Request) -> Response:
        session, api = self.api(request, request.path_params["tenant"])
        data = await self.machine_data(api, request.path_params["machine"])
        return self.page(request, session, "machine.html", key=new_key(), **data)

    async def machine_live(self, request: Request) -> Response:
        session, api = self.api(request, request.path_params["tenant"])
        data = await self.machine_data(api, request.path_params["machine"])
        return render("_machine.html", tenant=session.current, csrf=session.csrf, key=new_key(),
                      **data)  # fmt: skip

    # -- actions ------------------------------------------------------------------------

    async def protect_form(self, request: Request) -> Response:
        session, api = self.api(request, request.path_params["tenant"])
        data = await self.machine_data(api, request.path_params["machine"])
        components = (await api.status())["components"]
        return self.page(request, session, "protect.html", key=new_key(), **data,
                         process_servers=[c for c in components if c["kind"] == "process-server"],
                         master_targets=[c for c in components if c["kind"] == "master-target"])  # fmt: skip

    async def protect(self, request: Request) -> Response:
        session, api = self.api(request, request.path_params["tenant"])
        form = await checked_form(request, session)
        assert session is not None  # checked_form refused a request without one
        machine = request.path_params["machine"]
        choices = {
            "process_server": _component(form.get("process_server"), "process-server"),
            "master_target": _component(form.get("master_target"), "master-target"),
            "rpo_threshold_s": _seconds(form.get("rpo_threshold_s")),
        }
        await self.act(session, api.protect(machine, _key(form), **choices), f"protect {machine}",
                       f"Protection of {machine} started: the initial sync comes first.")  # fmt: skip
        return redirect(f"/t/{api.tenant}/machines/{machine}")

    async def test_failover(self, request: Request) -> Response:
        session, api = self.api(request, request.path_params["tenant"])
        form = await checked_form(request, session)
        assert session is not None  # checked_form refused a request without one
        machine = request.path_params["machine"]
        await self.act(session, api.failover(machine, "test-failover", _key(form)),
                       f"start a test failover of {machine}",
                       f"Test failover of {machine} started; replication goes on.")  # fmt: skip
        return redirect(f"/t/{api.tenant}/machines/{machine}")

    async def cleanup(self, request: Request) -> Response:
        session, api = self.api(request, request.path_params["tenant"])
        await checked_form(request, session)
        assert session is not None  # checked_form refused a request without one
        job = await self.act(session, api.cleanup(request.path_params["job"]),
                             "clean up the test failover", "Test failover cleanup started.")  # fmt: skip
        machine = (job or {}).get("machine")
        return redirect(
            f"/t/{api.tenant}/machines/{machine}" if machine else f"/t/{api.tenant}/jobs"
        )

    async def cutover_form(self, request: Request) -> Response:
        session, api = self.api(request, request.path_params["tenant"])
        data = await self.machine_data(api, request.path_params["machine"])
        return self.page(request, session, "cutover.html", key=new_key(), error=None, **data)

    async def cutover(self, request: Request) -> Response:
        session, api = self.api(request, request.path_params["tenant"])
        form = await checked_form(request, session)
        assert session is not None  # checked_form refused a request without one
        machine = request.path_params["machine"]
        if form.get("confirm", "").strip() != machine:
            data = await self.machine_data(api, machine)
            return self.page(request, session, "cutover.html", 422, key=_key(form),
                             error=f"Type {machine} exactly to confirm the cutover.",
                             **data)  # fmt: skip
        await self.act(session, api.failover(machine, "cutover", _key(form)),
                       f"start the cutover of {machine}", f"Cutover of {machine} started.")  # fmt: skip
        return redirect(f"/t/{api.tenant}/machines/{machine}")

    async def act(self, session: Session, call, what: str, done: str) -> dict[str, Any] | None:
        """Run an action; its outcome, or the server's refusal, is the next page's message."""
        try:
            result = await call
        except ControlRefused as exc:
            if exc.status in (401, 403):
                raise
            message = exc.fields.get("message")
            session.flash = {"kind": "error", "text": f"Could not {what}: {message}"}
            return None
        session.flash = {"kind": "ok", "text": done}
        return result

    # -- registration -------------------------------------------------------------------

    async def register_form(self, request: Request) -> Response:
        session, api = self.api(request, request.path_params["tenant"])
        return self.page(request, session, "register.html", passphrase=None, steps=None)

    async def register(self, request: Request) -> Response:
        session, api = self.api(request, request.path_params["tenant"])
        form = await checked_form(request, session)
        assert session is not None  # checked_form refused a request without one
        kind = form.get("kind", "agent")
        name = form.get("name", "").strip()
        problem = _registration_problem(kind, name, form)
        if problem:
            session.flash = {"kind": "error", "text": problem}
            return redirect(f"/t/{api.tenant}/register")
        # Bound to the component named: it registers that one only (docs/api.md).
        made = await api.passphrase(defaults.PASSPHRASE_TTL, kind, name)
        steps = _install_steps(self.settings, api.tenant, kind, name, form)
        log.info("a registration passphrase was made for tenant %s (%s %s)", api.tenant, kind, name)
        return self.page(request, session, "register.html", passphrase=made, steps=steps,
                         kind=kind, name=name)  # fmt: skip

    # -- alerts and jobs ----------------------------------------------------------------

    async def alerts(self, request: Request) -> Response:
        session, api = self.api(request, request.path_params["tenant"])
        return self.page(
            request, session, "alerts.html", alerts=await api.alerts(), now=time.time()
        )

    async def acknowledge(self, request: Request) -> Response:
        session, api = self.api(request, request.path_params["tenant"])
        await checked_form(request, session)
        assert session is not None  # checked_form refused a request without one
        by = session.principal or "portal operator"
        await self.act(session, api.acknowledge(request.path_params["alert"], by),
                       "acknowledge the alert", "Alert acknowledged.")  # fmt: skip
        return redirect(f"/t/{api.tenant}/alerts")

    async def jobs(self, request: Request) -> Response:
        session, api = self.api(request, request.path_params["tenant"])
        jobs = await api.jobs()
        # An action done at once (a passphrase, an acknowledgement) has no machine: what it
        # did is in its history, which the listing leaves out; read the newest few.
        recorded = [j for j in jobs if j["machine"] == RECORDED][: defaults.RECORDED_DETAILS]
        details = await asyncio.gather(*(self._detail(api, job) for job in recorded))
        for job, detail in zip(recorded, details, strict=True):
            job["detail"] = detail
        return self.page(request, session, "jobs.html", jobs=jobs, now=time.time())

    @staticmethod
    async def _detail(api: Api, job: dict[str, Any]) -> str | None:
        """The last step's detail of a job (None if it is gone meanwhile)."""
        try:
            history = (await api.job(job["job_id"])).get("history") or [{}]
        except ControlRefused:
            return None
        return history[-1].get("detail")

    async def job(self, request: Request) -> Response:
        session, api = self.api(request, request.path_params["tenant"])
        job_id = request.path_params["job"]
        if not job_id.startswith("job-") or not naming.ID_RE.match(job_id):
            raise Refused(404, "There is no such job.")
        job = await api.job(job_id)
        commands = []
        for cid in _command_ids(job):
            try:
                commands.append(await api.command(cid))
            except ControlRefused:
                pass
        return self.page(request, session, "job.html", job=job, commands=commands, now=time.time())

    async def health(self, request: Request) -> Response:
        return PlainTextResponse("ok")


# -- helpers ------------------------------------------------------------------------------


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _token_tenant(token: str) -> str | None:
    """The tenant an operator token belongs to (``op.<tenant>.<secret>``), or None."""
    claimed = tokens.claim(token)
    return claimed.tenant if claimed is not None and claimed.kind == "operator" else None


def _key(form: dict[str, str]) -> str:
    key = form.get("key", "")
    return key if key.startswith("portal-") and len(key) <= 64 and key[7:].isalnum() else new_key()


def _component(value: str | None, kind: str) -> str | None:
    """A component id of ``kind`` chosen in a form (None: let the server choose)."""
    value = (value or "").strip()
    return value if naming.ID_RE.match(value) and naming.component_kind(value) == kind else None


def _seconds(value: str | None) -> int | None:
    """A positive whole number of seconds from a form (None when empty or not one)."""
    value = (value or "").strip()
    return int(value) if value.isdigit() and 0 < int(value) <= 86400 else None


def _about(alert: dict[str, Any], machine: dict[str, Any]) -> bool:
    """True if an alert concerns this machine (its disks or its agent)."""
    subject = alert.get("subject") or ""
    return subject in {d["disk"] for d in machine["disks"]} | {
        f"{naming.KIND_PREFIX['agent']}-{machine['machine']}"
    }


def _progress(disk: dict[str, Any]) -> dict[str, Any]:
    """Percent done and seconds to go of a disk's current sync, when it can be told."""
    size, left, speed = disk.get("size"), disk.get("bytes_to_go"), disk.get("throughput")
    done = None
    if size and left is not None:
        done = max(0.0, min(100.0, 100.0 * (1 - left / size)))
    eta = left / speed if left and speed else (0 if left == 0 else None)
    return {"percent": done, "eta_s": eta}


def _command_ids(job: dict[str, Any]) -> list[str]:
    """Commands a job sent: protect's, and the steps of a cutover or test failover."""
    return ([job["command_id"]] if job.get("command_id") else []) + list(job.get("commands", []))


PARTS = {"agent": ("agent", "agent"), "process-server": ("processserver", "process-server"),
         "master-target": ("mastertarget", "master-target")}  # fmt: skip
"""Each kind's Python module and its extra in pyproject.toml (and lock file requirements/<extra>.txt)."""


def _install_steps(settings: Settings, tenant: str, kind: str, name: str, form) -> dict[str, Any]:
    """What an operator runs to install, certify, register and start a component on its host.

    The layout is the roles' (``/opt/ferry/venv``, ``/etc/ferry``,
    ``/var/lib/ferry``), so a host set up by hand and one set up by Ansible
    look alike; each step is a block of shell lines the page offers to copy.
    """
    module, extra = PARTS[kind]
    venv, etc, state = defaults.HOST_VENV, defaults.HOST_CONFIG_DIR, defaults.HOST_STATE_DIR
    creds, pki = f"{etc}/{kind}.json", f"{etc}/pki"
    locks = f"-c requirements/{extra}.txt" + ("" if kind == "agent" else " -c requirements/cli.txt")
    extras = extra if kind == "agent" else f"{extra},cli"  # the agent's extra has the ferry command
    steps: dict[str, Any] = {"install": [
        f"python3 -m venv {venv}",
        f"{venv}/bin/pip install {locks} '.[{extras}]'",
    ]}  # fmt: skip
    server = settings.install_server or settings.server
    ca = f" --ca {_shell_word(settings.install_ca)}" if settings.install_ca else ""
    register = (f"{venv}/bin/ferry register --server {_shell_word(server)}{ca} --tenant {tenant} "
                f"--kind {kind} --name {name}")  # fmt: skip
    start = f"{venv}/bin/python -m {module} --server-credentials {creds} --state-dir {state}/{kind}"
    if kind == "agent":
        device = _shell_word(form.get("device", "").strip() or "/dev/sdb")
        register += f" --disk {name}-disk0={device}"
        issue = f"--name agent --tenant {tenant} --machine {name}"
        start += f" --ca {pki}/ca.pem --cert {pki}/agent.pem --key {pki}/agent.key"
    elif kind == "process-server":
        listen = form.get("listen", "").strip()
        register += f" --listen {_shell_word(listen)}"
        issue = f"--name process-server --host {_shell_word(listen.rpartition(':')[0].strip('[]'))}"
        start += (
            f" --ca {pki}/ca.pem --cert {pki}/process-server.pem --key {pki}/process-server.key"
        )
    else:  # a master target talks to storage and the configuration server only: no certificate
        issue = ""
        if form.get("target_dir", "").strip():
            target_dir = _shell_word(form["target_dir"].strip())
            register += f" --target-dir {target_dir}"
            start += f" --targets-dir {target_dir}"
    if issue:
        steps["pki"] = [
            "ferry pki init ferry-ca  # once per deployment; an existing CA is kept",
            f"ferry pki issue --ca-dir ferry-ca --out-dir pki-{name} {issue}",
            f"cp ferry-ca/ca.pem pki-{name}/",
        ]
        steps["pki_copy"] = f"pki-{name}/ to {pki}/"
    steps["register"] = [
        f"install -d -m 0700 {etc}",
        "read -rs FERRY_PASSPHRASE && export FERRY_PASSPHRASE  # paste the passphrase",
        f"{register} --out {creds}",
    ]
    steps["start"] = [start]
    steps["ansible"] = [
        f".venv-controller/bin/ansible-playbook -i inventory/mysite playbooks/site.yml -l {name} "
        f"-e ferry_tenant={tenant} -e ferry_config_server_url={_shell_word(server)}"
    ]
    return steps


def _registration_problem(kind: str, name: str, form: dict[str, str]) -> str | None:
    """What is wrong with a registration form, in one sentence; None if nothing."""
    if kind not in PARTS or not naming.ID_RE.match(name):
        return "Choose a kind and a name of 1-40 lowercase letters, digits and single dashes."
    listen = form.get("listen", "").strip()
    if kind == "process-server" and not re.fullmatch(
        r"[A-Za-z0-9.:\[\]-]{1,200}:[0-9]{1,5}", listen
    ):
        return "Give the process server's address that agents connect to, as host:port."
    return None


def _shell_word(text: str) -> str:
    return shlex.quote(text[:200])


# -- the app ------------------------------------------------------------------------------


def create_app(settings: Settings) -> Any:
    """The portal as an ASGI app."""
    portal = Portal(settings)
    t = "/t/{tenant}"
    routes = [
        Route("/", portal.home),
        Route("/healthz", portal.health),
        Route("/signin", portal.signin_form, methods=["GET"]),
        Route("/signin", portal.signin, methods=["POST"]),
        Route("/signout", portal.signout, methods=["POST"]),
        Route("/switch", portal.switch, methods=["POST"]),
        Route(f"{t}/", portal.overview),
        Route(f"{t}/live/overview", portal.overview_live),
        Route(f"{t}/machines/{{machine}}", portal.machine),
        Route(f"{t}/live/machines/{{machine}}", portal.machine_live),
        Route(f"{t}/machines/{{machine}}/protect", portal.protect_form, methods=["GET"]),
        Route(f"{t}/machines/{{machine}}/protect", portal.protect, methods=["POST"]),
        Route(f"{t}/machines/{{machine}}/test-failover", portal.test_failover, methods=["POST"]),
        Route(f"{t}/machines/{{machine}}/cutover", portal.cutover_form, methods=["GET"]),
        Route(f"{t}/machines/{{machine}}/cutover", portal.cutover, methods=["POST"]),
        Route(f"{t}/register", portal.register_form, methods=["GET"]),
        Route(f"{t}/register", portal.register, methods=["POST"]),
        Route(f"{t}/alerts", portal.alerts),
        Route(f"{t}/alerts/{{alert}}/acknowledge", portal.acknowledge, methods=["POST"]),
        Route(f"{t}/jobs", portal.jobs),
        Route(f"{t}/jobs/{{job}}", portal.job),
        Route(f"{t}/jobs/{{job}}/cleanup", portal.cleanup, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers=_handlers(portal))
    app.state.sessions = portal.sessions
    app.state.portal = portal
    return SecurityHeaders(app)


def _handlers(portal: Portal) -> dict[Any, Any]:
    def error_page(request: Request, status: int, message: str, headers=None) -> Response:
        session = session_of(request)
        response = render("error.html", status, message=message, session=session,
                          tenants=sorted(session.tokens) if session else [],
                          tenant=session.current if session else None,
                          csrf=session.csrf if session else "", flash=None,
                          path=request.url.path, version=__version__, refresh=0,
                          entra=portal.settings.entra)  # fmt: skip
        response.headers.update(headers or {})
        return response

    async def refused(request: Request, exc: Refused) -> Response:
        return error_page(request, exc.status, exc.message, exc.headers)

    async def not_signed_in(request: Request, exc: NotSignedIn) -> Response:
        if request.method == "GET" and "/live/" not in request.url.path:
            return redirect("/signin")
        return error_page(request, 401, "Sign in first.")

    async def control_refused(request: Request, exc: ControlRefused) -> Response:
        if exc.status in (401, 403):  # the token was revoked or rotated
            session = session_of(request)
            tenant = request.path_params.get("tenant")
            if session and tenant in session.tokens:
                del session.tokens[tenant]
            return error_page(request, 401, "The configuration server no longer accepts this "
                              "tenant's token. Sign in again.")  # fmt: skip
        if exc.status == 404:
            return error_page(request, 404, "There is no such page.")
        return error_page(request, 409, str(exc.fields.get("message")))

    async def unavailable(request: Request, exc: ControlUnavailable) -> Response:
        log.warning("the configuration server is unavailable: %s", exc)
        return error_page(request, 502, "The configuration server cannot be reached; "
                          "this page will work again when it answers.")  # fmt: skip

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        return error_page(request, status, "There is no such page." if status == 404
                          else "That request is not allowed here.")  # fmt: skip

    return {Refused: refused, NotSignedIn: not_signed_in, ControlRefused: control_refused,
            ControlUnavailable: unavailable, 404: not_found, 405: not_found}  # fmt: skip
