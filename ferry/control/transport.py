"""The one HTTP transport to the configuration server: timeouts, retries, secrets kept out of errors.

The daemons' client and the ``ferry`` CLI both call through :class:`Transport`."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import requests

from ferry import __version__
from ferry.control import defaults
from ferry.control.errors import ControlRefused, ControlUnavailable, ControlUntrusted

# -- HTTP -------------------------------------------------------------------------------


class Transport:
    """JSON calls to one server with timeouts, retries and secrets kept out of errors."""

    def __init__(
        self, server: str, verify: str | bool, token: str | None = None, secrets: tuple = ()
    ) -> None:
        self.server = server.rstrip("/")
        self.verify = verify
        self._headers = {"User-Agent": f"ferry/{__version__}", "Accept": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._secrets = tuple(s for s in (token, *secrets) if s)
        self._local = threading.local()  # one requests.Session per thread
        self.timeout = (defaults.CONNECT_TIMEOUT, defaults.READ_TIMEOUT)

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.trust_env = True
        return session

    def call(self, method: str, path: str, body: Any = None, idempotent: bool = True) -> Any:
        """One API call; the answer's JSON (None for 204).

        Retries connection failures, timeouts and 5xx (a non-idempotent call
        only when the request cannot have reached the server).
        """
        what = f"{method} {path}"
        delay = defaults.BACKOFF_FIRST
        for attempt in range(1, defaults.ATTEMPTS + 1):
            try:
                answer = self._session().request(
                    method,
                    self.server + path,
                    json=body,
                    headers=self._headers,
                    timeout=self.timeout,
                    verify=self.verify,
                    allow_redirects=False,
                )
            except requests.exceptions.SSLError as exc:
                raise ControlUntrusted(server=self.server, problem=self._clean(_reason(exc)))
            except requests.RequestException as exc:
                if attempt == defaults.ATTEMPTS or not (idempotent or _not_sent(exc)):
                    raise ControlUnavailable(
                        server=self.server, problem=f"{what}: {self._clean(_reason(exc))}"
                    )
            else:
                if answer.status_code < 500:
                    return self._answer(what, answer)
                if attempt == defaults.ATTEMPTS or not idempotent:
                    raise ControlUnavailable(
                        server=self.server,
                        problem=f"{what}: HTTP {answer.status_code} {self._message(answer)}",
                    )
            time.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, defaults.BACKOFF_MAX)
        raise AssertionError("unreachable")

    def _answer(self, what: str, answer: requests.Response) -> Any:
        if answer.status_code >= 300:
            raise ControlRefused(
                call=what, message=self._message(answer), status=answer.status_code
            )
        if answer.status_code == 204 or not answer.content:
            return None
        try:
            return answer.json()
        except ValueError:
            raise ControlUnavailable(server=self.server, problem=f"{what}: answer is not JSON")

    def _message(self, answer: requests.Response) -> str:
        """One line from an error answer: the server's ``error``, else what the body allows."""
        try:
            error = answer.json().get("error")
        except (ValueError, AttributeError):
            error = None
        kind = answer.headers.get("Content-Type", "").split(";")[0].strip()
        if error:
            text = str(error)
        elif kind in ("", "text/plain") and answer.text.strip():
            text = answer.text.strip().splitlines()[0]
        elif kind and kind != "application/json":
            # HTML or XML: not the configuration server (a proxy, storage, a wrong port).
            text = f"{answer.reason or 'no reason'} ({kind}, not Ferry's JSON: is the URL right?)"
        else:
            text = answer.reason or "no reason given"
        return " ".join(self._clean(text).split())[:300]

    def _clean(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def _reason(exc: BaseException) -> str:
    """The innermost useful cause of a requests exception, one line."""
    cause: BaseException | None = exc
    while cause is not None:
        reason = getattr(cause, "reason", None)
        if isinstance(reason, BaseException):
            cause = reason
            continue
        if cause.args and isinstance(cause.args[0], BaseException):
            cause = cause.args[0]
            continue
        break
    text = str(cause or exc).strip().splitlines()
    return f"{type(cause or exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _not_sent(exc: requests.RequestException) -> bool:
    """True if the request cannot have reached the server (safe to retry anything)."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    if not isinstance(exc, requests.exceptions.ConnectionError):
        return False
    text = repr(exc)
    return "NewConnectionError" in text or "NameResolutionError" in text
