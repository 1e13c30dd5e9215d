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
    from support.api import ADMIN_KEY

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


def test_segments_are_sealed_with_per_tenant_keys_that_rotate_without_loss(api):
    """No deployment once set a segment key (only a non-cryptographic checksum protected
    segments), and one key would have been shared by every process server and master target."""
    from ferry import segment
    from ferry.batch import Batch

    ours, theirs = api.estate(), api.estate(machine="db01", disks=1)
    for estate in (ours, theirs):
        api.protect(estate)
    ps = api.get("/components/self/settings", ours.ps).json()
    mt = api.get("/components/self/settings", ours.mt).json()
    assert ps["segment_key"] and mt["segment_keys"] == [ps["segment_key"]]
    their_ps = api.get("/components/self/settings", theirs.ps).json()
    assert their_ps["segment_key"] != ps["segment_key"]  # a key per tenant
    batch = Batch(tenant=ours.tenant, disk=ours.disks[0], gen=1, seq=1, disk_size=1 << 20,
                  extents=[(0, 4096, "d")], payload=b"x" * 4096, tag=None)  # fmt: skip
    in_flight, _ = segment.pack(batch, bytes.fromhex(ps["segment_key"]))
    rotated = api.post(f"/tenants/{ours.tenant}/segment-keys", ours.operator, {})
    assert rotated.status_code == 201 and "key" not in rotated.json()
    ps = api.get("/components/self/settings", ours.ps).json()
    mt = api.get("/components/self/settings", ours.mt).json()
    assert segment.key_id(bytes.fromhex(ps["segment_key"])) == rotated.json()["key_id"]
    ring = segment.keyring(*(bytes.fromhex(k) for k in mt["segment_keys"]))
    assert segment.unpack(in_flight, "s", key=ring).payload == batch.payload  # not lost
    assert api.post(f"/tenants/{ours.tenant}/segment-keys", theirs.operator, {}).status_code == 403


def test_the_cli_reads_its_token_from_a_private_file(tmp_path):
    """``--token`` once was the only way to give the CLI a token: on the command line."""
    import subprocess
    import sys

    token = tmp_path / "token"
    token.write_text("op.demo.secret\n")
    token.chmod(0o644)
    run = [sys.executable, "-m", "ferrycli.main", "status", "--server", "http://127.0.0.1:9",
           "--token-file", str(token)]  # fmt: skip
    loose = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert loose.returncode == 2 and "chmod 600" in loose.stderr
    token.chmod(0o600)
    tight = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert "chmod" not in tight.stderr and "secret" not in tight.stderr + tight.stdout
    assert tight.returncode == 75  # it got as far as calling the (absent) server


def test_wrong_credentials_are_rate_limited_per_client_address(api):
    """300 wrong tokens were once answered in 1.2 s, and nothing slowed the guessing down."""
    import dataclasses

    import azure.functions as func

    from functions import web
    from functions.core import context, tenants
    from functions.core.ratelimit import FailureLimiter

    tenant, operator = api.tenant()
    limited = dataclasses.replace(api.ctx, auth_failures=FailureLimiter(30))
    context.use(limited)
    try:
        answers = [api.get(f"/tenants/{tenant}/status", f"op.{tenant}.guess{i}").status_code
                   for i in range(40)]  # fmt: skip
        assert answers[:30] == [401] * 30 and answers[30:] == [429] * 10
        blocked = api.get(f"/tenants/{tenant}/status", f"op.{tenant}.guess99")
        assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) >= 59
        # Another address (Azure's front end appends it last) is not slowed down.
        request = func.HttpRequest(
            "POST", f"http://cs/tenants/{tenant}/passphrases", body=b"{}",
            headers={"authorization": f"Bearer {operator}", "x-forwarded-for": "192.0.2.7"},
        )  # fmt: skip
        elsewhere = web.handle(
            request, lambda ctx, caller, body: tenants.create_passphrase(ctx, caller, tenant, body),
            status=201, body=True,
        )  # fmt: skip
        assert elsewhere.status_code == 201
    finally:
        context.use(api.ctx)


def _grant(api, token: str) -> dict:
    answer = api.get("/components/self/storage", token)
    assert answer.status_code == 200, answer
    return answer.json()


def test_grants_reach_only_the_disks_a_component_serves(api):
    """Finding 8: a process server or master target of one machine could overwrite, read
    and delete another machine's segments, state, fence and lease (of its own tenant):
    its grant covered the tenant's containers.  Each is tried here with every container
    SAS the attacker holds, against every container the victim's components hold."""
    from azure.storage.blob import ContainerClient

    tenant, operator = api.tenant()
    tokens: dict[str, dict[str, str]] = {}
    for machine, n in (("web01", "1"), ("db02", "2")):
        tokens[machine] = {
            "ps": api.register(tenant, operator, "process-server", f"ps{n}",
                               listen=f"127.0.0.{n}:7443"),
            "mt": api.register(tenant, operator, "master-target", f"mt{n}", target_dir="/srv/t"),
        }  # fmt: skip
        api.register(
            tenant,
            operator,
            "agent",
            machine,
            disks=[{"id": f"{machine}-sda", "device": "/dev/sda", "size": 1 << 30}],
        )
        answer = api.post(f"/tenants/{tenant}/machines/{machine}/protect", operator,
                          {"idempotency_key": f"p-{machine}", "process_server": f"ps{n}",
                           "master_target": f"mt{n}"})  # fmt: skip
        assert answer.status_code == 202, answer
    victim = {kind: _grant(api, token) for kind, token in tokens["web01"].items()}
    attacker = {kind: _grant(api, token) for kind, token in tokens["db02"].items()}
    endpoint = victim["ps"]["blob_endpoint"]
    blob = naming.segment_blob(tenant, "web01-sda", 1, 1)
    theirs = {**victim["ps"]["containers"], **victim["mt"]["containers"]}
    victims = victim["ps"]["containers"]
    written = [
        n for n in victims if _writes(ContainerClient(endpoint, n, credential=victims[n]), blob)
    ]
    assert written, "the victim's own process server must be able to upload its segments"
    for kind, grant in attacker.items():
        for sas in grant["containers"].values():
            for name in theirs:
                stolen = ContainerClient(endpoint, name, credential=sas)
                assert not _writes(stolen, blob + ".forged"), f"{kind} wrote into {name}"
                _refused(stolen.download_blob, blob)
                _refused(stolen.delete_blob, blob)
        assert not set(grant["containers"]) & set(theirs), f"{kind} holds the victim's grants"
    # The victim's segment is still there, untouched.
    own = ContainerClient(endpoint, written[0], credential=victim["mt"]["containers"][written[0]])
    assert own.download_blob(blob).readall() == b"segment"


