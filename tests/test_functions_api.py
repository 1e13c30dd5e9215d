"""The configuration server's API end to end: ASGI app, real Azurite, no mocks."""

from __future__ import annotations

import threading

import pytest
from support.api import take_commands

from agent.settings import Settings as AgentSettings
from ferry import naming
from ferry.settings import from_mapping
from functions.core import monitoring
from mastertarget.settings import Settings as MasterTargetSettings
from processserver.settings import Settings as ProcessServerSettings


def test_a_component_registers_and_sees_only_its_own_record(api):
    tenant, operator = api.tenant()
    passphrase = api.passphrase(tenant, operator)
    disks = [{"id": "web01-disk0", "device": "/dev/sdb", "size": 1 << 30}]
    answer = api.post(
        "/register",
        body={
            "tenant": tenant,
            "passphrase": passphrase,
            "kind": "agent",
            "name": "web01",
            "disks": disks,
        },
    )
    assert answer.status_code == 201, answer
    registered = answer.json()
    assert registered["component_id"] == "ag-web01"
    assert registered["command_queue"] == naming.command_queue(tenant, "ag-web01")
    assert registered["token"].startswith(f"c.{tenant}.ag-web01.")
    me = api.get("/components/self", registered["token"]).json()
    assert me["kind"] == "agent" and me["disks"] == ["web01-disk0"]
    assert not any("token" in key for key in me)
    machines = api.get(f"/tenants/{tenant}/machines", operator).json()["machines"]
    assert [m["machine"] for m in machines] == ["web01"]
    assert machines[0]["disks"][0] == {
        "id": "web01-disk0",
        "device": "/dev/sdb",
        "size": 1 << 30,
        "state": "registered",
        "process_server": None,
        "master_target": None,
    }


def test_protect_makes_one_job_and_one_protect_command_per_component(api):
    estate = api.estate()
    first = api.protect(estate, key="k1")
    again = api.protect(estate, key="k1")
    assert again["job_id"] == first["job_id"] and again["state"] == "running"
    other = api.post(
        f"/tenants/{estate.tenant}/machines/{estate.machine}/protect",
        estate.operator,
        {"idempotency_key": "k2"},
    )
    assert other.status_code == 409 and first["job_id"] in other.json()["error"]
    seen = {}
    for component in ("ag-web01", "ps-ps1", "mt-mt1"):
        messages = take_commands(api, estate.tenant, component)
        assert [m["type"] for m in messages] == ["protect"], component
        seen[component] = messages[0]
    assert len({m["id"] for m in seen.values()}) == 1
    args = seen["ag-web01"]["args"]
    assert args["process_server"] == "10.0.0.5:7443" and args["master_target"] == "mt-mt1"
    assert [d["id"] for d in args["disks"]] == estate.disks
    assert args["consistency_group"] == estate.machine


def test_a_machine_is_protected_once_every_disk_reached_a_recovery_point(api):
    estate = api.estate()
    job = api.protect(estate)
    tag = {"id": "1-4", "kind": "crash", "t0_wall": api.clock() - 5}
    point = {"disk": estate.disks[0], "tag": tag, "gen": 1, "seq": 4}
    assert api.post("/components/self/recovery-points", estate.mt, point).status_code == 204
    assert api.post("/components/self/recovery-points", estate.mt, point).status_code == 204
    job_path = f"/tenants/{estate.tenant}/jobs/{job['job_id']}"
    assert api.get(job_path, estate.operator).json()["state"] == "running"
    api.reach_recovery_points(estate, gen=1, seq=9)
    done = api.get(job_path, estate.operator).json()
    assert done["state"] == "protected"
    assert [h["state"] for h in done["history"]] == ["running", "protected"]
    listing = api.get(
        f"/tenants/{estate.tenant}/recovery-points",
        estate.operator,
        query={"disk": estate.disks[0]},
    ).json()["recovery_points"]
    assert [(p["gen"], p["seq"]) for p in listing] == [(1, 9), (1, 4)]
    limited = api.get(
        f"/tenants/{estate.tenant}/recovery-points",
        estate.operator,
        query={"machine": estate.machine, "limit": "1"},
    ).json()["recovery_points"]
    assert len(limited) == 1
    status = api.get(f"/tenants/{estate.tenant}/status", estate.operator).json()
    assert status["machines"][0]["state"] == "protected"


