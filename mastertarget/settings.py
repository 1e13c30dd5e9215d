"""The master target's settings file (TOML).

Example::

    tenant = "demo"
    state_dir = "/var/lib/ferry/master-target"
    segment_key_file = "/etc/ferry/segment.key"   # optional; then segments must be sealed
    storage_env = "FERRY_STORAGE"                 # variable holding the connection string
    lease_seconds = 60

    journal = true                                # older recovery points (docs/design.md)
    journal_keep_all_minutes = 60                 # every point this young
    journal_thin_every_minutes = 5                # then one per 5 minutes ...
    journal_window_hours = 24                     # ... for 24 hours (app-consistent: all)
    journal_budget_mib = 10240                    # at most this much; the oldest go first

    [[disks]]
    id = "web01-disk0"
    target = "/dev/sdc"                           # a block device or a (sparse) image file
    kind = "device"                               # optional: device, file or auto (the default)

Per disk the master target keeps ``<state_dir>/<disk>/cursor.json`` and
``<state_dir>/<disk>/staging/``; ``<state_dir>/status.json`` reports every disk.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ferry import naming, segment
from ferry.errors import ConfigError
from mastertarget import defaults
from mastertarget.journal import Policy


@dataclasses.dataclass
class DiskSettings:
    """One replicated disk: its id and the device or image file it is applied to."""

    id: str
    target: Path
    kind: str = "auto"
    """``device`` (must exist), ``file`` (created sparse if missing) or ``auto`` (either)."""
    size: int | None = None
    """The source disk's size in bytes, when known (server mode): a device must hold it."""


@dataclasses.dataclass
class Settings:
    """Everything an operator sets for one master target."""

    tenant: str
    state_dir: Path
    disks: list[DiskSettings]
    segment_key_file: str | None = None
    segment_keys: list[str] = dataclasses.field(default_factory=list)
    """More segment keys (64 hex digits each), as the configuration server hands them out:
    every key a segment in flight may be sealed with (a rotation)."""
    allow_unsealed: bool = False
    """Accept segments that are not encrypted and authenticated (off: they are refused)."""
    storage_env: str = defaults.STORAGE_ENV
    lease_seconds: int = defaults.LEASE_SECONDS
    journal: bool = True
    """Keep older recovery points (mastertarget/journal.py); off: only the latest tag."""
    journal_keep_all_minutes: float = defaults.JOURNAL_KEEP_ALL_MINUTES
    journal_thin_every_minutes: float = defaults.JOURNAL_THIN_EVERY_MINUTES
    journal_window_hours: float = defaults.JOURNAL_WINDOW_HOURS
    journal_budget_mib: int = defaults.JOURNAL_BUDGET_MIB

    def validate(self) -> str | None:
        """Return the first problem of these settings as one line, or None."""
        return (
            naming.check_id("tenant", self.tenant)
            or self._lease_problem()
            or self._journal_problem()
            or self._disks_problem()
        )

    def _journal_problem(self) -> str | None:
        for name in ("journal_keep_all_minutes", "journal_thin_every_minutes",
                     "journal_window_hours", "journal_budget_mib"):  # fmt: skip
            if getattr(self, name) < 0:
                return f"{name} must not be negative, not {getattr(self, name)}"
        return None

    def journal_policy(self) -> Policy | None:
        """The recovery journal's retention policy; None when the journal is off."""
        if not self.journal:
            return None
        return Policy(
            keep_all_s=self.journal_keep_all_minutes * 60,
            thin_every_s=self.journal_thin_every_minutes * 60,
            window_s=self.journal_window_hours * 3600,
            budget_bytes=self.journal_budget_mib << 20,
        )

    def _lease_problem(self) -> str | None:
        low, high = defaults.LEASE_MIN_SECONDS, defaults.LEASE_MAX_SECONDS
        if not low <= self.lease_seconds <= high:
            return f"lease_seconds must be between {low} and {high}, not {self.lease_seconds}"
        return None

    def _disks_problem(self) -> str | None:
        if not self.disks:
            return "disks must list at least one disk"
        ids: set[str] = set()
        targets: set[str] = set()
        for i, disk in enumerate(self.disks):
            problem = naming.check_id(f"disks[{i}].id", disk.id)
            if problem:
                return problem
            if disk.kind not in ("auto", "device", "file"):
                return f"disks[{i}].kind must be auto, device or file, not {disk.kind!r}"
            target = os.path.abspath(disk.target)
            if disk.id in ids:
                return f"disks[{i}].id {disk.id!r} is listed twice"
            if target in targets:
                return f"disks[{i}].target {str(disk.target)!r} is used by two disks"
            ids.add(disk.id)
            targets.add(target)
        return None

    def keyring(self) -> dict[str, bytes]:
        """Every segment key this master target holds, by key id (ConfigError if unreadable)."""
        keys = [segment.load_key(self.segment_key_file)]
        for text in self.segment_keys:
            keys.append(segment.parse_key(text, "segment_keys"))
        return segment.keyring(*keys)

    def disk(self, disk_id: str) -> DiskSettings:
        """The settings of disk ``disk_id``; KeyError if it is not configured."""
        for disk in self.disks:
            if disk.id == disk_id:
                return disk
        raise KeyError(disk_id)

    def connection_string(self, source: str | Path) -> str:
        """The storage connection string from the environment; ConfigError if unset."""
        value = os.environ.get(self.storage_env, "").strip()
        if not value:
            raise ConfigError(
                path=source,
                problem=f"environment variable {self.storage_env} (storage_env) is not set; "
                "it must hold the storage connection string",
            )
        return value
