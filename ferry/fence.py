"""The fence record: nothing after its tag is ever applied to the disk (a cutover).

Written by the cutover (``python -m mastertarget.cutover fence``), read by
the master target that serves the disk (mastertarget/worker.py), both through
this module.  It sits beside the disk's state blob, in the tenant's control
container, at :func:`ferry.naming.fence_blob`::

    {"tenant": "demo", "disk": "web01-disk0", "tag": {"id": "...", ...},
     "reason": "cutover", "fenced_at": 1764681234.5}

Removed (``remove``) only when an operator resumes replication after a cutover
that was not committed.  Writing it twice is harmless; a record without a ``tag`` object is not a fence.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ferry import naming
from ferry.errors import NotFound
from ferry.storage import Storage


def record(tenant: str, disk: str, tag: dict[str, Any], reason: str = "cutover") -> dict[str, Any]:
    """A fence record for ``disk`` at ``tag``."""
    return {"tenant": tenant, "disk": disk, "tag": tag, "reason": reason, "fenced_at": time.time()}


def write(storage: Storage, tenant: str, disk: str, tag: dict[str, Any]) -> dict[str, Any]:
    """Store the fence record of ``disk`` at ``tag``; return it with where it was written."""
    fence = record(tenant, disk, tag)
    container, name = naming.control_container(tenant, disk), naming.fence_blob(tenant, disk)
    storage.put(container, name, json.dumps(fence).encode())
    return {"fence_blob": f"{container}/{name}", **fence}


def read(storage: Storage, tenant: str, disk: str) -> dict[str, Any] | str | None:
    """The disk's fence record; None if there is none; a problem line if it is unusable."""
    try:
        raw = storage.get_json(
            naming.control_container(tenant, disk), naming.fence_blob(tenant, disk)
        )
    except NotFound:
        return None
    except ValueError as exc:
        return f"not JSON ({exc})"
    if not (isinstance(raw, dict) and isinstance(raw.get("tag"), dict)):
        return f"no tag object: {json.dumps(raw)[:200]}"
    return raw


def remove(storage: Storage, tenant: str, disk: str) -> None:
    """Delete the disk's fence record (replication resumed after an uncommitted cutover)."""
    storage.delete(naming.control_container(tenant, disk), naming.fence_blob(tenant, disk))
