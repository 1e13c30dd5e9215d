"""Ferry's one interface to Azure Storage (and to Azurite, through the same SDK).

Every method states its contract.  Transient failures (connection refused,
timeouts, 5xx, throttling) are retried by the SDK's exponential policy and
then surface as :class:`StorageUnavailable` (retryable); a missing object is
:class:`NotFound`; everything else is a bug and propagates.

Queue messages are base64 text on the wire (``TextBase64EncodePolicy`` and
``TextBase64DecodePolicy`` together), the encoding the Azure Functions queue
trigger expects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
from collections.abc import Iterator
from typing import Any

from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import BlobServiceClient
from azure.storage.queue import (
    QueueServiceClient,
    TextBase64DecodePolicy,
    TextBase64EncodePolicy,
)

from ferry.errors import LeaseHeld, NotFound, StorageUnavailable

# The storage SDKs build their own ExponentialRetry from these (its defaults of
# 15 s initial backoff and base 3 made one call to unreachable storage take
# about 85 s, hiding outages from status and retry loops).
_CLIENT_OPTS = {
    "retry_total": 3,
    "initial_backoff": 1,
    "increment_base": 2,
    "random_jitter_range": 1,
    "connection_timeout": 10,
}


@dataclasses.dataclass
class Message:
    """A received queue message; ``receipt`` changes on every update."""

    id: str
    receipt: str
    body: dict[str, Any]
    dequeue_count: int
    raw: str


def _translate(endpoint: str):
    """Context manager mapping SDK errors to Ferry's error types."""

    @contextlib.contextmanager
    def guard(what: str) -> Iterator[None]:
        try:
            yield
        except ResourceNotFoundError:
            raise NotFound(what=what)
        except (ServiceRequestError, ServiceResponseError) as exc:
            raise StorageUnavailable(endpoint=endpoint, problem=_short(exc))
        except HttpResponseError as exc:
            if exc.status_code and (exc.status_code >= 500 or exc.status_code == 429):
                raise StorageUnavailable(endpoint=endpoint, problem=_short(exc))
            raise

    return guard


def _short(exc: AzureError) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class Storage:
    """Blobs and queues of one storage account."""

    def __init__(self, connection_string: str) -> None:
        self.blobs = BlobServiceClient.from_connection_string(connection_string, **_CLIENT_OPTS)
        self.queues = QueueServiceClient.from_connection_string(connection_string, **_CLIENT_OPTS)
        self.endpoint = self.blobs.url.split("?")[0]
        self._guard = _translate(self.endpoint)
        self._known: set[str] = set()
        self._lock = threading.Lock()

    # -- containers and blobs ---------------------------------------------------------

    def ensure_container(self, container: str) -> None:
        """Create ``container`` if absent. Idempotent."""
        if container in self._known:
            return
        with self._guard(f"container {container}"), contextlib.suppress(ResourceExistsError):
            self.blobs.create_container(container)
        self._known.add(container)

    def put(self, container: str, name: str, data: bytes, lease: str | None = None) -> None:
        """Write blob ``name`` whole, replacing any previous content. Idempotent."""
        self.ensure_container(container)
        with self._guard(f"blob {container}/{name}"):
            self.blobs.get_blob_client(container, name).upload_blob(
                data, overwrite=True, lease=lease, max_concurrency=2
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

    # -- queues -------------------------------------------------------------------

    def _queue(self, queue: str):
        return self.queues.get_queue_client(
            queue,
            message_encode_policy=TextBase64EncodePolicy(),
            message_decode_policy=TextBase64DecodePolicy(),
        )

    def ensure_queue(self, queue: str) -> None:
        """Create ``queue`` if absent. Idempotent."""
        if queue in self._known:
            return
        with self._guard(f"queue {queue}"), contextlib.suppress(ResourceExistsError):
            self.queues.create_queue(queue)
        self._known.add(queue)

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

    def receive(self, queue: str, count: int = 32, visibility: int = 60) -> list[Message]:
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
                out.append(Message(m.id, m.pop_receipt, body, m.dequeue_count, m.content))
        return out

    def delete_message(self, queue: str, message: Message) -> None:
        """Delete a received message; already gone is fine. Idempotent."""
        with contextlib.suppress(NotFound), self._guard(f"queue {queue}"):
            self._queue(queue).delete_message(message.id, message.receipt)

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
        self._known.discard(queue)


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
            self._lease.renew()

    def release(self) -> None:
        """Give the lease up; safe to call twice."""
        if self.released:
            return
        self.released = True
        with contextlib.suppress(Exception):
            self._lease.release()
