"""Settings of the mobility agent (a TOML file; see docs/design.md)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from agent import defaults
from ferry.naming import check_id
from ferry.settings import positive


@dataclasses.dataclass
class DiskSettings:
    """One protected disk."""

    id: str
    device: str
    mountpoint: str | None = None
    """An extra filesystem to freeze; those mounted from the disk, its partitions and
    volumes are found at each freeze (agent.disks.filesystems_on)."""


@dataclasses.dataclass
class Settings:
    """Everything the agent needs; in server mode the configuration server supplies it."""

    LOCAL_ONLY: ClassVar[frozenset[str]] = frozenset({"pre_hook", "post_hook", "control_socket"})
    """Keys only the host may set (hooks run as root; the socket's file is replaced at start):
    the local settings file, or in server mode the command line."""

    tenant: str
    machine: str
    process_server: str
    ca: str
    cert: str
    key: str
    state_dir: str
    disks: list[DiskSettings]
    server_name: str | None = None
    control_socket: str | None = None
    tracker: str = "auto"
    block_size: int = defaults.BLOCK_SIZE
    resync_block_size: int = defaults.RESYNC_BLOCK_SIZE
    batch_bytes: int = defaults.BATCH_BYTES
    sync_batch_bytes: int = defaults.SYNC_BATCH_BYTES
    window: int = defaults.WINDOW
    pass_interval: float = defaults.PASS_INTERVAL
    idle_tag_interval: float = defaults.IDLE_TAG_INTERVAL
    freeze_after: float = defaults.FREEZE_AFTER
    freeze_timeout: float = defaults.FREEZE_TIMEOUT
    trace_buffer_kb: int = defaults.TRACE_BUFFER_KB
    pre_hook: str | None = None
    post_hook: str | None = None
    hook_timeout: float = defaults.HOOK_TIMEOUT
    app_tag_interval: float = defaults.APP_TAG_INTERVAL
    verify_interval: float = defaults.VERIFY_INTERVAL
    verify_chunk_bytes: int = defaults.VERIFY_CHUNK_BYTES

    def validate(self) -> str | None:
        """Problem line, or None when the settings are usable."""
        for kind, value in [("tenant", self.tenant), ("machine", self.machine)] + [
            ("disk id", d.id) for d in self.disks
        ]:
            problem = check_id(kind, value)
            if problem:
                return problem
        if not self.disks:
            return "disks must list at least one disk"
        if len({d.id for d in self.disks}) != len(self.disks):
            return "disk ids must be unique"
        host, _, port = self.process_server.rpartition(":")
        if not host or not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
            return f"process_server must be host:port with a port of 1-65535, not {self.process_server!r}"
        if self.tracker not in ("auto", "tracefs", "scan"):
            return f"tracker must be auto, tracefs or scan, not {self.tracker!r}"
        if self.block_size < 512 or self.block_size & (self.block_size - 1):
            return f"block_size must be a power of two >= 512, not {self.block_size}"
        if self.resync_block_size % self.block_size:
            return "resync_block_size must be a multiple of block_size"
        for name in ("batch_bytes", "sync_batch_bytes"):
            value = getattr(self, name)
            if not self.block_size <= value <= defaults.BATCH_BYTES_MAX:
                return f"{name} must be at least block_size and at most 64 MiB, not {value}"
        for name in ("app_tag_interval", "verify_interval"):
            if not getattr(self, name) >= 0:
                return f"{name} must be 0 (off) or a number of seconds, not {getattr(self, name)}"
        chunk = self.verify_chunk_bytes
        if chunk < self.block_size or chunk % self.block_size or chunk > 64 << 20:
            return "verify_chunk_bytes must be a multiple of block_size, at most 64 MiB"
        return positive(
            window=self.window,
            pass_interval=self.pass_interval,
            idle_tag_interval=self.idle_tag_interval,
            freeze_after=self.freeze_after,
            freeze_timeout=self.freeze_timeout,
            trace_buffer_kb=self.trace_buffer_kb,
            hook_timeout=self.hook_timeout,
        )

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` of the process server."""
        host, _, port = self.process_server.rpartition(":")
        return host.strip("[]"), int(port)
