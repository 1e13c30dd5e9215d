"""Every tunable of the master target, each with its unit.

Settings files override only what an operator should choose (see
:mod:`mastertarget.settings`); the rest are engineering constants kept here so
that they are named, documented and found in one place.
"""

STORAGE_ENV = "FERRY_STORAGE"
"""Environment variable that holds the storage connection string (a name, not a secret)."""

LEASE_SECONDS = 60
"""Duration of the owner lease on a disk, in seconds (Azure allows 15 to 60)."""

LEASE_MIN_SECONDS = 15
"""Shortest owner lease Azure accepts, in seconds."""

LEASE_MAX_SECONDS = 60
"""Longest finite owner lease Azure accepts, in seconds."""

LEASE_RENEW_EVERY = 20.0
"""Interval between renewals of the owner lease, in seconds (a third of its duration)."""

LEASE_MARGIN = 10.0
"""Safety margin, in seconds: a lease not renewed for ``lease_seconds - LEASE_MARGIN`` is lost."""

LEASE_RETRY_EVERY = 2.0
"""With ``--wait``, interval between attempts to take a lease held elsewhere, in seconds."""

LEASE_RETRY_AFTER_ERROR = 2.0
"""Delay before renewing again after a transient storage failure, in seconds."""

RECEIVE_BATCH = 16
"""Notices received per round, in messages (32 is the queue service's maximum)."""

FETCH_AHEAD = 2
"""Segments of a round downloaded ahead of the one being verified and staged.

A round handled its notices one by one, and a segment's download (storage's
time and the SDK's) took a fifth of the master target's time in an initial
sync, not overlapped with anything; two downloads in flight beside the
verify keep storage and the master target busy at once, for at most two
segments' compressed bytes more in memory."""

VISIBILITY_TIMEOUT = 30
"""How long received notices stay hidden from other readers, in seconds.

A master target killed between receiving notices and staging them leaves
them hidden this long; 300 s stalled a restarted master target for five
minutes. A round's notices are staged well within 30 s; one that is not
reappears and is handled again, harmlessly (staging is idempotent)."""

MISSING_BLOB_SIGHTINGS = 3
"""A segment notice whose blob is missing is poisoned on this sighting, in deliveries."""

MISSING_BLOB_RETRY = 10
"""How long a notice whose blob is missing stays hidden before the next look, in seconds."""

GAP_LOOKUP_AFTER = 30.0
"""How long the batch the cursor waits for may stay missing before it is looked up by its
blob's name (its notice was lost: ``mastertarget.gap``), in seconds; and between looks."""

TRIM_LARGE = 8 << 20
"""Segments of at least this many bytes of data come from a disk's initial sync or resync
(the agent's ``sync_batch_bytes``, 16 MiB): once none has come for ``TRIM_AFTER`` seconds,
the memory they took is handed back to the system (ferry.memory)."""

TRIM_AFTER = 5.0
"""Seconds without a large segment before the memory is handed back."""

IDLE_POLL_MIN = 0.1
"""Wait after the first empty round, in seconds."""

DRAINED_POLL = 0.05
"""Wait after a round that worked and emptied the queue, in seconds: the next notice is at
least one segment's upload away, and polling again at once mostly found nothing (a receive is
the master target's costliest storage request: 2 points of a core at 20 MB/s of writes)."""

IDLE_POLL_MAX = 0.25
"""Longest wait between empty rounds (the wait doubles up to it), in seconds.

It bounds how late an idle master target notices new segments, which adds
straight to RPO and delta convergence (bench: 2 s here made the last group of
a delta wait 1.3 s); polling an empty queue four times a second costs about
350,000 queue transactions a day per disk in Azure."""

ERROR_BACKOFF_MAX = 30.0
"""Longest wait after storage was unavailable (the wait doubles up to it), in seconds."""

FENCE_CHECK_EVERY = 5.0
"""Seconds between reads of a disk's fence record (``fence.json``) while it is served."""

STATUS_INTERVAL = 1.0
"""Interval between refreshes of ``<state_dir>/status.json``, in seconds."""

STATE_INTERVAL = 5.0
"""Interval between refreshes of the state blob when nothing changed, in seconds."""

STATE_MIN_INTERVAL = 1.0
"""Least interval between two writes of the state blob for a new applied point, in seconds: under
dense writes a group is applied several times a second, and a blob write per group was a fifth of
the master target's storage requests.  A new generation, a resync required, a fence or a hold is
published at once."""

ZERO_CHUNK = 1 << 20
"""Size of the buffer used to write zero extents, in bytes."""