def test_settings_fit_each_daemons_settings_schema(api):
    estate = api.estate()
    refused = api.get("/components/self/settings", estate.agent)
    assert refused.status_code == 409 and "not protected" in refused.json()["error"]
    api.protect(estate)
    local_paths = {
        "ca": "/etc/ferry/ca.pem",
        "cert": "/etc/ferry/c.pem",
        "key": "/etc/ferry/c.key",
        "state_dir": "/var/lib/ferry",
    }
    agent = api.get("/components/self/settings", estate.agent).json()
    agent.pop("storage")
    parsed = from_mapping({**agent, **local_paths}, AgentSettings)
    assert parsed.process_server == "10.0.0.5:7443"
    assert [d.id for d in parsed.disks] == estate.disks
    target = api.get("/components/self/settings", estate.mt).json()
    assert set(target.pop("storage")["containers"]) == {
        name(estate.tenant, disk)
        for disk in estate.disks
        for name in (naming.segments_container, naming.control_container)
    }
    parsed = from_mapping({**target, "state_dir": "/var/lib/ferry"}, MasterTargetSettings)
    assert str(parsed.disks[0].target) == f"/srv/targets/{estate.disks[0]}.img"
    server = api.get("/components/self/settings", estate.ps).json()
    server.pop("storage")
    paths = {k: v for k, v in local_paths.items()}
    assert from_mapping({**server, **paths}, ProcessServerSettings).listen == "10.0.0.5:7443"


def test_status_joins_reports_heartbeats_and_health(api):
    estate = api.estate()
    api.protect(estate)
    assert (
        api.post("/components/self/heartbeat", estate.agent, {"status": {"x": 1}}).status_code
        == 204
    )
    report = {
        "phase": "streaming",
        "gen": 1,
        "bytes_to_go": 10,
        "backlog": 2,
        "throughput": 1e6,
        "rpo_s": 90.5,
        "last_tag": {"id": "1-3"},
        "extra": "ignored",
    }
    disk = estate.disks[0]
    assert (
        api.post(f"/components/self/disks/{disk}/report", estate.agent, report).status_code == 204
    )
    applied = {
        "gen": 1,
        "applied_seq": 3,
        "last_tag": {"id": "1-3", "kind": "crash"},
        "resync_required_gen": None,
    }
    assert api.post(f"/components/self/disks/{disk}/report", estate.mt, applied).status_code == 204
    status = api.get(f"/tenants/{estate.tenant}/status", estate.operator).json()
    machine = status["machines"][0]
    view = machine["disks"][0]
    assert (view["phase"], view["rpo_s"], view["applied_seq"], view["health"]) == (
        "streaming",
        90.5,
        3,
        "lagging",
    )
    assert machine["health"] == "lagging"
    assert {c["component_id"]: c["state"] for c in status["components"]}["ag-web01"] == "ok"
    api.post(f"/components/self/disks/{disk}/report", estate.agent, {"phase": "resync-wait"})
    status = api.get(f"/tenants/{estate.tenant}/status", estate.operator).json()
    assert status["machines"][0]["disks"][0]["health"] == "resync"
    bad = api.post(f"/components/self/disks/{disk}/report", estate.agent, {"gen": -1})
    assert bad.status_code == 400 and "gen" in bad.json()["error"]
    # Cut over: the master target reports the disk fenced at its final tag.
    fenced = {"tag": {"id": "1-9", "final": True}, "reason": "final tag (cutover)", "at": 1.0}
    report = {"applied_seq": 9, "fenced": fenced, "held": False}
    assert api.post(f"/components/self/disks/{disk}/report", estate.mt, report).status_code == 204
    view = api.get(f"/tenants/{estate.tenant}/status", estate.operator).json()["machines"][0]
    assert (view["disks"][0]["phase"], view["disks"][0]["fenced"]) == ("fenced", fenced)
    bad = api.post(f"/components/self/disks/{disk}/report", estate.mt, {"fenced": "yes"})
    assert bad.status_code == 400 and "fenced" in bad.json()["error"]


