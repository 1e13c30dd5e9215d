"""Ferry's one interface to Azure Storage (and to Azurite, through the same SDK).

Every method states its contract.  Transient failures (connection refused,
timeouts, 5xx, throttling) are retried by the SDK's exponential policy and
then surface as :class:`StorageUnavailable` (retryable); a missing object is
:class:`NotFound`; everything else is a bug and propagates.

Queue messages are base64 text on the wire (``TextBase64EncodePolicy`` and
``TextBase64DecodePolicy`` together), the encoding the Azure Functions queue
trigger expects.

Two ways in, one set of methods:

* ``Storage(connection_string)``: the account key, for tests, the embedded
  default and tools.  Containers and queues are created on first use.
* ``Storage.from_grant(grant, renew)``: the SAS grant a component gets from
  the configuration server (``GET /components/self/storage``, docs/api.md).
  Each container and queue has its own token; nothing else is reachable.
  A SAS cannot create a container or a queue, so the configuration server
  creates what it grants; until it has, calls raise :class:`NotProvisioned`
  (retryable).  A name outside the grant raises :class:`GrantMissing`
  (retryable: the grant is fetched again first, at most every
  ``GRANT_REFRESH_MIN`` seconds, since a newly protected disk is only in the
  next grant).  When less than ``GRANT_RENEW_BEFORE`` seconds remain, the
  next call fetches a new grant through ``renew`` and updates every token in
  place, so clients, blob clients and held leases keep working.  A refusal
  (HTTP 403: token expired or too narrow) is retryable too, and forces a
  renewal.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from azure.core.credentials import AzureSasCredential
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import BlobLeaseClient, BlobServiceClient, ContainerClient
from azure.storage.queue import (
    QueueClient,
    QueueServiceClient,
    TextBase64DecodePolicy,
    TextBase64EncodePolicy,
)

from ferry.errors import LeaseHeld, NotFound, StorageUnavailable
from ferry.httptransport import HttpClientTransport

log = logging.getLogger("ferry.storage")

GRANT_RENEW_BEFORE = 15 * 60.0
"""A grant is renewed once fewer than this many seconds of its validity remain."""

GRANT_RETRY_EVERY = 30.0
"""Pause between attempts to renew a grant after one failed, in seconds."""

GRANT_REFRESH_MIN = 30.0
"""Shortest interval between fetches caused by a name missing from the grant, in seconds."""


class GrantMissing(StorageUnavailable):
    """the configuration server's storage grant does not cover {what} (not protected here yet?)"""


class NotProvisioned(StorageUnavailable):
    """{what} does not exist yet; the configuration server creates what it grants"""


class GrantRefused(StorageUnavailable):
    """storage at {endpoint} refused {what} with this component's grant ({problem}); renewing it"""


class GrantInvalid(StorageUnavailable):
    """the storage grant from the configuration server is unusable: {problem}"""


# The storage SDKs build their own ExponentialRetry from these (its defaults of
# 15 s initial backoff and base 3 made one call to unreachable storage take
# about 85 s, hiding outages from status and retry loops).
_CLIENT_OPTS: dict[str, Any] = {
    "retry_total": 3,
    "initial_backoff": 1,
    "increment_base": 2,
    "random_jitter_range": 1,
    "connection_timeout": 10,
    # A socket read that waits longer than this fails (and is retried): a
    # stalled call once held a master target's lease renewal for 126 s.
    "read_timeout": 20,
}
# Every client of the process sends through one http.client transport (ferry.httptransport:
# the default one, requests, took most of a storage call's CPU); its connection settings are
# the ones above.
_CLIENT_OPTS["transport"] = HttpClientTransport(**_CLIENT_OPTS)


@dataclasses.dataclass
class Message:
    """A received queue message; ``receipt`` changes on every update."""

    id: str
    receipt: str
    body: dict[str, Any]
    dequeue_count: int
    raw: str
    inserted_at: float | None = None
    """When the queue service took the message (its own clock, whole seconds); None if unknown."""


_ABSENT_PARENT = {"ContainerNotFound", "QueueNotFound"}