def _refused(call, *args) -> None:
    with pytest.raises(HttpResponseError) as caught:
        call(*args)
    assert caught.value.status_code in (403, 404), caught.value


def _writes(container, blob: str) -> bool:
    """Whether uploading ``blob`` with this client's SAS succeeds (False on 403/404)."""
    try:
        container.upload_blob(blob, b"segment", overwrite=True)
    except HttpResponseError as exc:
        assert exc.status_code in (403, 404), exc
        return False
    return True


def test_grants_insist_on_https_where_the_endpoint_is_https():
    """SAS grants once worked over plain HTTP even for an HTTPS account."""
    import datetime as dt

    from azure.storage.blob._shared.parser import DEVSTORE_ACCOUNT_KEY

    from functions.core.account import Account

    now = dt.datetime.now(dt.UTC)
    later = now + dt.timedelta(hours=1)
    cloud = Account.from_connection_string(
        "DefaultEndpointsProtocol=https;AccountName=ferrytest;"
        f"AccountKey={DEVSTORE_ACCOUNT_KEY};EndpointSuffix=core.windows.net"
    )
    assert "spr=https" in cloud.container_sas("ferry-t-segments", "r", now, later)
    assert "spr=https" in cloud.queue_sas("fd-1-t-d", "r", now, later)
    local = Account.from_connection_string(
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        f"AccountKey={DEVSTORE_ACCOUNT_KEY};BlobEndpoint=http://127.0.0.1:1/devstoreaccount1;"
        "QueueEndpoint=http://127.0.0.1:2/devstoreaccount1;TableEndpoint=http://127.0.0.1:3/devstoreaccount1"
    )
    assert "spr=" not in local.container_sas("ferry-t-segments", "r", now, later)


def test_the_azure_template_keeps_secrets_in_key_vault_and_uses_the_managed_identity():
    """The admin key was a plain app setting and the storage setting carried no key, so the
    managed-identity path was never taken and the app could not reach storage."""
    from pathlib import Path

    from functions.core import context

    template = json.loads(
        (Path(__file__).parents[1] / "roles/config_server/files/functionapp.arm.json").read_text()
    )
    resources = {r["type"]: r for r in template["resources"]}
    settings = {s["name"]: s["value"] for s in
                resources["Microsoft.Web/sites"]["properties"]["siteConfig"]["appSettings"]}  # fmt: skip
    assert settings["FERRY_ADMIN_KEY"].startswith("[concat('@Microsoft.KeyVault(SecretUri=")
    assert "adminKey" not in json.dumps(resources["Microsoft.Web/sites"])
    assert resources["Microsoft.KeyVault/vaults"]["properties"]["enableRbacAuthorization"]
    assert resources["Microsoft.KeyVault/vaults/secrets"]["properties"]["value"] == (
        "[parameters('adminKey')]")  # fmt: skip
    assert "FERRY_STORAGE" not in settings
    # What the app reads in Azure: the managed-identity settings, with the secret resolved.
    env = {"FERRY_STORAGE__accountName": "ferrystore", "FERRY_ADMIN_KEY": "k" * 32}
    assert set(settings) >= {"FERRY_STORAGE__accountName", "FERRY_ADMIN_KEY"}
    assert context.settings_problem(env) is None
    granted = [r["properties"]["roleDefinitionId"] for r in template["resources"]
               if r["type"] == "Microsoft.Authorization/roleAssignments"]  # fmt: skip
    assert any("secretsUser" in g for g in granted)


def test_the_deploy_job_takes_its_ca_tokens_and_host_keys_from_the_secret_store():
    """The GitOps deploy job made a new CA on every run, lost the operator token between
    runs, put the ARM token unmasked into the job's environment and pinned no host key."""
    from pathlib import Path

    import yaml

    workflow = yaml.safe_load(
        (Path(__file__).parents[1] / ".github/workflows/ferry.yml").read_text()
    )
    steps = workflow["jobs"]["deploy"]["steps"]
    text = json.dumps(steps)
    assert "GITHUB_ENV" not in text and "get-access-token" not in text
    secrets_step = next(s for s in steps if "SSH_KEY" in s.get("env", {}))
    for name in ("KNOWN_HOSTS", "CA_CERT", "CA_KEY", "OPERATOR_TOKEN"):
        assert name in secrets_step["env"], name
    for step in steps:
        if "ansible-playbook" in step.get("run", ""):
            assert step["env"]["ANSIBLE_HOST_KEY_CHECKING"] == "True"
            assert 'ferry_pki_dir="$RUNNER_TEMP/pki"' in step["run"]
