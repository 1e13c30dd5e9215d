"""The three daemons in server mode, driven only by the real configuration server.

Azurite, ``python -m functions.local`` (HTTPS with its own CA), and the
agent, process server and master target started with
``--server-credentials``: registration with passphrases, protection and
every later step go through the API; the daemons get their settings,
storage grants (SAS) and commands from the server.  The source is a loop
device with ext4 tracked through tracefs, so this needs root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

import pytest
from support import wait_for
from support.config_server import serve_config
from support.daemons import Fleet, write_files
from support.operator import Operator

from devkit.embedded import digest

pytestmark = [pytest.mark.root, pytest.mark.tracefs, pytest.mark.slow]

MiB = 1 << 20


@pytest.fixture(scope="module")
def config_server(tmp_path_factory):
    yield from serve_config(tmp_path_factory, tls=True)


@pytest.fixture
def fleet(config_server, tenant, tmp_path, certs):
    machine = "e2e" + uuid.uuid4().hex[:6]  # trace instances of other runs are never touched
    made = Fleet(tmp_path, config_server.tenant(tenant), certs, machine)
    yield made
    made.close()


def component_states(operator: Operator) -> dict[str, str]:
    return {c["component_id"]: c["state"] for c in operator.status()["components"]}


def settled(op: Operator, command_id: str, detail: bool = False) -> Any:
    """Each target's outcome of a command once none is queued (with its detail), else None."""
    targets = op.call("GET", f"/commands/{command_id}")["command"]["targets"]
    if any(t["state"] == "queued" for t in targets.values()):
        return None
    if detail:
        return [(t["state"], t["detail"] or "") for t in targets.values()]
    return {name: t["state"] for name, t in targets.items()}


def recovery_point_ids(operator: Operator, disk: str) -> list[str]:
    points = operator.call("GET", f"/recovery-points?disk={disk}&limit=1000")["recovery_points"]
    return [p["tag_id"] for p in points]


def recovery_point_gens(operator: Operator, disk: str) -> set[int]:
    points = operator.call("GET", f"/recovery-points?disk={disk}&limit=1000")["recovery_points"]
    return {p["gen"] for p in points}