def _translate(endpoint: str, access: _GrantAccess | None = None):
    """Context manager mapping SDK errors to Ferry's error types.

    With a grant (``access``), a missing container or queue and a refusal
    are retryable (see the module docstring), and the grant is kept fresh.
    """

    @contextlib.contextmanager
    def guard(what: str) -> Iterator[None]:
        if access is not None:
            access.fresh()
        try:
            yield
        except ResourceNotFoundError as exc:
            if access is not None and getattr(exc, "error_code", None) in _ABSENT_PARENT:
                raise NotProvisioned(endpoint=endpoint, what=_parent(what))
            raise NotFound(what=what)
        except (ServiceRequestError, ServiceResponseError) as exc:
            raise StorageUnavailable(endpoint=endpoint, problem=_short(exc))
        except HttpResponseError as exc:
            if exc.status_code and (exc.status_code >= 500 or exc.status_code == 429):
                raise StorageUnavailable(endpoint=endpoint, problem=_short(exc))
            if access is not None and exc.status_code == 403:
                access.refused()
                raise GrantRefused(endpoint=endpoint, what=what, problem=_short(exc))
            raise

    return guard


def _parent(what: str) -> str:
    """``container x`` for ``blob x/y``; other descriptions unchanged."""
    kind, _, name = what.partition(" ")
    if kind == "blob":
        return f"container {name.split('/', 1)[0]}"
    return what


_SIGNATURE = re.compile(r"(?i)(sig=)[^&\s'\"]+")


def _short(exc: AzureError) -> str:
    """The first line of an SDK error, any SAS signature in it masked."""
    text = str(exc).strip().splitlines()
    return _SIGNATURE.sub(r"\1***", text[0]) if text else type(exc).__name__


