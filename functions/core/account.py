"""The storage account behind the configuration server: tables, queues, containers, SAS.

Two ways in, chosen by app settings (never by code):

* ``FERRY_STORAGE``: a connection string with the account key (Azurite on the
  embedded default, or an account key in Azure).  SAS tokens are service SAS
  signed with that key.
* ``FERRY_STORAGE__accountName`` (optionally ``FERRY_STORAGE__clientId`` for a
  user-assigned identity, and ``FERRY_STORAGE__blobServiceUri`` /
  ``__queueServiceUri`` / ``__tableServiceUri`` for other clouds): the
  Functions convention for identity-based connections.  The app's managed
  identity reaches the account, and SAS tokens are user delegation SAS
  signed with a user delegation key fetched with that identity.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import threading
from collections.abc import Mapping
from typing import Any

from azure.core.exceptions import ResourceExistsError
from azure.data.tables import TableServiceClient
from azure.storage.blob import BlobServiceClient, generate_container_sas
from azure.storage.queue import (
    QueueServiceClient,
    TextBase64DecodePolicy,
    TextBase64EncodePolicy,
    generate_queue_sas,
)

# Short SDK retries, as in ferry.storage: a request must not hang for a minute.
_CLIENT_OPTS: dict[str, Any] = {
    "retry_total": 3,
    "initial_backoff": 1,
    "increment_base": 2,
    "random_jitter_range": 1,
    "connection_timeout": 10,
}


class Account:
    """One storage account: service clients, endpoints and SAS signing."""

    def __init__(
        self,
        name: str,
        blobs: BlobServiceClient,
        queues: QueueServiceClient,
        tables: TableServiceClient,
        key: str | None,
    ) -> None:
        self.name = name
        self.blobs = blobs
        self.queues = queues
        self.tables = tables
        self._key = key
        self.blob_endpoint = blobs.url.rstrip("/")
        self.queue_endpoint = queues.url.rstrip("/")
        self._known: set[str] = set()
        self._lock = threading.Lock()
        self._delegation: dict[str, tuple[Any, dt.datetime]] = {}

    @classmethod
    def from_connection_string(cls, text: str) -> Account:
        """An account reached with a connection string holding its key."""
        blobs = BlobServiceClient.from_connection_string(text, **_CLIENT_OPTS)
        queues = QueueServiceClient.from_connection_string(text, **_CLIENT_OPTS)
        tables = TableServiceClient.from_connection_string(text)
        key = getattr(blobs.credential, "account_key", None)
        if not blobs.account_name:
            raise ValueError("the storage connection string names no account")
        return cls(blobs.account_name, blobs, queues, tables, key)

    @classmethod
    def from_identity(cls, settings: Mapping[str, str], prefix: str) -> Account:
        """An account reached with the app's managed identity (``<prefix>__accountName``)."""
        from azure.identity import DefaultAzureCredential  # only needed in Azure

        name = settings[f"{prefix}__accountName"]
        client_id = settings.get(f"{prefix}__clientId") or None
        credential = DefaultAzureCredential(managed_identity_client_id=client_id)

        def uri(service: str) -> str:
            return settings.get(f"{prefix}__{service}ServiceUri") or (
                f"https://{name}.{service}.core.windows.net"
            )

        blobs = BlobServiceClient(uri("blob"), credential=credential, **_CLIENT_OPTS)
        queues = QueueServiceClient(uri("queue"), credential=credential, **_CLIENT_OPTS)
        tables = TableServiceClient(uri("table"), credential=credential)
        return cls(name, blobs, queues, tables, None)

    # -- queues and containers -----------------------------------------------------------

    def ensure_container(self, name: str) -> None:
        """Create container ``name`` if absent, so that components holding only SAS
        tokens can use it (a disk's segments and control containers). Idempotent."""
        if name in self._known:
            return
        with contextlib.suppress(ResourceExistsError):
            self.blobs.create_container(name)
        self._known.add(name)

    def ensure_queue(self, queue: str) -> None:
        """Create ``queue`` if absent. Idempotent."""
        if queue in self._known:
            return
        with contextlib.suppress(ResourceExistsError):
            self.queues.create_queue(queue)
        self._known.add(queue)

    def send(self, queue: str, body: dict[str, Any]) -> None:
        """Enqueue ``body`` as base64 JSON (the encoding ferry.storage and the Functions host use)."""
        self.ensure_queue(queue)
        client = self.queues.get_queue_client(
            queue,
            message_encode_policy=TextBase64EncodePolicy(),
            message_decode_policy=TextBase64DecodePolicy(),
        )
        client.send_message(json.dumps(body, sort_keys=True))

    # -- SAS --------------------------------------------------------------------------

    def container_sas(
        self, container: str, permission: str, start: dt.datetime, expiry: dt.datetime
    ) -> str:
        """A SAS token (no leading ``?``) for ``container`` with ``permission`` letters."""
        return self._sas(generate_container_sas, "blob", container, permission, start, expiry)

    def queue_sas(
        self, queue: str, permission: str, start: dt.datetime, expiry: dt.datetime
    ) -> str:
        """A SAS token (no leading ``?``) for ``queue`` with ``permission`` letters."""
        return self._sas(generate_queue_sas, "queue", queue, permission, start, expiry)

    def _sas(self, generate, service: str, name: str, permission: str,
             start: dt.datetime, expiry: dt.datetime) -> str:  # fmt: skip
        """A service SAS signed with the account key, else a user delegation SAS.

        Where the endpoint is HTTPS the SAS says so (``spr=https``): a grant is
        never good over plain HTTP, where it could be read on the way.
        """
        endpoint = self.blob_endpoint if service == "blob" else self.queue_endpoint
        https = {"protocol": "https"} if endpoint.startswith("https://") else {}
        if self._key:
            signer = {"account_key": self._key}
        else:
            signer = {"user_delegation_key": self._delegation_key(service, expiry)}
        return generate(self.name, name, permission=permission, start=start, expiry=expiry,
                        **signer, **https)  # fmt: skip

    def _delegation_key(self, service: str, expiry: dt.datetime):
        """A user delegation key valid past ``expiry`` (cached; keys live a day here)."""
        with self._lock:
            cached = self._delegation.get(service)
            if cached and cached[1] > expiry:
                return cached[0]
            now = dt.datetime.now(dt.UTC)
            until = now + dt.timedelta(days=1)
            start = now - dt.timedelta(minutes=5)
            key = (
                self.blobs.get_user_delegation_key(start, until)
                if service == "blob"
                else self.queues.get_user_delegation_key(start=start, expiry=until)
            )
            self._delegation[service] = (key, until)
            return key
