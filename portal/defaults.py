"""Tunables of the portal, each with its unit."""

from __future__ import annotations

SESSION_IDLE = 1800.0
"""A session unused this long is signed out, in seconds."""

SESSION_MAX_AGE = 12 * 3600.0
"""A session is signed out this long after sign-in whatever its use, in seconds."""

SESSIONS_MAX = 10_000
"""Sessions kept at once, a count (the oldest go first)."""

SIGNIN_FAILURES = 5
"""Failed sign-ins from one client address within SIGNIN_WINDOW before it is refused, a count."""

SIGNIN_WINDOW = 900.0
"""The window over which failed sign-ins are counted, in seconds."""

REFRESH_INTERVAL = 3000
"""Live parts of a page are fetched again this often, in milliseconds."""

RPO_WINDOW = 3600.0
"""The RPO chart's span, in seconds (the last hour)."""

RECOVERY_POINTS = 1000
"""Recovery points read for a machine page's timeline and chart, a count (the most the
configuration server lists at once)."""

RECOVERY_POINTS_FILL = 0.9
"""Share of RECOVERY_POINTS a thinned hour is sized to fill, a fraction (the rest is slack
for slices that straddle the window's ends)."""

DATA_SINCE_SLACK = 60.0
"""Data that starts this little after the window's start still counts as the whole window
(nobody reads a minute off a one-hour chart), in seconds."""

RECORDED_DETAILS = 50
"""Recorded actions (machine ``-``) on the jobs page whose detail is read, the newest first,
a count (one API call each)."""

PASSPHRASE_TTL = 86400
"""Default life of a registration passphrase made in the portal, in seconds."""

HOST_VENV = "/opt/ferry/venv"
"""Where the registration page's commands install a component (the roles' ``ferry_venv``)."""

HOST_CONFIG_DIR = "/etc/ferry"
"""Where they put its credentials and certificates (the roles' ``ferry_config_dir``)."""

HOST_STATE_DIR = "/var/lib/ferry"
"""Where its state directory goes, one per kind (the roles' ``ferry_state_dir``)."""

COOKIE = "__Host-ferry-portal"
"""The session cookie's name: ``__Host-`` makes browsers require Secure, path / and no domain."""

PORT = 8480
"""Port ``python -m portal`` listens on by default."""
