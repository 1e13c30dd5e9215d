"""What every handler needs: the storage account, the tables, the admin key, a clock.

Built once per process from app settings (environment variables, as the
Functions host provides them); tests and ``functions.local`` may install
their own with :func:`use`.  App settings name secrets, never hold them in
code: ``FERRY_STORAGE`` (or ``FERRY_STORAGE__accountName`` for managed
identity) and ``FERRY_ADMIN_KEY`` (a Key Vault reference in Azure).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import time
from collections.abc import Callable, Mapping

from azure.core.exceptions import AzureError

from functions.core.account import Account
from functions.core.errors import Unavailable
from functions.core.ratelimit import FailureLimiter
from functions.core.store import Store

STORAGE_SETTING = "FERRY_STORAGE"
"""App setting holding the storage connection string (or the prefix of identity settings)."""

ADMIN_KEY_SETTING = "FERRY_ADMIN_KEY"
"""App setting holding the admin key that may create tenants."""

ADMIN_KEY_MIN = 16
"""Shortest admin key accepted, in characters."""

AUTH_FAILURES_SETTING = "FERRY_AUTH_FAILURES_PER_MINUTE"
"""App setting: failed authentications one client address may make per minute (default 30)."""

AUTH_FAILURES_DEFAULT = 30


@dataclasses.dataclass
class Context:
    """The account, its tables, the admin key's digest and the clock (seconds since the epoch)."""

    account: Account
    store: Store
    admin_key_sha256: bytes | None
    clock: Callable[[], float] = time.time
    auth_failures: FailureLimiter = dataclasses.field(
        default_factory=lambda: FailureLimiter(AUTH_FAILURES_DEFAULT)
    )

    def now(self) -> float:
        """The current time, in seconds since the epoch."""
        return self.clock()


def settings_problem(env: Mapping[str, str]) -> str | None:
    """One line naming what is wrong with the app settings, or None."""
    if not env.get(STORAGE_SETTING) and not env.get(f"{STORAGE_SETTING}__accountName"):
        return (
            f"app setting {STORAGE_SETTING} (a storage connection string) or "
            f"{STORAGE_SETTING}__accountName (managed identity) is not set"
        )
    key = env.get(ADMIN_KEY_SETTING, "")
    if key and len(key) < ADMIN_KEY_MIN:
        return f"app setting {ADMIN_KEY_SETTING} is shorter than {ADMIN_KEY_MIN} characters"
    return None


def from_settings(env: Mapping[str, str], clock: Callable[[], float] = time.time) -> Context:
    """Build the context from app settings and create missing tables and containers."""
    problem = settings_problem(env)
    if problem:
        raise Unavailable(f"the configuration server is not configured: {problem}")
    if env.get(STORAGE_SETTING):
        account = Account.from_connection_string(env[STORAGE_SETTING])
    else:
        account = Account.from_identity(env, STORAGE_SETTING)
    key = env.get(ADMIN_KEY_SETTING)
    digest = hashlib.sha256(key.encode()).digest() if key else None
    limit = int(env.get(AUTH_FAILURES_SETTING) or AUTH_FAILURES_DEFAULT)
    ctx = Context(account, Store(account.tables), digest, clock, FailureLimiter(limit))
    try:
        ctx.store.ensure_tables()
    except AzureError as exc:
        raise Unavailable(f"storage is unavailable ({type(exc).__name__})")
    return ctx


_current: Context | None = None
_lock = threading.Lock()


def current() -> Context:
    """The process's context, built from the environment on first use."""
    global _current
    with _lock:
        if _current is None:
            _current = from_settings(os.environ)
        return _current


def use(ctx: Context | None) -> None:
    """Install ``ctx`` as the process's context (None: rebuild from the environment)."""
    global _current
    with _lock:
        _current = ctx


def settings_problem_now() -> str | None:
    """What keeps this process from serving (missing app settings), or None; no storage call."""
    if _current is not None:
        return None
    return settings_problem(os.environ)