DIRECT_MIN = 256 << 10
"""Data extents at least this long (and 4 KiB-aligned) are written with O_DIRECT.

An initial sync writes long extents; copying them into the page cache cost
the master target a third of its CPU there (the kernel's copy of each byte
into new page-cache memory, which on this VM the host must first give back),
an O_DIRECT write of the same bytes from a reused buffer a small part of
that.  Replication's short extents stay buffered: their before-images are
read back by the recovery journal, from the page cache."""

DIRECT_CHUNK = 4 << 20
"""Size of the aligned buffer O_DIRECT writes go through, in bytes (a segment decompressed
into a reused buffer, ``DECODE_BUFFER_BYTES``, is written from where it lies instead)."""

DECODE_BUFFER_BYTES = 16 << 20
"""Size of each reused, page-aligned buffer segments are decompressed into (the agent's
``sync_batch_bytes``), in bytes: a larger payload is decompressed into fresh memory."""

DECODE_BUFFERS = 8
"""Most reused decompression buffers at once, for all disks, a count; past it, payloads are
decompressed into fresh memory.  Given back after a burst of large segments (``TRIM_AFTER``)."""

CHECKSUM_CHUNK = 8 << 20
"""Bytes read at a time when re-checking a staged file before a group is applied."""

DIGEST_CHUNK = 8 << 20
"""Bytes read at a time when computing the target's digest map."""

STOP_JOIN_TIMEOUT = 600.0
"""How long a first SIGTERM waits for the disks to finish the group in hand, in seconds."""

STATE_DIR = "/var/lib/ferry/master-target"
"""State directory in server mode when ``--state-dir`` is not given, a path."""

TARGETS_SUBDIR = "targets"
"""Server mode: a disk the settings give no target is applied to ``<state_dir>/targets/<disk>.img``."""

UNKNOWN_KEY_SIGHTINGS = 5
"""Deliveries of a notice whose segment names a key this master target lacks before it is
poisoned; meanwhile the keys are fetched again (a rotation in flight), a count."""

KEY_REFRESH_EVERY = 60.0
"""How often a master target in server mode fetches its segment keys again, in seconds."""

CUTOVER_FENCE_WAIT = 900.0
"""Server mode: how long a ``cutover`` command waits for every disk to be fenced, in seconds."""

GUESTFS_LAUNCH_TIMEOUT = 900.0
"""How long the libguestfs appliance may take to start, in seconds (TCG on a busy host: minutes)."""

GUESTFS_COMMAND_TIMEOUT = 1800.0
"""How long one command inside the appliance may take, in seconds (update-initramfs under TCG)."""

FERRY_UNITS = tuple(
    f"ferry-{c}.service"
    for c in ("agent", "process-server", "master-target", "config-server", "azurite")
)
"""The systemd units roles/ferry_daemon writes (its _ferry_daemon_components), and no others."""

ADAPT_AGENT_PATHS = (
    *(f"/etc/systemd/system/{unit}" for unit in FERRY_UNITS),
    *(f"/etc/systemd/system/*.wants/{unit}" for unit in FERRY_UNITS),
    "/opt/ferry",
    "/etc/ferry",
    "/var/lib/ferry",
    "/var/log/ferry",
)
"""What roles/mobility_agent (through ferry_daemon) installs on a source, as glob patterns."""

HYPERV_MODULES = ("hv_vmbus", "hv_storvsc", "hv_netvsc")
"""Kernel modules a Linux guest needs in its initramfs to boot and reach the network on Azure."""

SERIAL_CONSOLE = "console=ttyS0,115200"
"""Kernel argument for Azure's serial console (and the boot check, which reads it)."""

BOOT_CHECK_TIMEOUT = 900.0
"""How long a boot check may take from QEMU's start to the check's report, in seconds (TCG)."""

BOOT_CHECK_KVM_PROBE = 30.0
"""Seconds a boot under KVM gets to print the kernel's first line before TCG is used instead."""

BOOT_CHECK_MEMORY_MIB = 1024
"""Memory of the boot check's guest, in MiB."""

JOURNAL_KEEP_ALL_MINUTES = 60.0
"""Recovery journal: every point younger than this is kept, in minutes."""

JOURNAL_THIN_EVERY_MINUTES = 5.0
"""Recovery journal: older points are thinned to one per this many minutes."""

JOURNAL_WINDOW_HOURS = 24.0
"""Recovery journal: no point older than this is kept (app-consistent ones all are), in hours."""

JOURNAL_BUDGET_MIB = 10240
"""Recovery journal: undo records of one disk take at most this many MiB; the oldest go first."""

VERIFIED_KEPT_BYTES = 64 << 20
"""Verified segments (decrypted, still compressed) kept in memory between staging and
apply, in bytes per disk: an apply then neither reads, checks nor decrypts them again.
Beyond it the staged file serves, checked as before (mastertarget.verified)."""