class Storage:
    """Blobs and queues of one storage account."""

    def __init__(self, connection_string: str) -> None:
        self.blobs = BlobServiceClient.from_connection_string(connection_string, **_CLIENT_OPTS)
        self.queues = QueueServiceClient.from_connection_string(connection_string, **_CLIENT_OPTS)
        self.endpoint = self.blobs.url.split("?")[0]
        self._access: _GrantAccess | None = None
        self._guard = _translate(self.endpoint)
        self._known: set[tuple[str, str]] = set()  # ("container" or "queue", name) made or granted
        self._queue_clients: dict[str, QueueClient] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_grant(
        cls, grant: dict[str, Any], renew: Callable[[], dict[str, Any]] | None = None
    ) -> Storage:
        """Storage limited to what ``grant`` covers; ``renew`` returns a fresh grant.

        Raises GrantInvalid if ``grant`` does not have the documented shape.
        """
        self = cls.__new__(cls)
        access = _GrantAccess(grant, renew)
        self._access = access
        # Stand-ins with the few methods Storage calls on the account's clients.
        self.blobs = _GrantedBlobs(access)  # type: ignore[assignment]
        self.queues = _GrantedQueues(access)  # type: ignore[assignment]
        self.endpoint = access.blob_endpoint
        self._guard = _translate(self.endpoint, access)
        self._known = set()
        self._queue_clients = {}
        self._lock = threading.Lock()
        return self

    @property
    def granted(self) -> bool:
        """True when this storage works from a configuration server grant."""
        return self._access is not None

    def grant_expires_at(self) -> float | None:
        """When the current grant expires (epoch seconds); None without a grant."""
        return self._access.expires_at if self._access is not None else None

    def renew_grant(self) -> None:
        """Fetch a new grant now (e.g. after a new disk was protected). Retryable errors."""
        if self._access is not None:
            self._access.renew(force=True)

    # -- containers and blobs ---------------------------------------------------------

    def ensure_container(self, container: str) -> None:
        """Create ``container`` if absent. Idempotent.

        With a grant: only checks that the grant covers it (GrantMissing).
        """
        if ("container", container) in self._known:
            return
        if self._access is not None:
            self._access.container(container)
        else:
            with self._guard(f"container {container}"), contextlib.suppress(ResourceExistsError):
                self.blobs.create_container(container)
        self._known.add(("container", container))

    def put(self, container: str, name: str, data: bytes, lease: str | None = None) -> None:
        """Write blob ``name`` whole, replacing any previous content. Idempotent."""
        self.ensure_container(container)
        with self._guard(f"blob {container}/{name}"):
            self.blobs.get_blob_client(container, name).upload_blob(
                data,
                overwrite=True,
                lease=lease,  # type: ignore[arg-type]  # the SDK documents a lease id str too
                max_concurrency=2,
            )

    def get(self, container: str, name: str) -> bytes:
        """Return blob ``name``'s content; NotFound if it does not exist."""
        with self._guard(f"blob {container}/{name}"):
            return self.blobs.get_blob_client(container, name).download_blob().readall()

    def get_json(self, container: str, name: str) -> Any:
        """Return blob ``name`` parsed as JSON; NotFound if absent."""
        return json.loads(self.get(container, name))

    def put_json(self, container: str, name: str, value: Any) -> None:
        """Write ``value`` as a JSON blob. Idempotent."""
        self.put(container, name, json.dumps(value, sort_keys=True).encode())

    def delete(self, container: str, name: str) -> None:
        """Delete blob ``name``; absent is fine. Idempotent."""
        with contextlib.suppress(NotFound), self._guard(f"blob {container}/{name}"):
            self.blobs.get_blob_client(container, name).delete_blob()

    def exists(self, container: str, name: str) -> bool:
        """True if blob ``name`` exists."""
        with self._guard(f"blob {container}/{name}"):
            return self.blobs.get_blob_client(container, name).exists()

    def list(self, container: str, prefix: str) -> list[str]:
        """Names of the blobs under ``prefix`` (empty if the container is absent)."""
        try:
            with self._guard(f"container {container}"):
                client = self.blobs.get_container_client(container)
                return [b.name for b in client.list_blobs(name_starts_with=prefix)]
        except NotFound:
            return []

    @contextlib.contextmanager
    def lease(self, container: str, name: str, disk: str, seconds: int = 60) -> Iterator[Lease]:
        """Hold an exclusive lease on blob ``name`` (created empty if absent).

        Raises LeaseHeld if another holder has it.  Released on exit.
        """
        self.ensure_container(container)
        client = self.blobs.get_blob_client(container, name)
        with self._guard(f"blob {container}/{name}"), contextlib.suppress(ResourceExistsError):
            client.upload_blob(b"", overwrite=False)
        try:
            with self._guard(f"lease {container}/{name}"):
                lease = client.acquire_lease(lease_duration=seconds)
        except HttpResponseError as exc:
            if exc.status_code == 409:
                raise LeaseHeld(disk=disk, blob=f"{container}/{name}")
            raise
        holder = Lease(lease, self._guard)
        try:
            yield holder
        finally:
            holder.release()

    def release_lease(self, container: str, name: str, lease_id: str) -> bool:
        """Release the lease ``lease_id`` on blob ``name``; False if it carries another id."""
        client = self.blobs.get_blob_client(container, name)
        try:
            with self._guard(f"lease {container}/{name}"):
                BlobLeaseClient(client, lease_id=lease_id).release()
        except (HttpResponseError, NotFound):
            return False
        return True

    # -- queues -------------------------------------------------------------------

    def _queue(self, queue: str):
        # With the account key, one client per queue, made on first use (a client is safe to
        # share between threads; making one took about a sixth of a small call's CPU).  With a
        # grant, _GrantAccess keeps them, and checks on every call that the grant still covers it.
        if self._access is not None:
            return self.queues.get_queue_client(queue)
        client = self._queue_clients.get(queue)
        if client is None:
            client = self.queues.get_queue_client(
                queue,
                message_encode_policy=TextBase64EncodePolicy(),
                message_decode_policy=TextBase64DecodePolicy(),
            )
            self._queue_clients[queue] = client
        return client

    def ensure_queue(self, queue: str) -> None:
        """Create ``queue`` if absent. Idempotent.

        With a grant: only checks that the grant covers it (GrantMissing).
        """
        if ("queue", queue) in self._known:
            return
        if self._access is not None:
            self._access.queue(queue)
        else:
            with self._guard(f"queue {queue}"), contextlib.suppress(ResourceExistsError):
                self.queues.create_queue(queue)
        self._known.add(("queue", queue))

    def send(self, queue: str, body: dict[str, Any]) -> None:
        """Enqueue ``body`` as JSON. Not idempotent: a retry may deliver twice."""
        self.ensure_queue(queue)
        with self._guard(f"queue {queue}"):
            self._queue(queue).send_message(json.dumps(body, sort_keys=True))

    def send_raw(self, queue: str, text: str) -> None:
        """Enqueue ``text`` unchanged (used to move poison messages)."""
        self.ensure_queue(queue)
        with self._guard(f"queue {queue}"):
            self._queue(queue).send_message(text)

    def receive(self, queue: str, count: int = 32, visibility: int = 60) -> builtins.list[Message]:
        """Up to ``count`` messages, hidden for ``visibility`` seconds. Empty if none."""
        self.ensure_queue(queue)
        out = []
        with self._guard(f"queue {queue}"):
            for m in self._queue(queue).receive_messages(
                messages_per_page=min(count, 32), max_messages=count, visibility_timeout=visibility
            ):
                try:
                    body = json.loads(m.content)
                    if not isinstance(body, dict):
                        raise ValueError
                except (ValueError, TypeError):
                    body = {}
                inserted = m.inserted_on.timestamp() if m.inserted_on else None
                out.append(Message(m.id, m.pop_receipt, body, m.dequeue_count, m.content, inserted))
        return out

    def delete_message(self, queue: str, message: Message) -> None:
        """Delete a received message; already gone is fine. Idempotent."""
        with contextlib.suppress(NotFound), self._guard(f"queue {queue}"):
            self._queue(queue).delete_message(message.id, message.receipt)

    def defer(self, queue: str, message: Message, seconds: int) -> None:
        """Make a received message visible again after ``seconds``; ``message.receipt`` changes.

        NotFound if it was deleted or its receipt is stale.
        """
        with self._guard(f"message {message.id} of queue {queue}"):
            answer = self._queue(queue).update_message(
                message.id, message.receipt, visibility_timeout=seconds
            )
        message.receipt = answer.pop_receipt

    def peek_count(self, queue: str) -> int:
        """Approximate number of messages in ``queue`` (0 if absent)."""
        try:
            with self._guard(f"queue {queue}"):
                return self._queue(queue).get_queue_properties().approximate_message_count
        except NotFound:
            return 0

    def delete_queue(self, queue: str) -> None:
        """Delete ``queue``; absent is fine."""
        with contextlib.suppress(NotFound), self._guard(f"queue {queue}"):
            self.queues.delete_queue(queue)
        self._known.discard(("queue", queue))


