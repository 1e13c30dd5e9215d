"""Tunables of the mobility agent, each with its unit."""

BLOCK_SIZE = 4096
"""Tracking granularity, in bytes (a power of two, >= 512)."""

RESYNC_BLOCK_SIZE = 65536
"""Granularity of the digest comparison during a resync, in bytes (a multiple of BLOCK_SIZE).

Doubled for large disks until the digest map fits DIGEST_MAP_MAX (see resync_block)."""

DIGEST_MAP_MAX = 64 << 20
"""Largest digest map a resync asks for, in bytes (16 bytes per resync block)."""

RESYNC_BLOCK_MAX = 16 << 20
"""Coarsest resync block, in bytes (the master target refuses larger ones)."""

BATCH_BYTES = 4 << 20
"""Largest data payload of one batch, in bytes."""

SYNC_BATCH_BYTES = 16 << 20
"""Largest data payload of one batch while a disk is in its initial sync or a resync: four
times fewer segments per GiB cost the process server, the master target and storage a
quarter less CPU and the sync a quarter less time (docs/performance.md, round five).  The
memory it takes (about 60 MiB more at the agent) is handed back once the disk replicates."""

BATCH_BYTES_MAX = 64 << 20
"""Largest ``batch_bytes`` or ``sync_batch_bytes`` (a frame is at most 256 MiB; a batch is
held in memory at every stage, up to ``window`` of them at the agent)."""

TRIM_AFTER = 5.0
"""Seconds after a disk's last sync batch was sent before the agent hands the memory its
larger batches took back to the system (ferry.memory)."""

WINDOW = 8
"""Batches sent but not yet acknowledged, per connection."""

PASS_INTERVAL = 0.25
"""Pause between read passes when there is nothing urgent, in seconds."""

IDLE_TAG_INTERVAL = 10.0
"""Longest time without a tag while nothing changes, in seconds: the target's latest
recovery point stays fresh, so its age measures RPO."""

SCAN_PASS_INTERVAL = 2.0
"""Pause between passes of the scan tracker (each pass reads the whole disk), in seconds."""

FREEZE_AFTER = 30.0
"""Longest time without a clean (tagged) pass before a pass runs under fsfreeze, in seconds."""

FREEZE_TIMEOUT = 10.0
"""A watchdog thaws the filesystem after this long frozen, in seconds."""

TRACE_BUFFER_KB = 16384
"""Per-CPU ring buffer of the private trace instance, in KiB."""

HOOK_TIMEOUT = 120.0
"""Longest run of an app-consistency pre or post hook, in seconds."""

RECONNECT_MIN = 0.5
"""First pause before reconnecting to the process server, in seconds (doubles up to RECONNECT_MAX)."""

RECONNECT_MAX = 10.0
"""Longest pause between reconnection attempts, in seconds."""

TLS_WRITE_BUFFER = 1 << 20
"""TLS records gathered per write to the process server, in bytes (ferry.tlsbuffer)."""

STATUS_INTERVAL = 1.0
"""How often status.json is rewritten, in seconds."""

TRACEFS = "/sys/kernel/tracing"
"""Where tracefs is mounted (mounted there by the agent if absent)."""

STATE_DIR = "/var/lib/ferry/agent"
"""State directory in server mode when ``--state-dir`` is not given, a path."""

PKI_CA = "/etc/ferry/pki/ca.pem"
"""CA certificate the process server's certificate must chain to (server mode default), a path."""

PKI_CERT = "/etc/ferry/pki/agent.pem"
"""The agent's client certificate (server mode default), a path."""

PKI_KEY = "/etc/ferry/pki/agent.key"
"""The agent's private key (server mode default), a path."""

TAG_TIMEOUT = 300.0
"""Longest a ``tag`` or ``drain`` command waits for its tag to be durable, in seconds."""

UNIT = "ferry-agent.service"
"""The agent's systemd unit (roles/ferry_daemon names it ``ferry-<component>.service``)."""

PREFIX = "/opt/ferry"
"""Where the roles install Ferry; ``<PREFIX>/bin/ferry-supervise`` supervises hosts without systemd."""

RUN_DIR = "/run/ferry"
"""Where the supervisor keeps the agent's state file (``agent.pid``) on hosts without systemd."""

FINAL_TAG_TIMEOUT = 300.0
"""Seconds the cutover's final tag may take to become durable at the process server."""

FINAL_FREEZE_LIMIT = 1800.0
"""Seconds the cutover may hold the source frozen (digests of whole disks) before the
watchdog thaws it and the cutover fails (``python -m agent.fence final``)."""

STOP_ACK_WAIT = 10.0
"""At an orderly stop, how long the agent waits for the process server to acknowledge what
it sent, in seconds; a disk with a batch still unacknowledged resyncs at the next start."""

APP_TAG_INTERVAL = 0.0
"""Seconds between scheduled app-consistent tags (freeze and hooks); 0 takes none."""

VERIFY_INTERVAL = 0.0
"""Seconds between scheduled online verifies of every disk (without repair); 0 runs none."""

VERIFY_CHUNK_BYTES = 64 << 20
"""Bytes of a disk an online verify digests per read pass, in bytes (a multiple of BLOCK_SIZE,
at most 64 MiB: its digests ride in the pass's tag)."""
