"""Names of everything Ferry keeps in Azure Storage.

Azure's rules: container and queue names are 3-63 characters of lowercase
letters, digits and single dashes, starting with a letter or digit.  Tenant
and disk ids are therefore restricted (``ID_RE``) so that every derived name
is valid without mangling; a name that would be too long is shortened with a
stable hash suffix.

Blob names are deterministic: a re-upload after a crash overwrites the same
blob, and a re-sent notice names the same blob.
"""

from __future__ import annotations

import hashlib
import re

ID_RE = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){0,39}$")
"""Tenant, machine and disk ids: 1-40 chars, lowercase letters, digits, single inner dashes."""

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""Resync request ids (the agent uses uuid4 hex)."""

POISON_SUFFIX = "-poison"
"""Suffix of the queue that receives notices which failed (the Functions convention)."""


def check_id(kind: str, value: object) -> str | None:
    """Return a problem line if ``value`` is not a valid id of ``kind``, else None."""
    if not isinstance(value, str) or not ID_RE.match(value):
        return (
            f"{kind} {value!r} is not a valid id (1-40 lowercase letters, digits and "
            "single dashes, not starting or ending with a dash)"
        )
    return None


HASH_CHARS = 20
"""Hex digits of the sha256 that ends a shortened name: 80 bits, beyond a second-preimage search."""


def _bounded(name: str, limit: int = 63) -> str:
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:HASH_CHARS]
    return f"{name[: limit - HASH_CHARS - 1].rstrip('-')}-{digest}"


def _pair(kind: str, first: str, second: str, limit: int) -> str:
    """``<kind>-<len(first)>-<first>-<second>``: the length makes the pair decodable.

    Ids may contain dashes, so ``fd-acme-prod-web01`` alone could be tenant
    ``acme`` with disk ``prod-web01`` or tenant ``acme-prod`` with disk
    ``web01``.  With the first id's length in front, each name decodes to one
    pair only (collision-free by construction); a name too long for Azure is
    shortened with a hash of the whole, unambiguous name.
    """
    return _bounded(f"{kind}-{len(first)}-{first}-{second}", limit)


def disk_queue(tenant: str, disk: str) -> str:
    """The queue on which segment notices for one disk are announced."""
    return _pair("fd", tenant, disk, 63 - len(POISON_SUFFIX))


def poison_queue(queue: str) -> str:
    """The poison queue of ``queue``."""
    return f"{queue}{POISON_SUFFIX}"


def command_queue(tenant: str, component: str) -> str:
    """The queue on which a component receives its commands."""
    return _pair("fc", tenant, component, 63)


def segments_container(tenant: str, disk: str) -> str:
    """The container of one disk's segment blobs (names carry disk, generation, sequence).

    One per disk: a container SAS cannot be narrowed to a name prefix, so only
    separate containers keep a component's grant to the disks it serves
    (issue #10, finding 8): a process server or master target of one disk
    can neither read nor write another disk's segments, of its tenant or any
    other.  ``fs-<len(tenant)>-<tenant>-<disk>``: collision-free like the queues.
    """
    return _pair("fs", tenant, disk, 63)


def control_container(tenant: str, disk: str) -> str:
    """The container of one disk's owner lease, digest maps, resync answers, state and fence."""
    return _pair("fx", tenant, disk, 63)


def segment_blob(tenant: str, disk: str, gen: int, seq: int) -> str:
    """Blob name of the segment carrying batch (gen, seq) of a disk."""
    return f"{tenant}/{disk}/{gen:08d}/{seq:012d}.seg"


def lease_blob(tenant: str, disk: str) -> str:
    """Blob whose lease makes one master target the owner of a disk."""
    return f"{tenant}/{disk}/owner.lease"


def digest_blob(tenant: str, disk: str, gen: int) -> str:
    """Blob holding the master target's block digests at the start of generation ``gen``."""
    return f"{tenant}/{disk}/digests/{gen:08d}.bin"


def resync_answer_blob(tenant: str, disk: str, request_id: str) -> str:
    """Blob in which the master target answers one resync request."""
    return f"{tenant}/{disk}/resync/{request_id}.json"


def fence_blob(tenant: str, disk: str) -> str:
    """Blob recording a disk's fence (a cutover): nothing after its tag is ever applied."""
    return f"{tenant}/{disk}/fence.json"


def disk_state_blob(tenant: str, disk: str) -> str:
    """Blob in which the master target publishes a disk's applied state (JSON)."""
    return f"{tenant}/{disk}/state.json"


KIND_PREFIX = {"agent": "ag", "process-server": "ps", "master-target": "mt"}
"""Component kinds and the prefix of their ids (``ag-<machine>``, ``ps-<name>``, ``mt-<name>``)."""


def component_kind(component_id: str) -> str | None:
    """The kind of a component, from its id's prefix (None if the prefix is unknown)."""
    prefix = component_id.split("-", 1)[0]
    return next((k for k, p in KIND_PREFIX.items() if p == prefix), None)
