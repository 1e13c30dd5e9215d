"""Tunables of the process server, each with its unit."""

LISTEN = "127.0.0.1:7443"
"""Address the mutual-TLS listener binds, as ``host:port``."""

SPOOL_LIMIT_BYTES = 1 << 30
"""Spool size above which agents are made to wait (backpressure), in bytes."""

SPOOL_FULL_RETRY = 1.0
"""While the spool's filesystem is full, how often a waiting batch is tried again, in seconds."""

SPOOL_FULL_WARN_EVERY = 60.0
"""Least time between two "the spool's filesystem is full" warnings of a connection, in seconds."""

GROUP_BATCHES = 8
"""Batches already arrived on a connection that are spooled together (one group commit:
each file fsync'ed, each directory once), a count; the agent's window is 8."""

SPOOL_HELD_BYTES = 64 << 20
"""Segment bytes of freshly spooled batches also kept in memory for the uploaders, in bytes:
a batch claimed while held is uploaded from memory instead of read back from its file."""

TRIM_LARGE = 8 << 20
"""Batches at least this large come from a disk's initial sync or resync (the agent's
``sync_batch_bytes``, 16 MiB; ``batch_bytes`` is 4), in bytes: once none has come for
``TRIM_AFTER`` seconds, the memory they took is handed back to the system (ferry.memory)."""

TRIM_AFTER = 5.0
"""Seconds without a large batch before the memory is handed back."""

UPLOAD_THREADS = 4
"""Threads uploading spooled segments, a count (each connection packs its own batches)."""

BANDWIDTH_LIMIT = 0
"""Upper bound on segment bytes uploaded, in bytes per second (0 = unlimited)."""

COMPRESSION_LEVEL = 1
"""zstd level of segment bodies (1 = fastest; higher trades CPU for bytes), a level 1-22."""

STATE_POLL_INTERVAL = 2.0
"""How often the master target's per-disk state blobs are read, in seconds."""

STORAGE_ENV = "FERRY_STORAGE"
"""Environment variable holding the storage connection string, a name."""

RESYNC_POLL_INTERVAL = 0.2
"""How often a pending resync answer blob is looked for, in seconds."""

STATUS_INTERVAL = 1.0
"""How often status.json is rewritten, in seconds."""

RETRY_MIN = 1.0
"""First pause after a storage failure, in seconds (doubles up to RETRY_MAX)."""

RETRY_MAX = 30.0
"""Longest pause between storage retries, in seconds."""

HANDSHAKE_TIMEOUT = 15.0
"""Longest a new connection may take for its TLS handshake and hello, in seconds."""

TLS_READ_BUFFER = 256 << 10
"""Bytes read from an agent's socket at a time, its TLS records then taken from memory
(ferry.tlsbuffer), in bytes."""

MAX_CONNECTIONS = 256
"""Agent connections served at once (one thread each), a count."""

STOP_GRACE = 5.0
"""On SIGTERM, how long in-flight spooling and uploads may take to finish, in seconds."""

ACCEPT_POLL = 0.5
"""How often the accept loop checks for a stop request, in seconds."""

BUCKET_BURST = 1.0
"""Burst a bandwidth limit allows, in seconds' worth of the limit."""

STATE_DIR = "/var/lib/ferry/process-server"
"""State directory in server mode when ``--state-dir`` is not given, a path."""

PKI_CA = "/etc/ferry/pki/ca.pem"
"""CA certificate that agents' certificates must chain to (server mode default), a path."""

PKI_CERT = "/etc/ferry/pki/process-server.pem"
"""The process server's certificate (server mode default), a path."""

PKI_KEY = "/etc/ferry/pki/process-server.key"
"""The process server's private key (server mode default), a path."""

KEY_REFRESH_EVERY = 60.0
"""How often a process server in server mode fetches its tenant's current segment key, in
seconds (a rotation reaches the master targets first: they refresh as often and wait for a
key they lack)."""