def test_commands_are_queued_once_per_key_and_reported(api):
    estate = api.estate()
    api.protect(estate)
    for component in ("ag-web01", "ps-ps1", "mt-mt1"):
        take_commands(api, estate.tenant, component)
    path = f"/tenants/{estate.tenant}/machines/{estate.machine}/commands"
    body = {"command": "tag", "args": {"kind": "app"}, "idempotency_key": "tag-1"}
    first = api.post(path, estate.operator, body)
    assert first.status_code == 202
    assert api.post(path, estate.operator, body).json() == first.json()
    messages = take_commands(api, estate.tenant, "ag-web01")
    assert [(m["id"], m["type"], m["args"]["kind"]) for m in messages] == [
        (first.json()["command_id"], "tag", "app")
    ]
    drain = api.post(path, estate.operator, {"command": "drain"}).json()["command_id"]
    for component in ("ag-web01", "ps-ps1", "mt-mt1"):
        assert [m["id"] for m in take_commands(api, estate.tenant, component)] == [drain]
    done = api.post(f"/components/self/commands/{drain}", estate.ps, {"state": "done"})
    assert done.status_code == 204
    tag_id = first.json()["command_id"]
    assert (
        api.post(f"/components/self/commands/{tag_id}", estate.ps, {"state": "done"}).status_code
        == 404
    )
    reused = api.post(path, estate.operator, {"command": "pause", "idempotency_key": "tag-1"})
    assert reused.status_code == 409
    bad = api.post(path, estate.operator, {"command": "tag", "args": {"kind": "warm"}})
    assert bad.status_code == 400 and "kind" in bad.json()["error"]
    # Operators read a command's outcome per target.
    outcome = api.get(f"/tenants/{estate.tenant}/commands/{drain}", estate.operator).json()
    states = {t: o["state"] for t, o in outcome["command"]["targets"].items()}
    assert states == {"ag-web01": "queued", "ps-ps1": "done", "mt-mt1": "queued"}
    assert (
        api.get(f"/tenants/{estate.tenant}/commands/cmd-nope", estate.operator).status_code == 404
    )
    assert api.get(f"/tenants/{estate.tenant}/commands/{drain}", estate.agent).status_code in (
        401,
        403,
    )
    final = api.post(path, estate.operator, {"command": "drain", "args": {"final": True}}).json()
    (message,) = take_commands(api, estate.tenant, "ag-web01")
    assert (message["id"], message["args"]["final"]) == (final["command_id"], True)
    bad = api.post(path, estate.operator, {"command": "drain", "args": {"final": "yes"}})
    assert bad.status_code == 400 and "final" in bad.json()["error"]


def test_rotation_sends_no_credential_through_the_queue(api):
    estate = api.estate()
    path = f"/tenants/{estate.tenant}/machines/{estate.machine}/commands"
    assert api.post(path, estate.operator, {"command": "rotate-credentials"}).status_code == 202
    (message,) = take_commands(api, estate.tenant, "ag-web01")
    assert message["args"] == {"machine": "web01"}  # "rotate", and nothing secret
    answer = api.post("/components/self/credentials", estate.agent, {})
    assert answer.status_code == 201, answer
    new = answer.json()["token"]
    assert api.post("/components/self/credentials", estate.operator, {}).status_code == 403
    assert new != estate.agent and new.startswith(f"c.{estate.tenant}.ag-web01.")
    assert api.get("/components/self", estate.agent).status_code == 200  # old works until...
    assert api.get("/components/self", new).status_code == 200  # ...the new one is used
    assert api.get("/components/self", estate.agent).status_code == 401
    record = api.ctx.store.get("commands", estate.tenant, message["id"])
    assert "token" not in record["args"]


def test_a_process_server_or_master_target_is_stopped_or_rotated_on_its_own(api):
    estate = api.estate()
    for component in ("ag-web01", "ps-ps1", "mt-mt1"):
        take_commands(api, estate.tenant, component)
    path = f"/tenants/{estate.tenant}/components/mt-mt1/commands"
    body = {"command": "rotate-credentials", "idempotency_key": "rotate-mt1"}
    first = api.post(path, estate.operator, body)
    assert first.status_code == 202
    assert api.post(path, estate.operator, body).json() == first.json()
    (message,) = take_commands(api, estate.tenant, "mt-mt1")
    assert message["type"] == "rotate-credentials" and message["args"] == {}
    assert take_commands(api, estate.tenant, "ps-ps1") == []
    assert take_commands(api, estate.tenant, "ag-web01") == []
    new = api.post("/components/self/credentials", estate.mt, {}).json()["token"]
    assert new.startswith(f"c.{estate.tenant}.mt-mt1.")
    assert api.get("/components/self", new).status_code == 200
    stop = api.post(f"/tenants/{estate.tenant}/components/ps-ps1/commands", estate.operator,
                    {"command": "stop"}).json()  # fmt: skip
    (message,) = take_commands(api, estate.tenant, "ps-ps1")
    assert (message["id"], message["type"], message["args"]) == (stop["command_id"], "stop", {})
    missing = api.post(f"/tenants/{estate.tenant}/components/ps-nope/commands", estate.operator,
                       {"command": "stop"})  # fmt: skip
    assert missing.status_code == 404 and "ps-nope" in missing.json()["error"]
    bad = api.post(path, estate.operator, {"command": "tag"})
    assert bad.status_code == 400 and "command" in bad.json()["error"]
    assert api.post(path, estate.agent, {"command": "stop"}).status_code in (401, 403)


