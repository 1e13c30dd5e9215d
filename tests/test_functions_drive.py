"""Driven jobs and alert acknowledgement: the configuration server on Azurite, components as callers.

A cutover or test failover opened with ``"drive": true`` moves by itself as
the components report their commands' outcomes (functions/core/drive.py);
here the components' side is played through their own API routes, so each
step's message and the job's states are what a real master target sees and
causes.  The daemons' side runs in test_portal_end_to_end.py.
"""

from __future__ import annotations

import json

from support.api import take_commands

from functions.core import monitoring


def _protected(api):
    estate = api.estate(disks=1)
    api.protect(estate)
    api.reach_recovery_points(estate)
    for component in ("ag-web01", "ps-ps1", "mt-mt1"):
        take_commands(api, estate.tenant, component)  # the protect commands
    return estate


def _report(api, token: str, command_id: str, state: str, detail) -> None:
    body = {"state": state, "detail": detail if isinstance(detail, str) else json.dumps(detail)}
    answer = api.post(f"/components/self/commands/{command_id}", token, body)
    assert answer.status_code == 204, answer


def _job(api, estate, job_id: str) -> dict:
    return api.get(f"/tenants/{estate.tenant}/jobs/{job_id}", estate.operator).json()


def test_a_driven_test_failover_runs_through_the_master_target(api):
    estate = _protected(api)
    answer = api.post(
        f"/tenants/{estate.tenant}/machines/{estate.machine}/test-failover", estate.operator,
        {"idempotency_key": "tf-1", "drive": True},
    )  # fmt: skip
    assert answer.status_code == 202, answer
    job = answer.json()["job"]
    assert job["driven"] and job["state"] == "requested"
    (step,) = take_commands(api, estate.tenant, "mt-mt1")
    assert step["type"] == "test-failover"
    assert step["args"]["machine"] == "web01" and step["args"]["disks"] == ["web01-disk0"]
    assert take_commands(api, estate.tenant, "ag-web01") == []  # replication goes on
    # Operators cannot move a driven job by hand (only fail it).
    progress = f"/tenants/{estate.tenant}/jobs/{job['job_id']}/progress"
    refused = api.post(progress, estate.operator, {"state": "ready"})
    assert refused.status_code == 409 and "moves by itself" in refused.json()["error"]
    clone = {"disks": [{"id": "web01-disk0", "tag": "1-5", "vhd": "/srv/tf/web01-disk0.vhd"}]}
    _report(api, estate.mt, step["id"], "done", clone)
    job = _job(api, estate, job["job_id"])
    assert job["state"] == "ready"
    assert (
        job["history"][-1]["detail"] == "web01-disk0 cloned at tag 1-5 to /srv/tf/web01-disk0.vhd"
    )
    assert step["id"] in job["commands"]
    # Cleanup is the second step, to the same master target.
    cleanup = f"/tenants/{estate.tenant}/jobs/{job['job_id']}/cleanup"
    assert api.post(cleanup, estate.operator).status_code == 202
    (step,) = take_commands(api, estate.tenant, "mt-mt1")
    assert step["type"] == "test-failover-cleanup"
    _report(api, estate.mt, step["id"], "done", {"removed": 2})
    assert _job(api, estate, job["job_id"])["state"] == "cleaned"
    again = api.post(cleanup, estate.operator)  # asked twice: the same answer, nothing sent
    assert again.status_code == 202 and again.json()["job"]["state"] == "cleaned"
    assert take_commands(api, estate.tenant, "mt-mt1") == []


