"""``Storage.from_grant``: SAS grants as the configuration server hands them out, on real Azurite.

Every token here is a real service SAS signed with Azurite's account key
(as the server signs them), so Azurite enforces scope, permissions and
expiry exactly as Azure would.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid

import pytest
from azure.storage.blob import generate_container_sas
from azure.storage.blob._shared.parser import DEVSTORE_ACCOUNT_KEY
from azure.storage.queue import generate_queue_sas

from devkit.azurite import ACCOUNT
from ferry import storage as storage_mod
from ferry.control.errors import ControlUnavailable
from ferry.errors import LeaseHeld, NotFound, RetryableError
from ferry.storage import (
    GrantInvalid,
    GrantMissing,
    GrantRefused,
    NotProvisioned,
    Storage,
)


def sas_container(name: str, perm: str = "racwdl", minutes: float = 60) -> str:
    expiry = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=minutes)
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    return generate_container_sas(
        ACCOUNT, name, account_key=DEVSTORE_ACCOUNT_KEY, permission=perm, expiry=expiry, start=start
    )


def sas_queue(name: str, perm: str = "raup", minutes: float = 60) -> str:
    expiry = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=minutes)
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    return generate_queue_sas(
        ACCOUNT, name, account_key=DEVSTORE_ACCOUNT_KEY, permission=perm, expiry=expiry, start=start
    )


class Grants:
    """Makes grants the way the configuration server does, for names created up front."""

    def __init__(self, admin: Storage) -> None:
        self.admin = admin
        self.blob_endpoint = admin.blobs.url.rstrip("/")
        self.queue_endpoint = admin.queues.url.rstrip("/")
        self.made = 0

    def make(
        self,
        containers: list[str] = (),
        queues: list[str] = (),
        valid_s: float = 3600,
        sas_minutes: float = 60,
        create: bool = True,
    ) -> dict:
        if create:
            for c in containers:
                self.admin.ensure_container(c)
            for q in queues:
                self.admin.ensure_queue(q)
        self.made += 1
        return {
            "blob_endpoint": self.blob_endpoint,
            "queue_endpoint": self.queue_endpoint,
            "expires_at": time.time() + valid_s,
            "containers": {c: sas_container(c, minutes=sas_minutes) for c in containers},
            "queues": {q: sas_queue(q, minutes=sas_minutes) for q in queues},
        }


@pytest.fixture
def grants(storage) -> Grants:
    return Grants(storage)


@pytest.fixture
def names(tenant):
    """Fresh container and queue names for one test."""
    suffix = uuid.uuid4().hex[:8]
    return {
        "container": f"c{tenant}{suffix}",
        "other": f"o{tenant}{suffix}",
        "queue": f"q{tenant}{suffix}",
        "queue2": f"r{tenant}{suffix}",
    }


# -- one conformance suite for both ways in ---------------------------------------------


@pytest.fixture(params=["connection-string", "grant"])
def any_storage(request, azurite, grants, names) -> Storage:
    if request.param == "connection-string":
        return Storage(azurite.connection_string)
    grant = grants.make([names["container"]], [names["queue"]])
    return Storage.from_grant(grant)


def test_blob_contract_is_the_same_with_a_grant(any_storage, names):
    s, c = any_storage, names["container"]
    s.ensure_container(c)
    s.put(c, "a/1", b"one")
    s.put_json(c, "a/2.json", {"x": 2})
    assert s.get(c, "a/1") == b"one"
    assert s.get_json(c, "a/2.json") == {"x": 2}
    assert s.exists(c, "a/1") and not s.exists(c, "a/none")
    assert sorted(s.list(c, "a/")) == ["a/1", "a/2.json"]
    with pytest.raises(NotFound):
        s.get(c, "a/none")
    s.delete(c, "a/1")
    s.delete(c, "a/1")  # absent is fine
    assert not s.exists(c, "a/1")


def test_lease_contract_is_the_same_with_a_grant(any_storage, names):
    s, c = any_storage, names["container"]
    with s.lease(c, "owner.lease", "d0", seconds=15) as held:
        with pytest.raises(LeaseHeld), s.lease(c, "owner.lease", "d0", seconds=15):
            pass
        held.renew()
        assert not s.release_lease(c, "owner.lease", str(uuid.uuid4()))
    with s.lease(c, "owner.lease", "d0", seconds=15) as again:
        assert s.release_lease(c, "owner.lease", again.id)


def test_queue_contract_is_the_same_with_a_grant(any_storage, names):
    s, q = any_storage, names["queue"]
    s.ensure_queue(q)
    s.send(q, {"n": 1})
    s.send_raw(q, "not json")
    got = s.receive(q, count=10, visibility=30)
    assert sorted(str(m.body) for m in got) == sorted(["{'n': 1}", "{}"])
    assert {m.raw for m in got} >= {"not json"}
    assert s.peek_count(q) == 2
    first = next(m for m in got if m.body)
    s.defer(q, first, 0)  # visible again at once
    again = s.receive(q, count=10, visibility=30)
    assert [m.body for m in again] == [{"n": 1}]
    for m in [m for m in got if m is not first] + again:
        s.delete_message(q, m)
    s.delete_message(q, again[0])  # already gone is fine
    assert s.receive(q) == []


# -- what a grant does not allow ----------------------------------------------------------


def test_a_name_outside_the_grant_is_a_clear_retryable_error(grants, names):
    s = Storage.from_grant(grants.make([names["container"]], [names["queue"]]))
    with pytest.raises(GrantMissing) as err:
        s.put(names["other"], "x", b"x")
    assert isinstance(err.value, RetryableError)
    assert f"container {names['other']}" in str(err.value)
    assert "grant" in str(err.value)
    with pytest.raises(GrantMissing, match=f"queue {names['queue2']}"):
        s.receive(names["queue2"])


def test_a_granted_queue_that_was_never_created_is_not_provisioned(grants, names):
    grant = grants.make([], [names["queue2"]], create=False)
    s = Storage.from_grant(grant)
    with pytest.raises(NotProvisioned, match=f"queue {names['queue2']} does not exist yet"):
        s.receive(names["queue2"])


def test_a_token_for_another_name_is_refused_and_renewed(grants, names, monkeypatch):
    monkeypatch.setattr(storage_mod, "GRANT_RETRY_EVERY", 0.0)
    good = grants.make([names["container"]])
    wrong = dict(good, containers={names["container"]: sas_container(names["other"])})
    fetched = []

    def renew():
        fetched.append(1)
        return good

    s = Storage.from_grant(wrong, renew=renew)
    with pytest.raises(GrantRefused) as err:
        s.put(names["container"], "x", b"x")
    assert isinstance(err.value, RetryableError)
    assert "sig=" not in str(err.value) and "se=" not in str(err.value)
    s.put(names["container"], "x", b"x")  # the refusal forced a renewal
    assert fetched == [1]


def test_a_malformed_grant_is_rejected():
    with pytest.raises(GrantInvalid, match="KeyError"):
        Storage.from_grant({"blob_endpoint": "http://x", "containers": {}, "queues": {}})
    with pytest.raises(GrantInvalid):
        Storage.from_grant(
            {
                "blob_endpoint": "http://x",
                "queue_endpoint": "http://y",
                "expires_at": "soon",
                "containers": {},
                "queues": {},
            }
        )


# -- renewal ------------------------------------------------------------------------------


def test_renews_when_under_fifteen_minutes_remain(grants, names):
    calls = []

    def renew():
        calls.append(time.time())
        return grants.make([names["container"]])

    near = grants.make([names["container"]], valid_s=14 * 60)
    s = Storage.from_grant(near, renew=renew)
    s.put(names["container"], "x", b"1")
    assert len(calls) == 1
    assert s.grant_expires_at() > time.time() + 50 * 60
    for _ in range(5):
        s.get(names["container"], "x")
    assert len(calls) == 1  # fresh for an hour now


def test_iso_expiry_is_understood(grants, names):
    grant = grants.make([names["container"]])
    grant["expires_at"] = dt.datetime.fromtimestamp(time.time() + 3600, dt.UTC).isoformat()
    s = Storage.from_grant(grant, renew=lambda: pytest.fail("renewed a fresh grant"))
    s.put(names["container"], "x", b"1")
    assert abs(s.grant_expires_at() - (time.time() + 3600)) < 5


def test_renewal_reaches_clients_and_leases_already_held(grants, names):
    """Tokens are updated in place: a lease taken before a renewal renews with the new token."""
    c = names["container"]
    good = grants.make([c])
    broken = dict(good, containers={c: sas_container(names["other"])})
    answers = [broken, grants.make([c])]
    s = Storage.from_grant(good, renew=lambda: answers.pop(0))
    with s.lease(c, "owner.lease", "d0", seconds=15) as held:
        s.renew_grant()  # now a token for another container
        with pytest.raises(GrantRefused):
            held.renew()
        s.renew_grant()  # a good token again
        held.renew()


def test_a_failed_renewal_keeps_the_current_grant(grants, names, caplog):
    near = grants.make([names["container"]], valid_s=10 * 60)
    attempts = []

    def renew():
        attempts.append(1)
        raise ControlUnavailable(server="http://cs", problem="connection refused")

    s = Storage.from_grant(near, renew=renew)
    for _ in range(3):
        s.put(names["container"], "x", b"1")  # the current tokens still work
    assert len(attempts) == 1  # then it waits GRANT_RETRY_EVERY before trying again
    assert sum("cannot renew the storage grant" in r.message for r in caplog.records) == 1


def test_a_missing_name_fetches_the_grant_again(grants, names, monkeypatch):
    """A disk protected after start is in the next grant: one fetch, then it works."""
    monkeypatch.setattr(storage_mod, "GRANT_REFRESH_MIN", 0.0)
    first = grants.make([], [names["queue"]])
    later = grants.make([], [names["queue"], names["queue2"]])
    s = Storage.from_grant(first, renew=lambda: later)
    s.send(names["queue2"], {"n": 2})
    assert [m.body for m in s.receive(names["queue2"])] == [{"n": 2}]


def test_names_dropped_from_a_renewed_grant_are_refused(grants, names):
    both = grants.make([], [names["queue"], names["queue2"]])
    one = grants.make([], [names["queue"]])
    s = Storage.from_grant(both, renew=lambda: one)
    s.send(names["queue2"], {"n": 1})
    s.renew_grant()
    s._known.clear()  # as a fresh process would
    with pytest.raises(GrantMissing):
        s.send(names["queue2"], {"n": 2})


def test_concurrent_calls_renew_once(grants, names):
    calls = []
    lock = threading.Lock()

    def renew():
        with lock:
            calls.append(1)
        time.sleep(0.3)
        return grants.make([names["container"]])

    s = Storage.from_grant(grants.make([names["container"]], valid_s=60), renew=renew)
    threads = [
        threading.Thread(target=s.put, args=(names["container"], f"x{i}", b"1")) for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(s.list(names["container"], "x")) == 8