def _protected(api):
    estate = api.estate()
    api.protect(estate)
    api.reach_recovery_points(estate)
    return estate


def test_cutover_is_one_job_per_key_and_follows_its_states(api):
    estate = api.estate()
    path = f"/tenants/{estate.tenant}/machines/{estate.machine}/cutover"
    early = api.post(path, estate.operator, {"idempotency_key": "cut-0"})
    assert early.status_code == 409 and "not protected" in early.json()["error"]
    api.protect(estate)
    api.reach_recovery_points(estate)
    first = api.post(path, estate.operator, {"idempotency_key": "cut-1"})
    assert first.status_code == 202 and first.json()["job"]["state"] == "requested"
    assert api.post(path, estate.operator, {"idempotency_key": "cut-1"}).json() == first.json()
    second = api.post(path, estate.operator, {"idempotency_key": "cut-2"})
    assert second.status_code == 409 and "already requested" in second.json()["error"]
    wrong = api.post(
        f"/tenants/{estate.tenant}/machines/{estate.machine}/test-failover",
        estate.operator,
        {"idempotency_key": "cut-1"},
    )
    assert wrong.status_code == 409 and "idempotency key" in wrong.json()["error"]
    job_id = first.json()["job"]["job_id"]
    progress = f"/tenants/{estate.tenant}/jobs/{job_id}/progress"
    for component in ("ag-web01", "ps-ps1", "mt-mt1"):
        take_commands(api, estate.tenant, component)
    skip = api.post(progress, estate.operator, {"state": "applied"})
    assert skip.status_code == 409 and "can go to draining, failed" in skip.json()["error"]
    for state in ("draining", "draining", "applied", "cutover-complete"):
        answer = api.post(progress, estate.operator, {"state": state, "detail": f"step {state}"})
        assert answer.status_code == 200, answer
    for component in ("ag-web01", "ps-ps1", "mt-mt1"):
        assert [m["type"] for m in take_commands(api, estate.tenant, component)] == ["drain"]
    job = api.get(f"/tenants/{estate.tenant}/jobs/{job_id}", estate.operator).json()
    assert [h["state"] for h in job["history"]] == [
        "requested",
        "draining",
        "applied",
        "cutover-complete",
    ]
    after = api.post(progress, estate.operator, {"state": "failed"})
    assert after.status_code == 409
    jobs = api.get(f"/tenants/{estate.tenant}/jobs", estate.operator).json()["jobs"]
    assert [j["kind"] for j in jobs if j["kind"] != "passphrase"] == ["cutover", "protect"]
    assert "history" not in jobs[0]
    made = [j for j in jobs if j["kind"] == "passphrase"]  # every action is a job, too
    assert len(made) == 3 and all(j["state"] == "done" for j in made)


def test_test_failover_goes_ready_then_cleaned(api):
    estate = _protected(api)
    answer = api.post(
        f"/tenants/{estate.tenant}/machines/{estate.machine}/test-failover",
        estate.operator,
        {"idempotency_key": "tf-1"},
    )
    assert answer.status_code == 202
    job_id = answer.json()["job"]["job_id"]
    progress = f"/tenants/{estate.tenant}/jobs/{job_id}/progress"
    assert api.post(progress, estate.operator, {"state": "ready"}).json()["job"]["state"] == "ready"
    assert api.post(progress, estate.operator, {"state": "cleaned"}).status_code == 200
    bad = api.post(progress, estate.operator, {"state": "draining"})
    assert bad.status_code == 400 and "must be one of" in bad.json()["error"]


def test_a_failed_protect_command_fails_its_job(api):
    estate = api.estate()
    job = api.protect(estate)
    answer = api.post(
        f"/components/self/commands/{job['command_id']}",
        estate.mt,
        {"state": "failed", "detail": "cannot open /srv/targets"},
    )
    assert answer.status_code == 204
    failed = api.get(f"/tenants/{estate.tenant}/jobs/{job['job_id']}", estate.operator).json()
    assert failed["state"] == "failed"
    assert failed["history"][-1]["detail"] == "mt-mt1: cannot open /srv/targets"


