"""State in Azure Tables: one JSON document per entity, partitioned by tenant.

Every entity is ``{PartitionKey, RowKey, d00, d01, ...}``: the record as
JSON, cut into chunks of at most ``CHUNK`` characters because a Table string
property holds at most 32 K UTF-16 units (Table properties are flat and
typed; records here are nested, and a few, such as a job's history, can grow
past one property).  Every change to an existing record is a read-modify-write guarded
by the entity's ETag (``If-Match``): a 412 means someone else changed it
first, and the change is computed again from the fresh record, so no
concurrent update is ever lost.

Contracts: ``get`` returns None when absent; ``create`` is create-only and
returns False when the row exists (409); ``mutate`` raises
:class:`~functions.core.errors.NotFound` when the row is absent (unless told
how to create it) and :class:`~functions.core.errors.Unavailable` after
``ETAG_ATTEMPTS`` lost races; ``delete`` of an absent row is fine.
"""

from __future__ import annotations

import copy
import json
import random
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import TableServiceClient, UpdateMode

from functions.core import defaults
from functions.core.errors import NotFound, Unavailable

TABLES = (
    "tenants",
    "passphrases",
    "components",
    "machines",
    "disks",
    "recoverypoints",
    "jobs",
    "alerts",
    "idempotency",
    "guesses",
    "commands",
)
"""Every table the configuration server keeps (PartitionKey is the tenant, except ``tenants``)."""

TENANTS_PARTITION = "tenant"
"""PartitionKey of every row of the ``tenants`` table."""

CHUNK = 30000
"""Characters of JSON per entity property (a Table string holds 32 K UTF-16 units)."""

MAX_CHUNKS = 30
"""Properties one record may span (an entity holds at most 1 MiB), a count."""

Doc = dict[str, Any]


class Store:
    """The configuration server's tables in one storage account."""

    def __init__(self, service: TableServiceClient) -> None:
        self.service = service
        self._clients: dict[str, Any] = {}
        self._ready = False
        self._lock = threading.Lock()

    def ensure_tables(self) -> None:
        """Create every table that is missing. Idempotent."""
        with self._lock:
            if self._ready:
                return
            for name in TABLES:
                self.service.create_table_if_not_exists(name)
            self._ready = True

    def _table(self, name: str):
        if name not in TABLES:
            raise ValueError(f"unknown table {name}")
        client = self._clients.get(name)
        if client is None:
            client = self._clients[name] = self.service.get_table_client(name)
        return client

    def get(self, table: str, pk: str, rk: str) -> Doc | None:
        """The record at (pk, rk), or None if absent."""
        found = self._get(table, pk, rk)
        return None if found is None else found[0]

    def _get(self, table: str, pk: str, rk: str) -> tuple[Doc, str] | None:
        try:
            entity = self._table(table).get_entity(pk, rk)
        except ResourceNotFoundError:
            return None
        return _doc(entity), entity.metadata["etag"]

    def create(self, table: str, pk: str, rk: str, doc: Doc) -> bool:
        """Create the record; False (and no change) if the row already exists."""
        try:
            self._table(table).create_entity(_entity(pk, rk, doc))
        except ResourceExistsError:
            return False
        return True

    def mutate(
        self,
        table: str,
        pk: str,
        rk: str,
        change: Callable[[Doc], Doc | None],
        missing: Callable[[], Doc] | None = None,
        what: str | None = None,
    ) -> Doc:
        """Apply ``change`` to the record under ETag concurrency and return the result.

        ``change`` gets a private copy and returns the new record, or None to
        leave it as it is; it may raise an ApiError to refuse.  It may run
        several times (once per lost race), so it must not have side effects.
        If the row is absent, ``missing()`` gives the record to start from
        (created with create-only semantics), else NotFound naming ``what``.
        """
        client = self._table(table)
        for attempt in range(defaults.ETAG_ATTEMPTS):
            found = self._get(table, pk, rk)
            if found is None:
                if missing is None:
                    raise NotFound(f"{what or rk} does not exist")
                new = change(missing())
                if new is None or self.create(table, pk, rk, new):
                    return new if new is not None else missing()
                continue
            doc, etag = found
            new = change(copy.deepcopy(doc))
            if new is None:
                return doc
            try:
                client.update_entity(
                    _entity(pk, rk, new),
                    mode=UpdateMode.REPLACE,
                    etag=etag,
                    match_condition=MatchConditions.IfNotModified,
                )
                return new
            except (ResourceModifiedError, ResourceNotFoundError):
                time.sleep(random.uniform(0, 0.01 * (attempt + 1)))
        raise Unavailable(f"{what or rk} is being changed by too many callers at once; retry")

    def delete(self, table: str, pk: str, rk: str) -> None:
        """Delete the row; absent is fine. Idempotent."""
        try:
            self._table(table).delete_entity(pk, rk)
        except ResourceNotFoundError:
            pass

    def partition(self, table: str, pk: str) -> list[Doc]:
        """Every record of partition ``pk``."""
        return self._query(table, "PartitionKey eq @pk", {"pk": pk})

    def range(self, table: str, pk: str, prefix: str) -> list[Doc]:
        """The records of partition ``pk`` whose RowKey starts with ``prefix``."""
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        return self._query(
            table,
            "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
            {"pk": pk, "lo": prefix, "hi": end},
        )

    def range_keys(self, table: str, pk: str, prefix: str) -> Iterable[tuple[str, Doc]]:
        """(RowKey, record) pairs of partition ``pk`` under ``prefix``."""
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        entities = self._table(table).query_entities(
            "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
            parameters={"pk": pk, "lo": prefix, "hi": end},
        )
        return [(e["RowKey"], _doc(e)) for e in entities]

    def _query(self, table: str, query: str, parameters: dict[str, str]) -> list[Doc]:
        entities = self._table(table).query_entities(query, parameters=parameters)
        return [_doc(e) for e in entities]


def _entity(pk: str, rk: str, doc: Doc) -> dict[str, Any]:
    text = json.dumps(doc, sort_keys=True)
    chunks = [text[i : i + CHUNK] for i in range(0, len(text), CHUNK)] or [""]
    if len(chunks) > MAX_CHUNKS:
        raise ValueError(f"record {pk}/{rk} is {len(text)} characters, over {CHUNK * MAX_CHUNKS}")
    entity = {"PartitionKey": pk, "RowKey": rk}
    entity.update({f"d{i:02d}": chunk for i, chunk in enumerate(chunks)})
    return entity


def _doc(entity: Any) -> Doc:
    keys = sorted(k for k in entity if len(k) == 3 and k[0] == "d" and k[1:].isdigit())
    return json.loads("".join(entity[k] for k in keys))
