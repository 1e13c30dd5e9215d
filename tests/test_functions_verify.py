"""The configuration server's side of applied RPO, schedules and online verify (ASGI, Azurite).

The server's clock is moved forward (``api.clock.advance``) instead of waited for.
"""

from __future__ import annotations

from support.api import take_commands

from functions.core import monitoring


def _disk(api, estate, disk: str) -> dict:
    status = api.get(f"/tenants/{estate.tenant}/status", estate.operator).json()
    return next(d for d in status["machines"][0]["disks"] if d["disk"] == disk)


def _report(api, token: str, disk: str, body: dict) -> None:
    answer = api.post(f"/components/self/disks/{disk}/report", token, body)
    assert answer.status_code == 204, answer


def _open_rpo(api, estate, disk: str) -> list[dict]:
    alerts = api.get(f"/tenants/{estate.tenant}/alerts", estate.operator, query={"open": "true"})
    return [a for a in alerts.json()["alerts"] if a["kind"] == "rpo" and a["subject"] == disk]


def test_rpo_is_the_age_of_what_the_target_applied_and_grows_while_it_is_stuck(api):
    estate = api.estate(disks=1)
    api.protect(estate)
    disk = estate.disks[0]
    now = api.clock()
    skew = 100.0  # the agent's clock runs 100 s ahead of the server's
    tag = {"id": "1-9", "kind": "crash", "t0_wall": now + skew - 3}
    _report(api, estate.agent, disk, {"rpo_s": 3.0, "last_tag": tag, "phase": "replicating"})
    _report(api, estate.mt, disk, {"last_tag": tag, "applied_seq": 9, "gen": 1})
    view = _disk(api, estate, disk)
    assert 2.5 <= view["rpo_s"] <= 4.5, view  # the offset of the agent's clock is taken off
    assert view["applied_rpo_s"] == view["rpo_s"] and view["shipped_rpo_s"] == 3.0

    # The master target stops: it reports nothing more, the agent ships on.
    api.clock.advance(120)
    fresh = {"id": "1-40", "kind": "crash", "t0_wall": api.clock() + skew - 1}
    _report(api, estate.agent, disk, {"rpo_s": 1.0, "last_tag": fresh, "phase": "replicating"})
    view = _disk(api, estate, disk)
    assert view["rpo_s"] > 120 and view["shipped_rpo_s"] == 1.0, view
    assert view["health"] == "lagging"
    monitoring.sweep(api.ctx, [estate.tenant])
    (alert,) = _open_rpo(api, estate, disk)
    assert "master target applied" in alert["message"] and "1 s old" in alert["message"]

    # It catches up: the alert clears.
    _report(api, estate.mt, disk, {"last_tag": fresh, "applied_seq": 40, "gen": 1})
    assert _disk(api, estate, disk)["rpo_s"] < 5
    monitoring.sweep(api.ctx, [estate.tenant])
    assert _open_rpo(api, estate, disk) == []


def test_schedule_is_set_with_protect_changed_later_and_reaches_the_agent(api):
    estate = api.estate(disks=1)
    path = f"/tenants/{estate.tenant}/machines/{estate.machine}"
    bad = api.post(f"{path}/protect", estate.operator,
                   {"idempotency_key": "p1", "app_consistent_interval_s": -1})  # fmt: skip
    assert bad.status_code == 400 and "app_consistent_interval_s" in bad.text
    answer = api.post(f"{path}/protect", estate.operator,
                      {"idempotency_key": "p1", "app_consistent_interval_s": 300})  # fmt: skip
    assert answer.status_code == 202, answer
    settings = api.get("/components/self/settings", estate.agent).json()
    assert settings["app_tag_interval"] == 300
    status = api.get(f"/tenants/{estate.tenant}/status", estate.operator).json()
    assert status["machines"][0]["schedule"] == {
        "app_consistent_interval_s": 300, "verify_interval_s": 0
    }  # fmt: skip
    take_commands(api, estate.tenant, "ag-web01")

    changed = api.post(f"{path}/schedule", estate.operator, {"verify_interval_s": 3600})
    assert changed.status_code == 200, changed
    assert changed.json()["schedule"] == {"app_consistent_interval_s": 300,
                                          "verify_interval_s": 3600}  # fmt: skip
    (command,) = take_commands(api, estate.tenant, "ag-web01")
    assert command["type"] == "protect" and command["id"] == changed.json()["command_id"]
    settings = api.get("/components/self/settings", estate.agent).json()
    assert (settings["app_tag_interval"], settings["verify_interval"]) == (300, 3600)


def test_a_verify_with_repair_sends_the_agent_exactly_the_blocks_that_differ(api):
    estate = api.estate(disks=1)
    api.protect(estate)
    disk = estate.disks[0]
    take_commands(api, estate.tenant, "ag-web01")
    path = f"/tenants/{estate.tenant}/machines/{estate.machine}/commands"
    refused = api.post(path, estate.operator,
                       {"command": "verify", "args": {"disks": ["other-disk9"]}})  # fmt: skip
    assert refused.status_code == 400
    answer = api.post(path, estate.operator, {"command": "verify", "args": {"repair": True}})
    assert answer.status_code == 202, answer
    verify_id = answer.json()["verify_id"]
    (command,) = take_commands(api, estate.tenant, "ag-web01")
    assert command["type"] == "verify"
    assert command["args"] == {"machine": estate.machine, "disks": None, "repair": True,
                               "verify_id": verify_id}  # fmt: skip

    running = {"id": verify_id, "state": "running", "repair": True, "differing_blocks": 2,
               "differing": [[100, 2]], "block": 4096}  # fmt: skip
    _report(api, estate.mt, disk, {"verify": running})
    assert take_commands(api, estate.tenant, "ag-web01") == []  # not done: nothing to repair yet
    done = {**running, "state": "done", "differing_blocks": 3, "differing": [[100, 2], [7, 1]]}
    _report(api, estate.mt, disk, {"verify": done})
    (repair,) = take_commands(api, estate.tenant, "ag-web01")
    assert repair["type"] == "repair"
    assert repair["args"]["disk"] == disk and repair["args"]["blocks"] == [[100, 2], [7, 1]]
    assert _disk(api, estate, disk)["verify"]["differing_blocks"] == 3
    _report(api, estate.mt, disk, {"verify": done, "applied_seq": 12})  # reported again
    assert take_commands(api, estate.tenant, "ag-web01") == []  # one repair per verify

    # Too many differing runs for a report: the disk is resynced instead.
    again = {**done, "id": "v-0123456789abcdef", "truncated": True}
    _report(api, estate.mt, disk, {"verify": again})
    (resync,) = take_commands(api, estate.tenant, "ag-web01")
    assert resync["type"] == "resync" and resync["args"]["disks"] == [disk]
