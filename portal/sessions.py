"""Server-side sessions and the sign-in rate limit.

The browser holds only a random session id (the cookie); the operator
tokens it signed in with stay in this process's memory, so a restart signs
everyone out and no token ever reaches the browser, a URL or a log.  Each
session has its own CSRF token, which every form carries and every POST must
echo (compared in constant time).
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from portal import defaults


@dataclass
class Session:
    """One browser's sign-in: the tenants it may see, with their operator tokens."""

    id: str
    csrf: str
    created: float
    seen: float
    tokens: dict[str, str] = field(default_factory=dict)
    """Tenant id → operator token (never sent to the browser)."""
    current: str | None = None
    principal: str | None = None
    """Who signed in: the Entra principal's name, or None for a local sign-in."""
    flash: dict[str, str] | None = None
    """A message for the next page (the outcome of an action)."""
    apis: dict = field(default_factory=dict, repr=False)
    """Tenant id → its portal.api.Api, kept so connections to the server are reused."""

    @property
    def signed_in(self) -> bool:
        return bool(self.tokens)

    def csrf_ok(self, offered: str | None) -> bool:
        """True if ``offered`` is this session's CSRF token."""
        return offered is not None and hmac.compare_digest(offered.encode(), self.csrf.encode())


class Sessions:
    """Sessions by id, expiring when idle or old; thread-safe."""

    def __init__(
        self,
        idle: float = defaults.SESSION_IDLE,
        max_age: float = defaults.SESSION_MAX_AGE,
        limit: int = defaults.SESSIONS_MAX,
    ) -> None:
        self.idle, self.max_age, self.limit = idle, max_age, limit
        self._by_id: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def new(self) -> Session:
        """A fresh anonymous session (it gets tokens at sign-in)."""
        now = time.time()
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now, now)
        with self._lock:
            self._by_id[session.id] = session
            while len(self._by_id) > self.limit:
                self._by_id.popitem(last=False)
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session with this id, or None (expired ones are dropped)."""
        if not session_id:
            return None
        now = time.time()
        with self._lock:
            session = self._by_id.get(session_id)
            if session is None:
                return None
            if now - session.seen > self.idle or now - session.created > self.max_age:
                del self._by_id[session_id]
                return None
            session.seen = now
            self._by_id.move_to_end(session_id)
            return session

    def renew(self, old: Session) -> Session:
        """The same sign-in under a new id and CSRF token (after sign-in: no session fixation)."""
        session = self.new()
        session.tokens, session.current, session.principal = (
            dict(old.tokens),
            old.current,
            old.principal,
        )
        self.drop(old.id)
        return session

    def drop(self, session_id: str) -> None:
        """Forget a session (sign-out)."""
        with self._lock:
            self._by_id.pop(session_id, None)


class SignInLimiter:
    """At most ``failures`` failed sign-ins per client address within ``window`` seconds."""

    def __init__(
        self, failures: int = defaults.SIGNIN_FAILURES, window: float = defaults.SIGNIN_WINDOW
    ) -> None:
        self.failures, self.window = failures, window
        self._seen: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, address: str) -> int:
        """Seconds until ``address`` may try again (0: it may now)."""
        now = time.monotonic()
        with self._lock:
            times = self._seen.get(address)
            if not times:
                return 0
            while times and now - times[0] > self.window:
                times.popleft()
            if len(times) < self.failures:
                return 0
            return int(self.window - (now - times[0])) + 1

    def failed(self, address: str) -> None:
        """Count a failed sign-in from ``address``."""
        with self._lock:
            self._seen.setdefault(address, deque()).append(time.monotonic())