class _GrantAccess:
    """One grant's endpoints and per-name SAS credentials, kept fresh.

    Credentials are ``AzureSasCredential`` objects updated in place on
    renewal, so every client built from them (and every lease held through
    them) picks up the new token with its next request.
    """

    def __init__(self, grant: dict[str, Any], renew: Callable[[], dict[str, Any]] | None) -> None:
        self._renew = renew
        self._lock = threading.Lock()
        self._containers: dict[str, ContainerClient] = {}
        self._queues: dict[str, QueueClient] = {}
        self._sas: dict[tuple[str, str], AzureSasCredential] = {}
        self._retry_at = 0.0
        self._refreshed_at = time.monotonic()
        self._failing = False
        self._stale = False
        self._apply(grant)

    # -- the grant ------------------------------------------------------------------

    def _apply(self, grant: dict[str, Any]) -> None:
        """Take ``grant``'s tokens; GrantInvalid if its shape is wrong."""
        try:
            blob, queue = str(grant["blob_endpoint"]), str(grant["queue_endpoint"])
            expires = _epoch(grant["expires_at"])
            tokens = {
                ("container", name): str(sas) for name, sas in dict(grant["containers"]).items()
            }
            tokens.update(
                {("queue", name): str(sas) for name, sas in dict(grant["queues"]).items()}
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise GrantInvalid(endpoint="-", problem=f"{type(exc).__name__}: {exc}")
        for key in list(self._sas):
            if key not in tokens:  # no longer granted
                del self._sas[key]
                (self._containers if key[0] == "container" else self._queues).pop(key[1], None)
        for key, sas in tokens.items():
            sas = sas.lstrip("?")
            if key in self._sas:
                self._sas[key].update(sas)
            else:
                self._sas[key] = AzureSasCredential(sas)
        self.blob_endpoint = blob.rstrip("/")
        self.queue_endpoint = queue.rstrip("/")
        self.expires_at = expires

    def fresh(self) -> None:
        """Renew the grant if it is close to expiry or was refused (and a retry is due)."""
        if self._renew is None:
            return
        if not self._stale and self.expires_at - time.time() > GRANT_RENEW_BEFORE:
            return
        if self._backing_off():
            return
        self.renew()

    def _backing_off(self) -> bool:
        # After a failed renewal, keep using the current grant while it lasts.
        return time.monotonic() < self._retry_at and time.time() < self.expires_at

    def renew(self, force: bool = False) -> bool:
        """Fetch and apply a new grant; False (logged once) if that failed."""
        if self._renew is None:
            return False
        with self._lock:
            if not force:
                if not self._stale and self.expires_at - time.time() > GRANT_RENEW_BEFORE:
                    return True  # another thread renewed it meanwhile
                if self._backing_off():
                    return False
            try:
                self._apply(self._renew())
            except Exception as exc:  # the current grant stays; retried later
                self._retry_at = time.monotonic() + GRANT_RETRY_EVERY
                if not self._failing:
                    log.warning("cannot renew the storage grant: %s", _one_line(exc))
                self._failing = True
                return False
            self._refreshed_at = time.monotonic()
            self._retry_at = 0.0
            self._stale = False
            if self._failing:
                log.info("renewed the storage grant")
            self._failing = False
            log.debug("storage grant valid until %s", _iso(self.expires_at))
            return True

    def refused(self) -> None:
        """A request was refused: renew before the next one, unless it was just renewed."""
        if time.monotonic() - self._refreshed_at >= GRANT_RETRY_EVERY:
            self._stale = True

    def _covering(self, kind: str, name: str) -> AzureSasCredential:
        credential = self._sas.get((kind, name))
        due = time.monotonic() - self._refreshed_at >= GRANT_REFRESH_MIN
        if credential is None and self._renew is not None and due:
            self.renew(force=True)
            credential = self._sas.get((kind, name))
        if credential is None:
            raise GrantMissing(endpoint=self.blob_endpoint, what=f"{kind} {name}")
        return credential

    # -- clients --------------------------------------------------------------------

    def container(self, name: str) -> ContainerClient:
        """The client of container ``name``; GrantMissing if the grant does not cover it."""
        self.fresh()
        credential = self._covering("container", name)
        client = self._containers.get(name)
        if client is None:
            client = ContainerClient(
                self.blob_endpoint, name, credential=credential, **_CLIENT_OPTS
            )
            self._containers[name] = client
        return client

    def queue(self, name: str) -> QueueClient:
        """The client of queue ``name`` (base64 messages); GrantMissing if not granted."""
        self.fresh()
        credential = self._covering("queue", name)
        client = self._queues.get(name)
        if client is None:
            client = QueueClient(
                self.queue_endpoint,
                name,
                credential=credential,
                message_encode_policy=TextBase64EncodePolicy(),
                message_decode_policy=TextBase64DecodePolicy(),
                **_CLIENT_OPTS,
            )
            self._queues[name] = client
        return client


class _GrantedBlobs:
    """The parts of ``BlobServiceClient`` that ``Storage`` (and its callers) use, from a grant."""

    def __init__(self, access: _GrantAccess) -> None:
        self._access = access

    @property
    def url(self) -> str:
        return self._access.blob_endpoint

    def get_container_client(self, container: str) -> ContainerClient:
        return self._access.container(container)

    def get_blob_client(self, container: str, blob: str):
        return self._access.container(container).get_blob_client(blob)


class _GrantedQueues:
    """The parts of ``QueueServiceClient`` that ``Storage`` (and its callers) use, from a grant."""

    def __init__(self, access: _GrantAccess) -> None:
        self._access = access

    @property
    def url(self) -> str:
        return self._access.queue_endpoint

    def get_queue_client(self, queue: str, **_policies: Any) -> QueueClient:
        return self._access.queue(queue)  # already base64 both ways

    def delete_queue(self, queue: str) -> None:
        self._access.queue(queue).delete_queue()


def _epoch(value: Any) -> float:
    """Epoch seconds from a number or an ISO 8601 time (UTC if it names no zone)."""
    if isinstance(value, bool):
        raise ValueError(f"expires_at {value!r}")
    if isinstance(value, int | float):
        return float(value)
    when = dt.datetime.fromisoformat(str(value))
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="seconds")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class Lease:
    """A held blob lease; renew it well within its duration."""

    def __init__(self, lease, guard) -> None:
        self._lease = lease
        self._guard = guard
        self.released = False

    @property
    def id(self) -> str:
        """The lease id to pass to writes of the leased blob."""
        return self._lease.id

    def renew(self) -> None:
        """Extend the lease; raises if it was lost."""
        with self._guard("lease"):
            # Short timeouts: a renewal must fail fast enough to be retried
            # well within the lease's duration.
            self._lease.renew(connection_timeout=5, read_timeout=10)

    def release(self) -> None:
        """Give the lease up; safe to call twice."""
        if self.released:
            return
        self.released = True
        with contextlib.suppress(Exception):
            self._lease.release()
