"""``<state_dir>/status.json``: what the process server is doing, rewritten every second.

Written atomically (temporary file and rename) so a reader never sees half
a file; not fsync'ed, because a status lost in a crash is rewritten a
second later.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ferry import __version__, durable
from processserver import defaults
from processserver.context import Context

log = logging.getLogger("ferry.processserver.status")


class StatusWriter:
    """Rewrites the status file until the server stops."""

    def __init__(self, ctx: Context, path: Path) -> None:
        self.ctx = ctx
        self.path = Path(path)
        self._last = (time.monotonic(), 0)
        self._rate = 0.0
        self._failing = False

    def run(self) -> None:
        """Thread body: write now and then every STATUS_INTERVAL seconds."""
        self.write()
        while not self.ctx.stopping.wait(defaults.STATUS_INTERVAL):
            self.write()

    def write(self) -> None:
        """Write the status file once; a failure is logged once, not every second."""
        try:
            durable.write_json(self.path, self.snapshot(), durable=False)
            self._failing = False
        except OSError as exc:
            if not self._failing:
                log.error("cannot write %s: %s", self.path, exc)
            self._failing = True

    def snapshot(self) -> dict[str, Any]:
        """The status as a JSON-able dict."""
        ctx = self.ctx
        counts = ctx.stats.snapshot()
        spool_bytes, spool_files = ctx.spool.usage()
        peers = ctx.peers.live()
        return {
            "component": "process-server",
            "version": __version__,
            "pid": os.getpid(),
            "time": time.time(),
            "started": ctx.stats.started,
            "listen": ctx.settings.listen,
            "spool": {
                "bytes": spool_bytes,
                "files": spool_files,
                "limit_bytes": ctx.settings.spool_limit_bytes,
                **filesystem_space(ctx.settings.state_dir),
            },
            **counts,
            "upload_bytes_per_second": self._throughput(counts["bytes_uploaded_compressed"]),
            "throttling": any(p.throttled for p in peers),
            "connections": len(peers),
            "agents": sorted(
                (p.describe() for p in peers if p.tenant is not None), key=lambda a: a["address"]
            ),
            "storage_available": ctx.health.available,
            "last_storage_error": ctx.health.last_error(),
            "stopping": ctx.stopping.is_set(),
        }

    def _throughput(self, uploaded: int) -> float:
        """Segment bytes per second uploaded since the previous snapshot."""
        now = time.monotonic()
        then, before = self._last
        if now - then >= 0.5:
            self._rate = (uploaded - before) / (now - then)
            self._last = (now, uploaded)
        return round(self._rate, 1)


def filesystem_space(path: str | Path) -> dict[str, int]:
    """``fs_free_bytes`` and ``fs_total_bytes`` of the filesystem holding ``path`` ({} if unknown).

    The spool's filesystem may fill long before the spool reaches its limit.
    """
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return {}
    return {"fs_free_bytes": usage.free, "fs_total_bytes": usage.total}