# -- alerts --------------------------------------------------------------------------------


def _alerts(api, estate, only_open=True):
    query = {"open": "true"} if only_open else {}
    answer = api.get(f"/tenants/{estate.tenant}/alerts", estate.operator, query=query)
    return {(a["kind"], a["subject"]): a for a in answer.json()["alerts"]}


def test_alerts_are_raised_and_cleared_by_the_timer(api):
    estate = _protected(api)
    for token in (estate.agent, estate.ps, estate.mt):
        api.post("/components/self/heartbeat", token, {})
    disk = estate.disks[0]
    api.post(f"/components/self/disks/{disk}/report", estate.agent, {"rpo_s": 75})
    api.post(
        f"/components/self/disks/{estate.disks[1]}/report",
        estate.mt,
        {"resync_required_gen": 2, "reason": "gap"},
    )
    spool = {"spool": {"bytes": 72, "limit_bytes": 100}}
    api.post("/components/self/heartbeat", estate.ps, {"status": spool})
    monitoring.sweep(api.ctx, [estate.tenant])
    raised = _alerts(api, estate)
    assert set(raised) == {("rpo", disk), ("resync", estate.disks[1]), ("spool", "ps-ps1")}
    assert raised[("spool", "ps-ps1")]["severity"] == "warning"
    spool["spool"]["bytes"] = 80
    api.post("/components/self/heartbeat", estate.ps, {"status": spool})
    monitoring.sweep(api.ctx, [estate.tenant])
    monitoring.sweep(api.ctx, [estate.tenant])
    again = _alerts(api, estate)
    assert again[("spool", "ps-ps1")]["severity"] == "critical"
    assert again[("spool", "ps-ps1")]["id"] == raised[("spool", "ps-ps1")]["id"]
    # Conditions end: everything clears; the records stay.
    api.post(f"/components/self/disks/{disk}/report", estate.agent, {"rpo_s": 3})
    api.post(
        f"/components/self/disks/{estate.disks[1]}/report", estate.mt, {"resync_required_gen": None}
    )
    api.post(
        "/components/self/heartbeat",
        estate.ps,
        {"status": {"spool": {"bytes": 1, "limit_bytes": 100}}},
    )
    monitoring.sweep(api.ctx, [estate.tenant])
    assert _alerts(api, estate) == {}
    kept = _alerts(api, estate, only_open=False)
    assert len(kept) == 3 and all(a["cleared_at"] for a in kept.values())


def test_a_filling_spool_filesystem_raises_the_spool_alert(api):
    # Far under its configured limit, but the filesystem under the spool is
    # nearly full (the process server reports both): the alert must see the disk.
    estate = _protected(api)
    status = {"spool": {"bytes": 10, "limit_bytes": 100, "free_fraction": 0.9,
                        "fs_free_bytes": 20 << 20, "fs_total_bytes": 100 << 20}}  # fmt: skip
    api.post("/components/self/heartbeat", estate.ps, {"status": status})
    monitoring.sweep(api.ctx, [estate.tenant])
    alert = _alerts(api, estate)[("spool", "ps-ps1")]
    assert alert["severity"] == "critical" and "20% free" in alert["message"]
    status["spool"]["fs_free_bytes"] = 28 << 20
    api.post("/components/self/heartbeat", estate.ps, {"status": status})
    monitoring.sweep(api.ctx, [estate.tenant])
    assert _alerts(api, estate)[("spool", "ps-ps1")]["severity"] == "warning"
    status["spool"]["fs_free_bytes"] = 60 << 20
    api.post("/components/self/heartbeat", estate.ps, {"status": status})
    monitoring.sweep(api.ctx, [estate.tenant])
    assert ("spool", "ps-ps1") not in _alerts(api, estate)


def test_a_silent_component_is_lost_then_found(api):
    estate = _protected(api)
    api.post("/components/self/heartbeat", estate.agent, {})
    api.clock.advance(61)
    totals = monitoring.sweep(api.ctx, [estate.tenant])
    assert totals["lost"] == 1
    lost = _alerts(api, estate)[("heartbeat-lost", "ag-web01")]
    assert lost["severity"] == "critical"
    status = api.get(f"/tenants/{estate.tenant}/status", estate.operator).json()
    assert status["machines"][0]["health"] == "lost"
    api.post("/components/self/heartbeat", estate.agent, {})
    monitoring.sweep(api.ctx, [estate.tenant])
    assert ("heartbeat-lost", "ag-web01") not in _alerts(api, estate)
    api.clock.advance(61)
    monitoring.sweep(api.ctx, [estate.tenant])
    second = _alerts(api, estate)[("heartbeat-lost", "ag-web01")]
    assert second["id"] != lost["id"]  # a new episode, a new record


