"""Settings of the process server (a TOML file; see docs/design.md).

The storage connection string is never in the file: ``storage_env`` names
the environment variable that holds it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from ferry import records, segment
from ferry import settings as ferry_settings
from ferry.errors import ConfigError
from ferry.settings import positive
from processserver import defaults

_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclasses.dataclass
class Settings:
    """Everything the process server needs; the configuration server will supply the same shape."""

    ca: str
    """CA certificate (PEM) that agents' certificates must chain to."""
    cert: str
    """The process server's certificate (PEM)."""
    key: str
    """The process server's private key (PEM)."""
    state_dir: str
    """Holds ``spool/`` (batches waiting for upload), ``quarantine/`` and ``status.json``."""
    listen: str = defaults.LISTEN
    """``host:port`` to accept agents on."""
    spool_limit_bytes: int = defaults.SPOOL_LIMIT_BYTES
    """Above this many spooled bytes (segments, compressed) agents are made to wait, in bytes."""
    upload_threads: int = defaults.UPLOAD_THREADS
    """Threads uploading segments (1-64); each connection packs its own batches."""
    bandwidth_limit: int = defaults.BANDWIDTH_LIMIT
    """Cap on segment bytes uploaded, in bytes per second (0 = unlimited)."""
    compression_level: int = defaults.COMPRESSION_LEVEL
    """zstd level of segment bodies: 1 to 22, or -7 to -1 (faster, larger)."""
    cipher: str = segment.CIPHER
    """What segments are sealed with and which of Ferry's records agents get: ``aegis-256``
    (AEGIS-256; an agent that offers only AES-256-GCM records, an earlier version, gets
    those), or ``aes-256-gcm`` (FIPS 140-approved: segments and every agent's records in
    AES-256-GCM, which master targets and agents of earlier versions read and speak)."""
    segment_key_file: str | None = None
    """Hex 32-byte key every segment is sealed with (``cipher``); wins over segment_key."""
    segment_key: str | None = None
    """The same, as 64 hex digits (server mode: the tenant's current key, from the server)."""
    allow_unsealed: bool = False
    """Upload segments unsealed when no key is set (off: a process server without a key
    refuses to start)."""
    storage_env: str = defaults.STORAGE_ENV
    """Environment variable holding the storage connection string (never put it in the file)."""
    state_poll_interval: float = defaults.STATE_POLL_INTERVAL
    """How often the master target's disk states are read, in seconds."""
    tenant: str | None = None
    """The one tenant served (server mode: the process server's own); None accepts any
    tenant its agents' certificates are bound to."""
    agents: dict[str, list[str]] | None = None
    """Machine → its registered disks (server mode: from the configuration server); an agent
    may send only for these. None: any disk its hello names."""

    def sealing_key(self, where: str) -> bytes | None:
        """The key segments are sealed with; ConfigError if there is none and that is not allowed."""
        key = segment.load_key(self.segment_key_file)
        if key is None and self.segment_key:
            key = segment.parse_key(self.segment_key, f"{where}: segment_key")
        if key is None and not self.allow_unsealed:
            raise ConfigError(path=where, problem="no segment key: set segment_key_file (or "
                              "allow_unsealed = true to upload unauthenticated segments)")  # fmt: skip
        return key

    def validate(self) -> str | None:
        """Problem line, or None when the settings are usable."""
        if parse_address(self.listen) is None:
            return f"listen must be host:port with a port of 1-65535, not {self.listen!r}"
        if not _ENV_NAME_RE.match(self.storage_env):
            return f"storage_env must be an environment variable name, not {self.storage_env!r}"
        if not -7 <= self.compression_level <= 22 or self.compression_level == 0:
            return f"compression_level must be -7 to -1 (fast) or 1 to 22, not {self.compression_level}"
        if self.cipher not in segment.CIPHERS:
            return f"cipher must be {' or '.join(segment.CIPHERS)}, not {self.cipher!r}"
        if not 1 <= self.upload_threads <= 64:
            return f"upload_threads must be 1-64, not {self.upload_threads}"
        if self.bandwidth_limit < 0:
            return f"bandwidth_limit must be 0 (unlimited) or more, not {self.bandwidth_limit}"
        return positive(
            spool_limit_bytes=self.spool_limit_bytes,
            state_poll_interval=self.state_poll_interval,
        )

    @property
    def record_protocols(self) -> list[str]:
        """Ferry's record protocols agents may get here, most preferred first (``cipher``)."""
        if self.cipher == "aes-256-gcm":
            return ["ferry-records-1"]
        return list(records.SUITES)

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` to listen on."""
        address = parse_address(self.listen)
        assert address is not None, "validate() accepted it"
        return address

    @property
    def spool_dir(self) -> Path:
        """Where accepted batches wait for upload."""
        return Path(self.state_dir) / "spool"

    @property
    def status_path(self) -> Path:
        """Where the status file is written."""
        return Path(self.state_dir) / "status.json"


def parse_address(text: str) -> tuple[str, int] | None:
    """``(host, port)`` from ``host:port`` (``[v6]:port`` too); None if malformed."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return None
    return host, int(port)


def load(path: str | Path) -> Settings:
    """Read and check the settings file; ConfigError naming the file and key on any problem."""
    settings = ferry_settings.load(path, Settings)
    for key in ("ca", "cert", "key"):
        file = getattr(settings, key)
        if not os.access(file, os.R_OK):
            raise ConfigError(path=path, problem=f"{key}: cannot read {file}")
    return settings


def connection_string(settings: Settings, path: str | Path) -> str:
    """The storage connection string from the environment; ConfigError if it is not set."""
    value = os.environ.get(settings.storage_env, "").strip()
    if not value:
        raise ConfigError(
            path=path,
            problem=f"environment variable {settings.storage_env} (storage_env) is not set; "
            "it must hold the storage connection string",
        )
    return value