def test_a_driven_cutover_drains_then_converts_and_completes(api):
    estate = _protected(api)
    path = f"/tenants/{estate.tenant}/machines/{estate.machine}/cutover"
    job = api.post(path, estate.operator, {"idempotency_key": "cut-1", "drive": True}).json()["job"]
    assert job["state"] == "draining"  # the final drain went out at once
    drains = {c: take_commands(api, estate.tenant, c) for c in ("ag-web01", "ps-ps1", "mt-mt1")}
    assert {c: [m["type"] for m in ms] for c, ms in drains.items()} == {
        "ag-web01": ["drain"], "ps-ps1": ["drain"], "mt-mt1": ["drain"]}  # fmt: skip
    drain = drains["ag-web01"][0]
    assert drain["args"]["final"] is True
    assert drain["args"]["digest"] is True  # a driven cutover: the agent digests the source
    digests = {"web01-disk0": {"size": 1 << 30, "sha256": "ab" * 32}}
    _report(api, estate.agent, drain["id"], "done",
            {"tag": {"id": "1-9", "final": True}, "digests": digests})  # fmt: skip
    _report(api, estate.ps, drain["id"], "done", "uploaded")
    assert take_commands(api, estate.tenant, "mt-mt1") == []  # not before every target is done
    _report(api, estate.mt, drain["id"], "done", "applying")
    (step,) = take_commands(api, estate.tenant, "mt-mt1")
    assert step["type"] == "cutover" and step["args"]["final_tag"] == "1-9"
    assert step["args"]["digests"] == digests
    _report(api, estate.mt, drain["id"], "done", "applying")  # a repeated report: no new step
    assert take_commands(api, estate.tenant, "mt-mt1") == []
    outcome = {"verified": True, "checked_against": "source", "vhds": ["/srv/cut/web01-disk0.vhd"],
               "manifest": "/srv/m.json"}  # fmt: skip
    _report(api, estate.mt, step["id"], "done", outcome)
    job = _job(api, estate, job["job_id"])
    assert [h["state"] for h in job["history"]] == [
        "requested", "draining", "applied", "cutover-complete"]  # fmt: skip
    assert "final tag 1-9 applied and fenced" in job["history"][2]["detail"]
    assert "verified against the source" in job["history"][3]["detail"]
    machines = api.get(f"/tenants/{estate.tenant}/machines", estate.operator).json()["machines"]
    assert machines[0]["state"] == "cut-over"


def test_a_failed_step_fails_the_driven_job(api):
    estate = _protected(api)
    path = f"/tenants/{estate.tenant}/machines/{estate.machine}/test-failover"
    job = api.post(path, estate.operator, {"idempotency_key": "tf-x", "drive": True}).json()["job"]
    (step,) = take_commands(api, estate.tenant, "mt-mt1")
    _report(api, estate.mt, step["id"], "failed", "disk web01-disk0 has no recovery point yet")
    job = _job(api, estate, job["job_id"])
    assert job["state"] == "failed" and "no recovery point" in job["history"][-1]["detail"]
    bad = api.post(path, estate.operator, {"idempotency_key": "tf-y", "drive": "yes"})
    assert bad.status_code == 400 and "drive" in bad.json()["error"]


def test_an_operator_acknowledges_an_alert_once(api):
    estate = _protected(api)
    report = {"phase": "replicating", "rpo_s": 900}
    answer = api.post("/components/self/disks/web01-disk0/report", estate.agent, report)
    assert answer.status_code == 204, answer
    monitoring.sweep(api.ctx, [estate.tenant])
    alerts = f"/tenants/{estate.tenant}/alerts"
    (alert,) = api.get(alerts, estate.operator).json()["alerts"]
    assert alert["kind"] == "rpo" and alert["acknowledged_at"] is None
    ack = f"{alerts}/{alert['id']}/acknowledge"
    first = api.post(ack, estate.operator, {"by": "alice"})
    assert first.status_code == 200 and first.json()["alert"]["acknowledged_by"] == "alice"
    api.post(ack, estate.operator, {"by": "bob"})
    (alert,) = api.get(alerts, estate.operator).json()["alerts"]
    assert alert["acknowledged_by"] == "alice" and alert["cleared_at"] is None
    # The action is recorded as one job, done at once; the second acknowledgement adds none.
    jobs = api.get(f"/tenants/{estate.tenant}/jobs", estate.operator).json()["jobs"]
    (job,) = [j for j in jobs if j["kind"] == "acknowledge"]
    assert (job["state"], job["machine"]) == ("done", "-")
    history = api.get(f"/tenants/{estate.tenant}/jobs/{job['job_id']}", estate.operator).json()
    assert history["history"][-1]["detail"] == f"alert {alert['id']} acknowledged by alice"
    assert api.post(f"{alerts}/rpo.nothing.000001/acknowledge", estate.operator).status_code == 404
    other_tenant, other_operator = api.tenant()
    assert api.post(ack, other_operator, {}).status_code in (403, 404)