# -- optimistic concurrency -------------------------------------------------------------


def test_concurrent_changes_to_one_record_are_never_lost(api):
    tenant = api.tenant()[0]
    api.ctx.store.create("jobs", tenant, "job-counter", {"n": 0})
    errors = []

    def bump():
        try:
            for _ in range(15):
                api.ctx.store.mutate(
                    "jobs", tenant, "job-counter", lambda r: {**r, "n": r["n"] + 1}
                )
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert api.ctx.store.get("jobs", tenant, "job-counter")["n"] == 60


def test_a_record_larger_than_one_table_property_round_trips(api):
    tenant = api.tenant()[0]
    record = {"history": [{"detail": "x" * 1000, "n": i} for i in range(150)]}
    assert api.ctx.store.create("jobs", tenant, "job-big", record)
    assert api.ctx.store.get("jobs", tenant, "job-big") == record
    grown = api.ctx.store.mutate("jobs", tenant, "job-big", lambda r: {**r, "more": "y" * 70000})
    assert api.ctx.store.partition("jobs", tenant) == [grown]


def test_concurrent_reports_by_agent_and_master_target_both_land(api):
    estate = api.estate(disks=1)
    api.protect(estate)
    disk = estate.disks[0]
    results = []

    def report(token, body):
        for i in range(8):
            results.append(
                api.post(
                    f"/components/self/disks/{disk}/report", token, {**body, "gen": i}
                ).status_code
            )

    threads = [
        threading.Thread(target=report, args=(estate.agent, {"rpo_s": 1})),
        threading.Thread(target=report, args=(estate.mt, {"applied_seq": 7})),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results) == {204}
    record = api.ctx.store.get("disks", estate.tenant, disk)
    assert record["agent_report"]["gen"] == 7 and record["master_target_report"]["gen"] == 7


@pytest.mark.parametrize("ttl", [59, 604801, "60", True])
def test_passphrase_lifetimes_out_of_range_are_refused(api, ttl):
    tenant, operator = api.tenant()
    answer = api.post(f"/tenants/{tenant}/passphrases", operator, {"ttl_seconds": ttl})
    assert answer.status_code == 400 and "ttl_seconds" in answer.json()["error"]


def test_recovery_points_are_listed_per_machine_and_only_retained_ones_are_restorable(api):
    estate = _protected(api)
    now = api.clock()  # the three tags come after the point _protected reached
    # Three machine-wide tags; disk0's journal keeps all since the second, disk1's only its own.
    for i, t0 in enumerate((now + 1, now + 2, now + 3), start=1):
        for disk in estate.disks:
            tag = {"id": f"web01-{i}", "kind": "app" if i == 2 else "crash", "t0_wall": t0}
            answer = api.post("/components/self/recovery-points", estate.mt,
                              {"disk": disk, "tag": tag, "gen": 1, "seq": 10 + i})  # fmt: skip
            assert answer.status_code == 204
    journal = {"enabled": True, "points": 2, "bytes": 10, "budget_bytes": 100,
               "oldest_t0_wall": now + 2, "all_since": now + 2, "kept": [], "cut_short": None}  # fmt: skip
    api.post(f"/components/self/disks/{estate.disks[0]}/report", estate.mt, {"journal": journal})
    path = f"/tenants/{estate.tenant}/recovery-points"
    answer = api.get(path, estate.operator, query={"machine": estate.machine}).json()
    per_disk = {(p["disk"], p["tag_id"]): p["restorable"] for p in answer["recovery_points"]}
    assert per_disk[(estate.disks[0], "web01-1")] is False
    assert per_disk[(estate.disks[0], "web01-2")] is True
    assert per_disk[(estate.disks[1], "web01-2")] is False, "disk1 reports no journal"
    assert per_disk[(estate.disks[1], "web01-3")] is True, "the latest point always is"
    points = answer["points"]
    assert [p["tag_id"] for p in points][:3] == ["web01-3", "web01-2", "web01-1"]
    assert points[1]["kind"] == "app" and points[1]["disks"] == sorted(estate.disks)
    assert [p["restorable"] for p in points] == [True, False, False, False]
    assert points[1]["restorable_on"] == [estate.disks[0]]
    # disk1's journal now keeps web01-2 (thinned: listed in kept).
    api.post(f"/components/self/disks/{estate.disks[1]}/report", estate.mt,
             {"journal": journal | {"all_since": now + 3, "kept": ["web01-2"]}})  # fmt: skip
    only = api.get(path, estate.operator,
                   query={"machine": estate.machine, "restorable": "true"}).json()  # fmt: skip
    assert [p["tag_id"] for p in only["points"]] == ["web01-3", "web01-2"]
    assert all(p["restorable"] for p in only["recovery_points"])
    # The budget cut retention short: an alert, cleared when the journal says so no more.
    cut = journal | {"cut_short": {"at": now, "reason": "budget of 100 bytes reached"}}
    api.post(f"/components/self/disks/{estate.disks[0]}/report", estate.mt, {"journal": cut})
    monitoring.sweep(api.ctx, [estate.tenant])
    alerts = _alerts(api, estate)
    assert ("journal", estate.disks[0]) in alerts
    assert "journal_budget_mib" in alerts[("journal", estate.disks[0])]["message"]
    api.post(f"/components/self/disks/{estate.disks[0]}/report", estate.mt, {"journal": journal})
    monitoring.sweep(api.ctx, [estate.tenant])
    assert ("journal", estate.disks[0]) not in _alerts(api, estate)


