"""Serve the configuration server without the Functions host: ASGI + an in-process timer.

    python -m functions.local --host 127.0.0.1 --port 7071 [--tls-cert C --tls-key K]

The ASGI app is built FROM the same ``FunctionApp`` that Azure indexes: every
HTTP function's route template and methods are read from its trigger
binding; a request is matched against the templates (Azure's syntax:
``tenants/{tenant}/jobs/{job_id}``, also ``{x?}``, ``{x:constraint}`` and
``{*rest}``), turned into a ``func.HttpRequest``, handed to the user function,
and its ``func.HttpResponse`` sent back.  Timer functions run in a thread
every ``--timer-interval`` seconds.  App settings come from the environment
(``FERRY_STORAGE``, ``FERRY_ADMIN_KEY``), as the Functions host provides them.

Unknown routes get 404, wrong methods 405, bodies over 1 MiB 413, all as
``{"error": ...}``; an exception escaping a function is logged (scrubbed of
secrets) and answered 500 as a last resort.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, quote

import azure.functions as func
from azure.functions.timer import TimerRequest

from ferry.errors import ConfigError, StorageUnavailable
from ferry.process import StopFlag, run_main, setup_logging
from functions import web
from functions.core import context, defaults
from functions.core.errors import ApiError
from functions.core.redact import RedactingFormatter

log = logging.getLogger("ferry.functions.local")


def indexed_functions(app: func.FunctionApp) -> list:
    """``app.get_functions()``, callable more than once.

    azure-functions 1.26 remembers the names it indexed and refuses a second
    call as duplicates; the host calls it once, but tests and this module may
    each build their own view of the same app.
    """
    app.functions_bindings = None
    return app.get_functions()


# -- routes --------------------------------------------------------------------------------

_PARAM = re.compile(r"^\{(\*?)([A-Za-z_][A-Za-z0-9_]*)(?::[^}]*?)?(\?)?\}$")


@dataclasses.dataclass
class Route:
    """One HTTP function: its template split into segments, its methods and its callable."""

    template: str
    segments: list[tuple[str, str, bool]]
    """(kind, text, optional): kind is ``lit``, ``param`` or ``rest``."""
    methods: frozenset[str]
    function: Callable[[func.HttpRequest], Any]
    name: str

    @classmethod
    def build(cls, template: str, methods, function, name: str) -> Route:
        segments = []
        for part in template.strip("/").split("/"):
            match = _PARAM.match(part)
            if match:
                kind = "rest" if match.group(1) else "param"
                segments.append((kind, match.group(2), bool(match.group(3))))
            else:
                segments.append(("lit", part.lower(), False))
        names = {str(getattr(m, "value", m)).upper() for m in (methods or [])}
        all_methods = {"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"}
        return cls(template, segments, frozenset(names or all_methods), function, name)

    def match(self, parts: list[str]) -> dict[str, str] | None:
        """Route parameters if ``parts`` (the path's segments) fit the template."""
        params: dict[str, str] = {}
        for i, (kind, text, optional) in enumerate(self.segments):
            if kind == "rest":
                params[text] = "/".join(parts[i:])
                return params
            if i >= len(parts):
                if optional and all(s[2] for s in self.segments[i:]):
                    return params
                return None
            if kind == "lit":
                if parts[i].lower() != text:
                    return None
            elif not parts[i]:
                return None
            else:
                params[text] = parts[i]
        return params if len(parts) == len(self.segments) else None

    @property
    def specificity(self) -> tuple[int, int]:
        """Sort key: more literal segments first (as ASP.NET routing prefers literals)."""
        return (-sum(k == "lit" for k, _, _ in self.segments), -len(self.segments))


def http_routes(app: func.FunctionApp) -> list[Route]:
    """Every HTTP function of ``app`` as a Route, most specific first."""
    routes = []
    for function in indexed_functions(app):
        trigger = function.get_trigger()
        if trigger is None or trigger.get_binding_name() != "httpTrigger":
            continue
        binding = trigger.get_dict_repr()
        template = binding.get("route") or function.get_function_name()
        routes.append(
            Route.build(template, binding.get("methods"), function.get_user_function(),
                        function.get_function_name())
        )  # fmt: skip
    routes.sort(key=lambda r: r.specificity)
    return routes


def timer_functions(app: func.FunctionApp) -> list[tuple[str, Callable[..., Any]]]:
    """(name, callable) of every timer function of ``app``."""
    found = []
    for function in indexed_functions(app):
        trigger = function.get_trigger()
        if trigger is not None and trigger.get_binding_name() == "timerTrigger":
            found.append((function.get_function_name(), function.get_user_function()))
    return found


# -- the ASGI app ---------------------------------------------------------------------------


def _error(status: int, message: str, headers: dict[str, str] | None = None):
    return web.json_response(status, {"error": message}, headers)


class AsgiApp:
    """An ASGI application serving the HTTP functions of a FunctionApp."""

    def __init__(self, app: func.FunctionApp, max_body: int = defaults.MAX_BODY) -> None:
        self.routes = http_routes(app)
        self.max_body = max_body

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        started = time.monotonic()
        body, too_large = await self._read_body(receive)
        response = await asyncio.get_running_loop().run_in_executor(
            None, self.dispatch, scope, body, too_large
        )
        await self._send(send, response, head=scope["method"] == "HEAD")
        log.info(
            "%s %s %d %.0f ms", scope["method"], _loggable_path(scope), response.status_code,
            (time.monotonic() - started) * 1000,
        )  # fmt: skip

    async def _lifespan(self, receive: Callable, send: Callable) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _read_body(self, receive: Callable) -> tuple[bytes, bool]:
        chunks, size, too_large = [], 0, False
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                too_large = True
            elif chunk:
                chunks.append(chunk)
            if not message.get("more_body"):
                break
        return b"".join(chunks), too_large

    def dispatch(self, scope: dict, body: bytes, too_large: bool = False) -> func.HttpResponse:
        """Route one request to its function and return the function's answer."""
        path = scope.get("path") or "/"
        parts = path.strip("/").split("/") if path.strip("/") else [""]
        method = scope["method"].upper()
        allowed: set[str] = set()
        for route in self.routes:
            params = route.match(parts)
            if params is None:
                continue
            lookup = "GET" if method == "HEAD" else method
            if lookup not in route.methods:
                allowed |= route.methods
                continue
            if too_large:
                return _error(413, f"the body is larger than {self.max_body} bytes")
            request = self._request(scope, route, params, body)
            try:
                response = route.function(request)
            except Exception as exc:  # last resort: the functions catch their own
                return web.internal_error(request, exc)
            if not isinstance(response, func.HttpResponse):
                return web.internal_error(request, TypeError(f"{route.name} returned no response"))
            return response
        if allowed:
            return _error(
                405, f"{method} is not allowed on {path[:100]} (allowed: {', '.join(sorted(allowed))})",
                {"Allow": ", ".join(sorted(allowed))},
            )  # fmt: skip
        return _error(404, f"no such route: {path[:100]}")

    def _request(self, scope: dict, route: Route, params: dict[str, str], body: bytes):
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope.get("headers", []):
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        client = scope.get("client")
        if client:  # as Azure's front end does: the peer's address goes last
            seen = headers.get("x-forwarded-for")
            headers["x-forwarded-for"] = f"{seen}, {client[0]}" if seen else str(client[0])
        query = scope.get("query_string", b"").decode("latin-1")
        query_params: dict[str, str] = {}
        for key, value in parse_qsl(query, keep_blank_values=True):
            query_params.setdefault(key, value)
        host = headers.get("host") or "localhost"
        url = f"{scope.get('scheme', 'http')}://{host}{quote(scope.get('path') or '/')}"
        if query:
            url += f"?{query}"
        return func.HttpRequest(
            scope["method"].upper(), url, headers=headers, params=query_params,
            route_params=params, body=body,
        )  # fmt: skip

    async def _send(self, send: Callable, response: func.HttpResponse, head: bool) -> None:
        body = response.get_body() or b""
        headers = [(k.lower().encode("latin-1"), str(v).encode("latin-1"))
                   for k, v in response.headers.items()]  # fmt: skip
        if response.mimetype and not any(k == b"content-type" for k, _ in headers):
            content_type = response.mimetype
            if response.charset:
                content_type += f"; charset={response.charset}"
            headers.append((b"content-type", content_type.encode("latin-1")))
        headers = [(k, v) for k, v in headers if k != b"content-length"]
        headers.append((b"content-length", str(0 if head else len(body)).encode()))
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": headers})  # fmt: skip
        await send({"type": "http.response.body", "body": b"" if head else body})


def _loggable_path(scope: dict) -> str:
    """The request path for the access log (never the query string), bounded."""
    return (scope.get("path") or "/")[:200]


def build(app: func.FunctionApp | None = None) -> AsgiApp:
    """The ASGI app of Ferry's FunctionApp (or of ``app``)."""
    if app is None:
        from functions.function_app import app as ferry_app

        app = ferry_app
    return AsgiApp(app)


# -- the in-process timer ------------------------------------------------------------------


class Timers:
    """Runs every timer function of an app every ``interval`` seconds, in one thread."""

    def __init__(self, app: func.FunctionApp, interval: float) -> None:
        self.functions = timer_functions(app)
        self.interval = interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ferry-timers", daemon=True)

    def start(self) -> Timers:
        self.thread.start()
        return self

    def run_once(self) -> None:
        """Call each timer function once; a failure is logged, never raised."""
        for name, function in self.functions:
            try:
                function(TimerRequest(past_due=False))
            except Exception as exc:
                log.error("timer %s failed: %s", name, type(exc).__name__)

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            self.run_once()


# -- the program -----------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m functions.local", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7071, help="port (0: any free port)")
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", help="private key of --tls-cert (PEM)")
    parser.add_argument(
        "--timer-interval", type=float, default=defaults.LOCAL_TIMER_INTERVAL,
        help=f"seconds between runs of the monitoring timer (default {defaults.LOCAL_TIMER_INTERVAL:g})",
    )  # fmt: skip
    parser.add_argument("--verbose", action="store_true", help="log debug messages")
    return parser.parse_args(argv)


def _check(args: argparse.Namespace) -> None:
    problem = context.settings_problem(os.environ)
    if problem:
        raise ConfigError(path="environment", problem=problem)
    if not os.environ.get(context.ADMIN_KEY_SETTING):
        log.warning("%s is not set: no tenant can be created", context.ADMIN_KEY_SETTING)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError(path="command line", problem="--tls-cert and --tls-key go together")
    for path in filter(None, (args.tls_cert, args.tls_key)):
        if not os.access(path, os.R_OK):
            raise ConfigError(path="command line", problem=f"cannot read {path}")
    if not 0 <= args.port <= 65535:
        raise ConfigError(path="command line", problem=f"--port must be 0-65535, not {args.port}")
    if args.timer_interval <= 0:
        raise ConfigError(path="command line", problem="--timer-interval must be over 0")


def _redact_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.setFormatter(
            RedactingFormatter(handler.formatter._fmt if handler.formatter else None)
        )


def serve(args: argparse.Namespace) -> int:
    """Run the ASGI server and the timer until interrupted."""
    import uvicorn

    _check(args)
    try:
        context.use(context.from_settings(os.environ))
    except ValueError:
        raise ConfigError(
            path="environment", problem="FERRY_STORAGE is not a valid connection string"
        )
    except ApiError as exc:
        raise StorageUnavailable(endpoint="FERRY_STORAGE", problem=exc.message)
    from functions.function_app import app

    asgi = AsgiApp(app)
    timers = Timers(app, args.timer_interval)
    scheme = "https" if args.tls_cert else "http"

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                port = self.servers[0].sockets[0].getsockname()[1] if self.servers else args.port
                host = f"[{args.host}]" if ":" in args.host else args.host
                log.info("listening on %s://%s:%d", scheme, host, port)
                timers.start()

    config = uvicorn.Config(
        asgi, host=args.host, port=args.port, ssl_certfile=args.tls_cert,
        ssl_keyfile=args.tls_key, log_level="info" if args.verbose else "warning", access_log=False,
        lifespan="off", timeout_graceful_shutdown=5,
    )  # fmt: skip
    server = Server(config)
    # uvicorn catches SIGTERM/SIGINT while serving, shuts down gracefully, then
    # re-raises the signal to the handler that was there before it: this one,
    # which only sets a flag, so a stopped server exits 0.
    StopFlag().install()
    try:
        server.run()
    finally:
        timers.stop.set()
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m functions.local``."""
    args = _parse(argv)
    setup_logging("config-server", args.verbose)
    _redact_logs()
    return run_main("config-server", lambda: serve(args))


if __name__ == "__main__":
    sys.exit(main())
