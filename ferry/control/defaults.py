"""Tunables of the configuration-server client and the daemons' control threads, each with its unit."""

from __future__ import annotations

# -- tunables ---------------------------------------------------------------------------

CONNECT_TIMEOUT = 5.0
"""Longest wait for a connection to the configuration server, in seconds."""

READ_TIMEOUT = 30.0
"""Longest wait for the configuration server's answer, in seconds."""

ATTEMPTS = 4
"""Tries of one call when the server cannot be reached or answers 5xx, a count."""

BACKOFF_FIRST = 0.5
"""Pause after the first failed try, in seconds (doubles, with jitter, up to BACKOFF_MAX)."""

BACKOFF_MAX = 8.0
"""Longest pause between tries of one call, in seconds."""

HEARTBEAT_INTERVAL = 15.0
"""Interval between heartbeats, in seconds (the server marks a component lost after 60 s)."""

HEARTBEAT_JITTER = 0.1
"""Heartbeat intervals vary by up to this fraction, so fleets do not beat in step."""

POLL_MIN = 1.0
"""Pause between command queue polls right after a command, in seconds."""

POLL_MAX = 20.0
"""Longest pause between command queue polls when idle, in seconds (the pause doubles)."""

POLL_JITTER = 0.2
"""Command polls vary by up to this fraction of the pause."""

COMMAND_VISIBILITY = 120
"""How long a received command stays hidden from other receivers, in seconds."""

COMMANDS_KEPT = 1000
"""Command ids remembered as done (per component, in ``commands.json``), a count."""

REPORT_INTERVAL = 5.0
"""Interval between disk reports, in seconds."""

REPORT_REFRESH = 60.0
"""A disk whose metrics did not change is reported again after this long, in seconds."""

STARTUP_RETRY_MAX = 60.0
"""Longest pause between attempts to reach the server while a daemon starts, in seconds."""

RECOVERY_POINTS_QUEUED = 10000
"""Recovery points kept while the server cannot be reached, a count (oldest dropped)."""

DETAIL_MAX = 1000
"""Longest command outcome detail the server keeps, in characters (longer is cut)."""