def test_recovery_points_since_a_time_and_thinned_to_one_per_slice(api):
    estate = _protected(api)  # its first point, 1-5, is older than all of these
    api.clock.advance(120)
    # A minute boundary after 1-5's minute (so slices are predictable), a minute ago at most.
    base = (int(api.clock()) // 60 - 1) * 60
    reported = api.clock()
    for i in range(12):  # a tag every 10 s on both disks, reported 10 s apart
        for disk in estate.disks:
            tag = {"id": f"web01-{i}", "kind": "crash", "t0_wall": base + 10 * i}
            answer = api.post("/components/self/recovery-points", estate.mt,
                              {"disk": disk, "tag": tag, "gen": 1, "seq": 10 + i})  # fmt: skip
            assert answer.status_code == 204
        api.clock.advance(10)
    path = f"/tenants/{estate.tenant}/recovery-points"

    def listed(**query) -> dict:
        answer = api.get(path, estate.operator, query={"machine": estate.machine, **query})
        assert answer.status_code == 200, answer
        return answer.json()

    def tags(rows: list[dict], disk: str) -> list[str]:
        return [p["tag_id"] for p in rows if p.get("disk", disk) == disk]

    whole = listed(limit=1000)
    assert "earlier" not in whole and len(whole["recovery_points"]) == 2 * 13
    # Reported from `since` on (the server's clock): web01-6 onwards.
    since = listed(since=f"{reported + 55.5:.3f}", limit=1000)  # decimals are allowed
    for disk in estate.disks:
        assert tags(since["recovery_points"], disk) == [f"web01-{i}" for i in (11, 10, 9, 8, 7, 6)]
        assert tags(since["earlier"], disk) == ["web01-5"]  # what held at `since`
    # Slices of 30 s from the epoch: 6-8 and 9-11 are two, each shown by its newest point.
    thinned = listed(since=f"{reported + 55:.3f}", every="30")
    for disk in estate.disks:
        assert tags(thinned["recovery_points"], disk) == ["web01-11", "web01-8"]
    assert [p["tag_id"] for p in thinned["points"]] == ["web01-11", "web01-8"]
    assert [p["tag_id"] for p in listed(every="60", limit=1000)["points"]] == [
        "web01-11", "web01-5", "1-5"]  # fmt: skip
    # Nothing before `since` at all: `earlier` is empty (the server kept none).
    assert listed(since=str(1))["earlier"] == []
    for bad in ({"since": "soon"}, {"since": "1e9"}, {"since": "-5"}, {"every": "0"},
                {"every": "86401"}):  # fmt: skip
        answer = api.get(path, estate.operator, query=bad)
        assert answer.status_code == 400 and next(iter(bad)) in answer.json()["error"]


def test_a_test_failover_names_its_point(api):
    estate = _protected(api)
    path = f"/tenants/{estate.tenant}/machines/{estate.machine}/test-failover"
    both = api.post(path, estate.operator, {"idempotency_key": "tf-x", "point": "web01-1",
                                            "point_time": 5.0})  # fmt: skip
    assert both.status_code == 400 and "not both" in both.json()["error"]
    answer = api.post(path, estate.operator, {"idempotency_key": "tf-1", "point": "web01-1"})
    assert answer.status_code == 202 and answer.json()["job"]["point"] == {"point": "web01-1"}
    cut = f"/tenants/{estate.tenant}/machines/{estate.machine}/cutover"
    answer = api.post(cut, estate.operator, {"idempotency_key": "co-1", "point_time": 1795671234.5})
    assert answer.status_code == 202 and answer.json()["job"]["point"] == {
        "point_time": 1795671234.5
    }


def test_protect_gives_each_disk_the_target_configured_for_it(api):
    estate = api.estate()
    path = f"/tenants/{estate.tenant}/machines/{estate.machine}/protect"
    lun = "/dev/disk/azure/scsi1/lun0"
    for targets, problem in (
        ({"web09-disk0": {"kind": "device", "path": lun}}, "is not a disk of this machine"),
        ({estate.disks[0]: {"kind": "blob", "path": "/x"}}, "kind must be one of"),
        ({estate.disks[0]: {"kind": "device", "path": "/srv/x.img"}}, "a path under /dev/"),
        ({estate.disks[0]: {"kind": "file", "path": "/srv/../etc/x"}}, "without '..'"),
        ({estate.disks[0]: {"kind": "device"}}, "path"),
    ):
        refused = api.post(path, estate.operator, {"idempotency_key": "t", "targets": targets})
        assert refused.status_code == 400 and problem in refused.json()["error"], refused.json()
    answer = api.post(path, estate.operator, {"idempotency_key": "t1", "targets": {
        estate.disks[0]: {"kind": "device", "path": lun}}})  # fmt: skip
    assert answer.status_code == 202, answer.json()
    settings = api.get("/components/self/settings", estate.mt).json()
    settings.pop("storage")
    assert settings["disks"] == [
        {"id": estate.disks[0], "target": lun, "kind": "device", "size": 1 << 30},
        {"id": estate.disks[1], "target": f"/srv/targets/{estate.disks[1]}.img", "kind": "file",
         "size": 1 << 30},
    ]  # fmt: skip
    parsed = from_mapping({**settings, "state_dir": "/var/lib/ferry"}, MasterTargetSettings)
    assert [(d.kind, str(d.target)) for d in parsed.disks][0] == ("device", lun)


def test_replication_resumes_after_an_uncommitted_cutover_and_never_after_a_committed_one(api):
    estate = _protected(api)
    base = f"/tenants/{estate.tenant}/machines/{estate.machine}"
    cut = api.post(f"{base}/cutover", estate.operator, {"idempotency_key": "cut-1"}).json()["job"]
    for component in ("ag-web01", "ps-ps1", "mt-mt1"):
        take_commands(api, estate.tenant, component)
    api.post(f"/tenants/{estate.tenant}/jobs/{cut['job_id']}/progress", estate.operator,
             {"state": "draining"})  # fmt: skip
    assert api.post(f"{base}/resume-replication", estate.operator, {"x": 1}).status_code == 400
    answer = api.post(f"{base}/resume-replication", estate.operator, {"idempotency_key": "r1"})
    assert answer.status_code == 202, answer.json()
    command_id = answer.json()["command_id"]
    for component in ("ag-web01", "mt-mt1"):
        sent = [m for m in take_commands(api, estate.tenant, component)
                if m["type"] == "resume-replication"]  # fmt: skip
        assert [m["id"] for m in sent] == [command_id], component
        assert sent[0]["args"] == {"machine": estate.machine, "disks": estate.disks}
    job = api.get(f"/tenants/{estate.tenant}/jobs/{cut['job_id']}", estate.operator).json()
    assert job["state"] == "failed" and "replication resumed" in job["history"][-1]["detail"]
    again = api.post(f"{base}/resume-replication", estate.operator, {"idempotency_key": "r1"})
    assert again.json()["command_id"] == command_id
    # Once cut over, never.
    cut = api.post(f"{base}/cutover", estate.operator, {"idempotency_key": "cut-2"}).json()["job"]
    for state in ("draining", "applied", "cutover-complete"):
        api.post(f"/tenants/{estate.tenant}/jobs/{cut['job_id']}/progress", estate.operator,
                 {"state": state})  # fmt: skip
    late = api.post(f"{base}/resume-replication", estate.operator, {"idempotency_key": "r2"})
    assert late.status_code == 409 and "a committed cutover is not resumed" in late.json()["error"]
    unknown = api.post(f"/tenants/{estate.tenant}/machines/nope/resume-replication",
                       estate.operator, {})  # fmt: skip
    assert unknown.status_code == 404
