"""Regression tests for what an attacker found (issue #10): each reproduces the attack.

Against the real configuration server on Azurite (the ``api`` fixture) and,
where a daemon is involved, the real daemon code.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import uuid

import pytest
from azure.core.exceptions import HttpResponseError
from azure.storage.queue import QueueClient

from ferry import naming


def _estate(api, tenant: str, machine: str) -> dict:
    """A tenant named ``tenant`` with an agent of ``machine`` (one disk), a process server
    and a master target, protected."""
    tenant, operator = api.tenant(tenant)
    disk = f"{machine}-sda"
    tokens = {
        "agent": api.register(tenant, operator, "agent", machine,
                              disks=[{"id": disk, "device": "/dev/sda", "size": 1 << 30}]),
        "ps": api.register(tenant, operator, "process-server", "ps1", listen="127.0.0.1:7443"),
        "mt": api.register(tenant, operator, "master-target", "mt1", target_dir="/srv/t"),
    }  # fmt: skip
    answer = api.post(f"/tenants/{tenant}/machines/{machine}/protect", operator,
                      {"idempotency_key": "p1"})  # fmt: skip
    assert answer.status_code == 202, answer
    return {"tenant": tenant, "disk": disk, "operator": operator, **tokens}


def test_ids_with_dashes_never_share_a_queue_across_tenants(api):
    """Tenant ``acme`` with disk ``prod-web01-sda`` and tenant ``acme-prod`` with disk
    ``web01-sda`` once shared ``fd-acme-prod-web01-sda``: the second's process server
    could plant notices for the first's master target."""
    base = "a" + uuid.uuid4().hex[:8]
    victim = _estate(api, base, "prod-web01")
    attacker = _estate(api, f"{base}-prod", "web01")
    victim_queue = naming.disk_queue(victim["tenant"], victim["disk"])
    attacker_queue = naming.disk_queue(attacker["tenant"], attacker["disk"])
    assert victim_queue != attacker_queue
    grants = api.get("/components/self/storage", attacker["ps"]).json()
    assert victim_queue not in grants["queues"]
    forged = QueueClient(grants["queue_endpoint"], victim_queue,
                         credential=grants["queues"][attacker_queue])  # fmt: skip
    with pytest.raises(HttpResponseError) as refused:
        forged.send_message("forged resync notice")
    assert refused.value.status_code in (403, 404)


@pytest.mark.parametrize("make", [naming.disk_queue, naming.command_queue])
def test_derived_names_decode_to_one_pair(make):
    """Every split of the same dashed text gives a different name, long ids included."""
    words = ["corp", "ag", "sql01", "prod", "web01", "x" * 30]
    seen = {}
    for count in range(2, 5):
        for parts in itertools.permutations(words, count):
            text = "-".join(parts)
            for cut in range(1, count):
                first, second = "-".join(parts[:cut]), "-".join(parts[cut:])
                if len(first) > 40 or len(second) > 40:
                    continue
                name = make(first, second)
                assert len(name) <= 63 and name == name.lower()
                assert seen.setdefault(name, (first, second)) == (first, second), text


def test_numbers_are_checked_at_the_edge(api):
    """A 401-digit number once switched off a tenant's monitoring; 1e400 came back as Infinity."""
    tenant, operator = api.tenant()
    ps = api.register(tenant, operator, "process-server", "ps1", listen="127.0.0.1:7443")
    for raw in (b'{"status": {"spool": {"free_bytes": ' + b"9" * 401 + b', "total_bytes": 1}}}',
                b'{"status": {"spool": {"free_fraction": 1e400}}}'):  # fmt: skip
        answer = api.request("POST", "/components/self/heartbeat", ps, raw=raw,
                             headers={"content-type": "application/json"})  # fmt: skip
        assert answer.status_code == 400, answer
        assert "number" in answer.json()["error"]
    record = api.get("/components/self", ps).json()
    assert "Infinity" not in json.dumps(record)


