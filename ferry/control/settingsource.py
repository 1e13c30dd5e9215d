"""Settings from the configuration server, turned into a daemon's settings dataclass."""

from __future__ import annotations

import dataclasses
import logging
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ferry import settings as ferry_settings
from ferry.control.client import Client
from ferry.control.errors import ControlRefused

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")

log = logging.getLogger("ferry.control")


# -- settings ---------------------------------------------------------------------------


class SettingsSource(Generic[T]):
    """Builds a daemon's settings dataclass from ``GET /components/self/settings``.

    ``local`` holds what only the host knows (state directory, certificate
    paths) and wins over the server.  Keys the dataclass does not know (a
    newer server, ``storage`` which the grant covers) are dropped and logged
    once; types and ranges are checked as for a TOML file.  Keys the schema
    names in ``LOCAL_ONLY`` (an agent's hooks, which run as root, and its
    control socket) are never taken from the server: only the host sets them.
    """

    def __init__(
        self,
        client: Client,
        schema: type[T],
        local: dict[str, Any] | None = None,
        adapt: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.client = client
        self.schema = schema
        self.local = dict(local or {})
        self.adapt = adapt
        self._ignored: set[str] = set()
        self._refused: set[str] = set()

    @property
    def source(self) -> str:
        """How errors name these settings."""
        return f"{self.client.server}/components/self/settings"

    def fetch_raw(self) -> dict[str, Any] | None:
        """The server's settings with the local keys filled in, not yet checked.

        None when the server answers 409: nothing is assigned to this
        component yet (an agent whose machine is not protected, a master
        target without disks); a ``protect`` command will follow.
        """
        try:
            raw = self.client.settings()
        except ControlRefused as exc:
            if exc.status != 409:
                raise
            log.info("%s", exc.fields.get("message"))
            return None
        local_only: frozenset[str] = getattr(self.schema, "LOCAL_ONLY", frozenset())
        for key in sorted(local_only & raw.keys()):
            if key not in self._refused:
                self._refused.add(key)
                log.warning(
                    "ignoring %s from the configuration server: only this host sets it", key
                )
        raw = {k: v for k, v in raw.items() if v is not None and k not in local_only}
        raw = {**raw, **self.local}
        return self.adapt(raw) if self.adapt else raw

    def build(self, raw: dict[str, Any]) -> T:
        """Check ``raw`` and build the dataclass; ConfigError naming the key on any problem."""
        known = _known_only(raw, self.schema, "", self._dropped)
        return ferry_settings.from_mapping(known, self.schema, source=self.source)

    def fetch(self) -> T:
        """Fetch and build the settings; ControlRefused if nothing is assigned yet."""
        raw = self.fetch_raw()
        if raw is None:
            raise ControlRefused(
                call="GET /components/self/settings", message="nothing assigned yet", status=409
            )
        return self.build(raw)

    def _dropped(self, key: str) -> None:
        if key not in self._ignored:
            self._ignored.add(key)
            log.debug("ignoring setting %s from the configuration server", key)


def _known_only(raw: Any, schema: type, prefix: str, dropped: Callable[[str], None]) -> Any:
    """``raw`` without the keys ``schema`` (and its nested dataclasses) does not declare."""
    if not isinstance(raw, dict):
        return raw
    hints = typing.get_type_hints(schema)
    out = {}
    for key, value in raw.items():
        if key not in hints:
            dropped(f"{prefix}{key}")
            continue
        inner = _dataclass_in(hints[key])
        if inner is not None and isinstance(value, list):
            value = [_known_only(v, inner, f"{prefix}{key}[].", dropped) for v in value]
        elif inner is not None:
            value = _known_only(value, inner, f"{prefix}{key}.", dropped)
        out[key] = value
    return out


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field holds (directly, in a list or optional), if any."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        found = _dataclass_in(arg)
        if found is not None:
            return found
    return None