def ferry_cli(fleet: Fleet, *args: str) -> dict[str, Any]:
    """``ferry ARGS --json`` as the fleet's operator; its answer."""
    op = fleet.operator
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    env |= {"FERRY_SERVER": op.server.url, "FERRY_TOKEN": op.token, "FERRY_CA": str(op.server.ca)}
    done = subprocess.run([sys.executable, "-m", "ferrycli.main", *args], capture_output=True,
                          text=True, env=env, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_replication_under_the_configuration_servers_commands(fleet, loopdisk):
    size = 256 * MiB
    source = loopdisk(size, fs=True)
    write_files(source.mountpoint, 40, 512 * 1024, seed=1)
    fleet.register(source.device, size)
    op, machine = fleet.operator, fleet.machine
    disk = f"{machine}-disk0"
    for kind in ("process-server", "master-target", "agent"):
        fleet.start(kind)

    # Everyone is alive and waiting: the machine is not protected yet.
    fleet.wait(
        "heartbeats",
        lambda: set(component_states(op).values()) == {"ok"} and len(component_states(op)) == 3,
    )
    assert fleet.wait("agent status", lambda: fleet.agent_status().get("state")) == (
        "waiting-for-protect"
    )

    # Protect through the API, onto a block device (as a data disk's LUN in Azure): the job
    # is done once the target sits on a recovery point.
    target = loopdisk(size, fs=False).device
    job = op.protect(machine, targets={disk: {"kind": "device", "path": target}})
    fleet.wait("protected", lambda: op.job(job["job_id"])["state"] == "protected", timeout=300)
    assert recovery_point_ids(op, disk)

    # Changes while replicating, then a tag on command.
    write_files(source.mountpoint, 20, 256 * 1024, seed=2)
    op.command(machine, "tag", kind="crash")
    before = len(recovery_point_ids(op, disk))
    fleet.wait("a new recovery point", lambda: len(recovery_point_ids(op, disk)) > before)

    # Pause: passes stop, tracking goes on; resume catches up.
    op.command(machine, "pause")
    fleet.wait("paused", lambda: fleet.agent_status().get("state") == "paused")
    write_files(source.mountpoint, 10, 256 * 1024, seed=3)
    op.command(machine, "resume")
    fleet.wait("replicating", lambda: fleet.agent_status().get("state") == "replicating")

    # Resync on command: a new generation compares source and target, and converges.
    op.command(machine, "resync")
    fleet.wait("a recovery point of generation 2", lambda: 2 in recovery_point_gens(op, disk))

    # Cutover's first half: quiet source, a final drain, the final tag applied and
    # fenced at the master target, identical bytes.
    source.unmount()
    drain = op.command(machine, "drain", final=True)
    status = fleet.wait(
        "drained", lambda: (s := fleet.agent_status()).get("state") == "drained" and s
    )
    final = status["disks"][0]["last_tag"]["id"]
    fleet.wait("the final tag applied", lambda: final in recovery_point_ids(op, disk))
    assert not (fleet.base / "targets" / f"{disk}.img").exists()  # the device, not a file
    assert digest(target, size) == digest(source.device, size)
    outcomes = fleet.wait("the drain's outcome", lambda: settled(op, drain))
    assert set(outcomes.values()) == {"done"}, outcomes

    # What operators see: reports from the agent and the master target, healthy.
    fleet.wait(
        "the fence reported", lambda: op.status()["machines"][0]["disks"][0]["phase"] == "fenced"
    )
    view = op.status()["machines"][0]
    assert view["health"] == "ok"
    assert view["disks"][0]["applied_seq"] >= 1
    assert view["disks"][0]["last_tag"]["id"] == final  # the master target's applied tag
    assert view["disks"][0]["fenced"]["tag"]["id"] == final
    # After a final drain the agent refuses to resume: its disks are fenced.
    resume = op.command(machine, "resume")
    (outcome,) = fleet.wait("the resume's outcome", lambda: settled(op, resume, detail=True))
    assert outcome[0] == "failed" and "fenced" in outcome[1], outcome

    # Unless the cutover is not committed (its boot check failed): the operator resumes
    # replication with ferry cutover resume; the fence is lifted and new tags are applied.
    resumed = ferry_cli(fleet, "cutover", "resume", machine, "--json")
    outcomes = fleet.wait("the resume's outcome",
                          lambda: settled(op, resumed["command_id"], detail=True))  # fmt: skip
    assert [state for state, _ in outcomes] == ["done", "done"], outcomes
    assert any(f'"was_fenced_at": "{final}"' in detail for _, detail in outcomes), outcomes
    fleet.wait("replicating", lambda: fleet.agent_status().get("state") == "replicating")
    subprocess.run(["dd", "if=/dev/urandom", f"of={source.device}", "bs=1M", "count=4",
                    "seek=200", "oflag=direct", "conv=notrunc", "status=none"], check=True)  # fmt: skip
    op.command(machine, "tag", kind="crash")
    fleet.wait(
        "a recovery point after the final tag",
        lambda: (
            op.status()["machines"][0]["disks"][0]["last_tag"]["id"] != final
            and digest(target, size) == digest(source.device, size)
        ),
        timeout=120,
    )
    assert op.status()["machines"][0]["disks"][0]["phase"] != "fenced"

    # A machine's stop ends its agent only; the process server and master target serve on.
    stop = op.command(machine, "stop")
    fleet.wait("agent exit", lambda: fleet.procs["agent"].poll() is not None, timeout=60)
    assert fleet.procs["agent"].returncode == 0, fleet.tail("agent")
    # The process server and the master target have handled the machine's stop too,
    # and are still running.
    outcome = wait_for(lambda: settled(op, stop), 60, "the machine stop's outcome")
    assert outcome == {f"ag-{machine}": "done", "ps-ps1": "done", "mt-mt1": "done"}, outcome
    fleet.alive("process-server", "master-target")
    # The process server and the master target are stopped one by one, by id.
    for kind, component in (("process-server", "ps-ps1"), ("master-target", "mt-mt1")):
        stop = op.call("POST", f"/components/{component}/commands", {"command": "stop"})
        assert fleet.procs[kind].wait(60) == 0, fleet.tail(kind)
        # Reported before it exits.
        assert settled(op, stop["command_id"]) == {component: "done"}
    assert "Traceback" not in "".join(fleet.tail(k, 400) for k in fleet.procs)