def test_one_bad_record_does_not_switch_off_a_tenants_alerts(api):
    """Records stored before the edge checked numbers (or by a bug) are alerted on, one by
    one; a lost component of the same tenant is still alerted on."""
    from functions.core import monitoring

    tenant, operator = api.tenant()
    bad = api.register(tenant, operator, "process-server", "ps1", listen="127.0.0.1:7443")
    quiet = api.register(tenant, operator, "process-server", "ps2", listen="127.0.0.1:7444")
    for token in (bad, quiet):
        assert api.post("/components/self/heartbeat", token, {"status": {}}).status_code == 204
    api.ctx.store.mutate(
        "components", tenant, "ps-ps1",
        lambda r: {**r, "status": {"spool": {"free_bytes": 10**401, "total_bytes": 3}}},
    )  # fmt: skip
    api.clock.advance(3600)  # ps-ps2 goes quiet: it must be alerted on
    api.post("/components/self/heartbeat", bad, {})
    monitoring.sweep(api.ctx, [tenant])
    alerts = api.get(f"/tenants/{tenant}/alerts", operator).json()["alerts"]
    kinds = {(a["kind"], a["subject"]) for a in alerts}
    assert ("heartbeat-lost", "ps-ps2") in kinds
    assert ("unreadable", "ps-ps1") in kinds


def test_guessing_neither_locks_out_the_holder_nor_writes_for_unknown_tenants(api):
    """Five wrong guesses once locked a whole tenant (the right passphrase got 429 too), and
    guesses against tenants that do not exist created table rows without authentication."""
    tenant, operator = api.tenant()
    passphrase = api.passphrase(tenant, operator)
    body = {"kind": "agent", "name": "web01", "disks": []}
    for i in range(8):
        api.post("/register", body={"tenant": tenant, "passphrase": f"guess-{i}", **body})
    answer = api.post("/register", body={"tenant": tenant, "passphrase": passphrase, **body})
    assert answer.status_code == 201, answer
    ghost = "g" + uuid.uuid4().hex[:10]
    for i in range(3):
        answer = api.post("/register", body={"tenant": ghost, "passphrase": f"x{i}", **body})
        assert answer.status_code == 401 and "wrong passphrase" in answer.json()["error"]
    assert api.ctx.store.partition("guesses", ghost) == []


def test_reissuing_a_key_tightens_the_existing_files_mode(tmp_path):
    """``ferry pki issue`` into an existing 0644 key file once left it 0644."""
    from ferry import pki

    pki.make_ca(tmp_path / "ca")
    out = tmp_path / "out"
    out.mkdir()
    (out / "agent-web01.key").write_text("old")
    (out / "agent-web01.key").chmod(0o644)
    _, key = pki.issue(tmp_path / "ca", out, "agent-web01", tenants=["demo"], machine="web01")
    assert key.stat().st_mode & 0o777 == 0o600


def test_edges_target_dir_and_ports(api):
    """``target_dir`` once accepted ``..``; agent settings accepted port 99999."""
    from agent.settings import DiskSettings, Settings

    tenant, operator = api.tenant()
    body = {"tenant": tenant, "passphrase": api.passphrase(tenant, operator),
            "kind": "master-target", "name": "mt1", "target_dir": "/srv/../etc"}  # fmt: skip
    answer = api.post("/register", body=body)
    assert answer.status_code == 400 and ".." in answer.json()["error"]
    disk = DiskSettings(id="web01-sda", device="/dev/sda")
    settings = Settings("demo", "web01", "ps:99999", "ca", "c", "k", "/tmp", [disk])
    assert "1-65535" in settings.validate()


