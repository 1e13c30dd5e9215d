"""Tunables of the configuration server, each with its unit."""

from __future__ import annotations

PASSPHRASE_TTL = 86400
"""Default lifetime of a registration passphrase, in seconds."""

PASSPHRASE_TTL_MIN = 60
"""Shortest lifetime an operator may ask for, in seconds."""

PASSPHRASE_TTL_MAX = 604800
"""Longest lifetime an operator may ask for, in seconds (a week)."""

GUESS_LIMIT = 5
"""Wrong passphrases per tenant within GUESS_WINDOW that lock registration, a count."""

GUESS_WINDOW = 900
"""Window over which wrong passphrases are counted, in seconds."""

GUESS_LOCKOUT = 900
"""How long registration stays locked after GUESS_LIMIT wrong passphrases, in seconds."""

SAS_LIFETIME = 3600
"""Validity of the SAS tokens handed to components, in seconds."""

SAS_CLOCK_SKEW = 300
"""SAS tokens start this long before now, for clocks that run behind, in seconds."""

HEARTBEAT_TTL = 60
"""A component with no heartbeat for this long is marked lost, in seconds."""

RPO_THRESHOLD = 60
"""Default RPO above which a machine's disks raise an alert, in seconds."""

SPOOL_WARNING_FREE = 0.30
"""A process server spool with less than this free fraction raises a warning."""

SPOOL_CRITICAL_FREE = 0.25
"""A process server spool with less than this free fraction raises a critical alert."""

TIMER_SCHEDULE = "0 */1 * * * *"
"""NCRONTAB schedule of the monitoring timer in Azure (every minute)."""

LOCAL_TIMER_INTERVAL = 15.0
"""Interval of the in-process monitoring timer on the embedded default, in seconds."""

MAX_BODY = 1 << 20
"""Largest request body accepted, in bytes."""

MAX_STATUS = 16384
"""Largest heartbeat status kept, in bytes of JSON."""

MAX_TEXT = 1000
"""Longest free-text field (details, display names), in characters."""

HISTORY_KEPT = 100
"""Entries of a job's history kept (oldest dropped first), a count."""

RECOVERY_POINTS_KEPT = 1000
"""Recovery points kept per disk (oldest pruned by the timer), a count."""

RECOVERY_POINTS_LIMIT = 100
"""Recovery points listed when the caller gives no limit, a count."""

RECOVERY_POINTS_MAX = 1000
"""Most recovery points one listing returns, a count."""

RECOVERY_POINTS_EVERY_MAX = 86400
"""Widest slice a thinned listing of recovery points (``every``) may ask for, in seconds."""

ALERTS_KEPT_SECONDS = 30 * 86400
"""Cleared alerts older than this are pruned by the timer, in seconds."""

ETAG_ATTEMPTS = 20
"""Read-modify-write attempts on a contended entity before answering 503, a count."""

TARGET_DIR = "/var/lib/ferry/targets"
"""Where a master target registered without ``target_dir`` keeps its target images."""

SEGMENT_KEYS_KEPT = 4
"""Segment keys a tenant keeps (the newest seals, all open), a count."""

JOURNAL_REPORT_MAX = 32000
"""Characters of JSON a master target's ``journal`` summary in a disk report may take."""