@pytest.mark.parametrize("kind", ["cutover", "protect"])
def test_concurrent_requests_open_one_job_per_machine_and_kind(api, kind):
    """Eight parallel cutover requests with different idempotency keys once made six open
    cutover jobs for one machine; protect had the same pattern."""
    estate = api.estate()
    if kind == "cutover":
        api.protect(estate)
        api.reach_recovery_points(estate)
    path = f"/tenants/{estate.tenant}/machines/{estate.machine}/{kind}"
    answers = []

    def ask(i: int) -> None:
        answers.append(api.post(path, estate.operator, {"idempotency_key": f"{kind}-race-{i}"}))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    accepted = [a for a in answers if a.status_code == 202]
    assert len(accepted) == 1, answers
    assert all(a.status_code == 409 for a in answers if a not in accepted), answers
    jobs = api.get(f"/tenants/{estate.tenant}/jobs", estate.operator).json()["jobs"]
    assert [j["job_id"] for j in jobs if j["kind"] == kind] == [accepted[0].json()["job"]["job_id"]]


def test_passphrases_cannot_take_over_a_registered_component(api):
    """Any passphrase once re-registered any existing id, a process server's included."""
    estate = api.estate()
    tenant, operator = estate.tenant, estate.operator
    body = {"tenant": tenant, "kind": "process-server", "name": "ps1", "listen": "127.0.0.1:1"}
    unbound = api.passphrase(tenant, operator)
    taken = api.post("/register", body={**body, "passphrase": unbound})
    assert taken.status_code == 409 and "already registered" in taken.json()["error"]
    assert api.get("/components/self", estate.ps).status_code == 200  # still the real one
    other = api.post(f"/tenants/{tenant}/passphrases", operator,
                     {"kind": "agent", "name": "web77"}).json()["passphrase"]  # fmt: skip
    wrong = api.post("/register", body={**body, "passphrase": other})
    assert wrong.status_code == 403 and "ag-web77" in wrong.json()["error"]
    bound = api.post(f"/tenants/{tenant}/passphrases", operator,
                     {"kind": "process-server", "name": "ps1"}).json()["passphrase"]  # fmt: skip
    again = api.post("/register", body={**body, "passphrase": bound})
    assert again.status_code == 201, again
    assert api.get("/components/self", estate.ps).status_code == 401  # the old token died


def test_operator_tokens_can_be_rotated_and_revoked(api):
    from functions_support import ADMIN_KEY

    tenant, operator = api.tenant()
    status = f"/tenants/{tenant}/status"
    rotated = api.post(f"/tenants/{tenant}/operator-token", operator, {})
    assert rotated.status_code == 201, rotated
    new = rotated.json()["operator_token"]
    assert api.get(status, operator).status_code == 401
    assert api.get(status, new).status_code == 200
    revoked = api.post(f"/tenants/{tenant}/operator-token", ADMIN_KEY, {})  # a leaked token
    assert revoked.status_code == 201
    assert api.get(status, new).status_code == 401
    other, other_operator = api.tenant()
    assert api.post(f"/tenants/{tenant}/operator-token", other_operator, {}).status_code == 403


def test_an_agent_certificate_cannot_serve_as_the_process_server(tmp_path):
    """``ferry pki issue`` once gave agent certificates server-auth usage and localhost
    names, and an agent certificate was accepted as the process server."""
    import socket
    import ssl

    from ferry import pki

    pki.make_ca(tmp_path / "ca")
    agent_cert, agent_key = pki.issue(tmp_path / "ca", tmp_path, "agent-web01",
                                      tenants=["demo"], machine="web01")  # fmt: skip
    with pytest.raises(ValueError, match="no host names"):
        pki.issue(tmp_path / "ca", tmp_path, "x", ["localhost"], tenants=["demo"], machine="m")
    ca = str(tmp_path / "ca" / "ca.pem")
    rogue = pki.server_context(ca, str(agent_cert), str(agent_key))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with contextlib.suppress(OSError, ssl.SSLError):
            rogue.wrap_socket(conn, server_side=True).recv(1)
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = pki.client_context(ca, str(agent_cert), str(agent_key))
    with (
        pytest.raises(ssl.SSLError),
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
    ):
        client.wrap_socket(raw, server_hostname="localhost").recv(1)
    thread.join(10)
    listener.close()
